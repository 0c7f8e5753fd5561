"""`prmkit score`'s file job: read records, score them with the engine, write JSONL resumably.

Results are committed window by window to ``OUTPUT.partial`` beside a small state file, and the scores of every
forward batch of the window in progress go to a journal as the batch finishes (:mod:`prmkit.scoring.resume`), so a
killed run resumes where it stopped, losing at most one batch, and the finished output is byte-identical to an
uninterrupted run. Records come from :mod:`prmkit.scoring.source`.

:func:`score_file` is a short loop over named steps: :func:`prmkit.scoring.claim.claim_job` decides where the job
starts, :class:`prmkit.scoring.window.WindowReader` reads windows of whole records, :func:`_score_window` scores one
(keeping its batch journal), and :class:`prmkit.scoring.resumable.ResumableOutput` writes and commits it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmkit.core.jsonio import dumps_record
from prmkit.core.outputs import OutputLock
from prmkit.core.version import __version__
from prmkit.data.formats import format_choices
from prmkit.errors import DataError, PrmkitError, UsageError
from prmkit.metrics import aggregate, first_error_index
from prmkit.scoring.claim import JobClaim, claim_job
from prmkit.scoring.engine import StepScorer, StepScores
from prmkit.scoring.groups import GroupSpec, GroupWriter
from prmkit.scoring.resumable import ResumableOutput
from prmkit.scoring.resume import BatchJournal, journal_path, output_paths, write_state
from prmkit.scoring.source import InputSource
from prmkit.scoring.window import Window, WindowReader

__all__ = ["InputSource", "ScoreCounts", "ScoreSummary", "output_paths", "score_file"]


# ---------------------------------------------------------------------------------------------------------------------
# The file job: `prmkit score`


@dataclass
class ScoreCounts:
    lines_in: int = 0
    lines_scored: int = 0
    lines_rejected: int = 0
    rows_out: int = 0
    steps: int = 0
    tokens: int = 0
    steps_truncated: int = 0
    rows_truncated: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ScoreSummary:
    input: str
    output: str
    model: str
    format: str
    counts: ScoreCounts = field(default_factory=ScoreCounts)
    rejects: str | None = None
    seconds: float = 0.0
    resumed_at_line: int | None = None
    already_complete: bool = False
    lines_this_run: int = 0
    steps_this_run: int = 0
    batches_reused: int = 0
    """Forward batches an interrupted run had finished, taken from its journal instead of being run again."""
    device: str = ""
    dtype: str = ""
    batch_tokens: int | None = None
    packing: str | None = None
    """The attention implementation that read packed rows, or None for padded batches."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of start-up, model loading, tokenizing, forward passes and writing (:mod:`prmkit.scoring.timings`)."""
    group_by: dict[str, Any] | None = None
    """--group-by's field, --select and --aggregate, with the groups written this run and the most lines one held."""

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "input": self.input,
            "output": self.output,
            "model": self.model,
            "format": self.format,
            "device": self.device,
            "dtype": self.dtype,
            "batch_tokens": self.batch_tokens,
            "packing": self.packing,
            **c.to_dict(),
            "rejects": self.rejects,
            "resumed_at_line": self.resumed_at_line,
            "batches_reused": self.batches_reused,
            "already_complete": self.already_complete,
            "seconds": round(self.seconds, 3),
            "lines_per_s": round(self.lines_this_run / self.seconds, 2) if self.seconds > 0 else None,
            "steps_per_s": round(self.steps_this_run / self.seconds, 2) if self.seconds > 0 else None,
            "timings": self.timings,
            "group_by": self.group_by,
        }


def _one_run_per_output(func: Callable[..., ScoreSummary]) -> Callable[..., ScoreSummary]:
    """Give ``func`` process 0's lock on a file output (taken inside, so a refusal reaches every process), and
    release it however ``func`` ends."""

    @functools.wraps(func)
    def wrapper(scorer: StepScorer, input_spec: str, output: str, **kwargs: Any) -> ScoreSummary:
        lock = OutputLock(output, "prmkit score") if str(output) != "-" and scorer.is_main_process else None
        try:
            return func(scorer, input_spec, output, lock=lock, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    return wrapper


@_one_run_per_output
def score_file(
    scorer: StepScorer,
    input_spec: str,
    output: str,
    *,
    fmt: str = "auto",
    threshold: float = 0.5,
    skip_invalid: bool = False,
    overwrite: bool = False,
    sort_window: int | None = None,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    on_steps: Callable[[int], None] | None = None,
    stdout: Any = None,
    on_reject: Callable[[str], None] | None = None,
    group: GroupSpec | None = None,
    lock: OutputLock | None = None,
) -> ScoreSummary:
    """Score every solution of ``input_spec`` into JSONL ``output`` (``-``: the text stream ``stdout``), resumably.

    Each line is the input object with ``step_scores``, ``aggregates`` and ``first_error`` added (and
    ``"truncated": true`` when truncation cut a step away). A file output is built in ``OUT.partial`` beside a state
    file and renamed to ``OUT`` when complete. The state is committed only at window boundaries, after the output
    is fsync'd, so re-running the same command after any interruption, kill -9 included, truncates the partial file
    to the last commit (a half-written line goes with it) and goes on from there. The result equals an
    uninterrupted run byte for byte: the windows, hence the batches and the arithmetic, are the same.

    A bad line stops the job with its number and reason (:class:`DataError`), before its window is scored; with
    ``skip_invalid`` it goes to ``OUT.rejects.jsonl`` (``on_reject`` for stdout) and the job goes on.

    With ``group`` (``--group-by``) each line also gets its ``rank`` in its group and the ``group_size``, or only
    each group's best line is written (``--select best``); groups must be contiguous (:mod:`prmkit.scoring.groups`).

    A second run writing the same ``output`` is refused while the first is alive
    (:class:`prmkit.core.outputs.OutputBusy` names its PID), and so is an output (or one of its companion files) that
    is the input or lies inside the model. ``lock`` is supplied by the wrapper that takes and releases it; callers
    leave it out.

    (Over 100 lines with its keyword signature; the loop's steps are claim, resumable and window.)
    """
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"score.threshold must lie in [0, 1], got {threshold}")
    if fmt not in (choices := format_choices()):
        raise UsageError(f"unknown format {fmt!r}", hint=f"{', '.join(choices[:-1])} or {choices[-1]}")
    window_rows = sort_window or scorer.sort_window
    src = InputSource(input_spec)
    if src.stdin and scorer.world_size > 1:
        raise UsageError(
            "reading stdin needs a single process", hint="give the input as a file under accelerate launch"
        )
    paths = None if str(output) == "-" else output_paths(output)
    started = time.perf_counter()
    packing = getattr(scorer.model.config, "_attn_implementation", None) if scorer.packing else None
    summary = ScoreSummary(
        input=src.name,
        output=str(output),
        model=str(scorer.identity.get("name")),
        format=fmt,
        device=str(scorer.device),
        dtype=str(scorer.dtype).removeprefix("torch."),
        packing=packing,
    )
    claim = claim_job(
        scorer,
        src,
        paths,
        fmt=fmt,
        threshold=threshold,
        window_rows=window_rows,
        group=group,
        overwrite=overwrite,
        lock=lock,
    )
    plan = claim.plan
    summary.batch_tokens = scorer.batch_tokens  # after the claim: a resumed run keeps the budget it started with
    known = ScoreCounts().to_dict()
    summary.counts = ScoreCounts(**{k: v for k, v in plan.get("counts", {}).items() if k in known})
    if plan.get("complete"):
        summary.already_complete = True
        summary.format = plan.get("format") or fmt
    else:
        summary.resumed_at_line = int(plan.get("input_line", 0)) or None
        reader = WindowReader(
            src,
            fmt,
            window_rows=window_rows,
            skip_invalid=skip_invalid,
            after_line=int(plan.get("input_line", 0)),
            after_offset=plan.get("input_offset"),
            fmt_detected=plan.get("format_detected"),
            group=group,
        )
        out = None
        if scorer.is_main_process:
            # write_state as this module names it: a test replaces it here to crash between a window and its commit
            out = ResumableOutput(paths, claim.job, src, stream=stdout, on_reject=on_reject, save_state=write_state)
            if group is not None:
                out.group = GroupWriter(
                    group,
                    lambda obj, line: out.write(_record_line(obj, src.where(line))),
                    paths["group"] if paths is not None else None,
                )
                if paths is not None:
                    out.group.restore(plan.get("group"))
        _run(
            scorer, reader, out, summary, claim, paths, threshold=threshold, on_progress=on_progress, on_steps=on_steps
        )
        if out is not None and out.group is not None:
            groups = {"groups_written": out.group.groups, "max_group_lines": out.group.max_buffered}
            summary.group_by = {**out.group.spec.to_dict(), **groups}
    summary.rejects = str(paths["rejects"]) if paths and paths["rejects"].exists() else None
    summary.seconds = time.perf_counter() - started
    summary.timings = scorer.timings.to_dict()
    return summary


def _run(
    scorer: StepScorer,
    reader: WindowReader,
    out: ResumableOutput | None,
    summary: ScoreSummary,
    claim: JobClaim,
    paths: dict[str, Path] | None,
    *,
    threshold: float,
    on_progress: Callable[[dict[str, int]], None] | None,
    on_steps: Callable[[int], None] | None,
) -> None:
    """Open the output (process 0), score every window, and finish: the last commit and the rename."""
    plan = claim.plan
    last: tuple[int, int | None] = (int(plan.get("input_line", 0)), plan.get("input_offset"))
    try:
        if out is not None:
            out.open(plan, claim.hashes, summary.counts, reader.fmt_used)
        while True:
            reading = time.perf_counter()
            window = reader.next_window()
            if window is None:
                break
            scorer.timings.add("tokenize", time.perf_counter() - reading)
            results = _score_window(
                scorer, window, summary, paths if not reader.src.stdin else None, plan.get("job"), on_steps
            )
            writing = time.perf_counter()
            _write_window(window, results, out, summary, threshold, reader.src)
            last = (window.last.number, window.last.offset)
            if out is not None:
                out.commit(*last, summary.counts, reader.fmt_used)
                scorer.timings.add("write", time.perf_counter() - writing)
                if on_progress is not None:
                    c = summary.counts
                    on_progress(
                        {
                            "line": last[0],
                            "lines": c.lines_in,
                            "rows": c.rows_out,
                            "steps": c.steps,
                            "lines_this_run": summary.lines_this_run,
                            "steps_this_run": summary.steps_this_run,
                        }
                    )
        summary.format = reader.fmt_used or summary.format
        if summary.counts.lines_in == 0:
            raise DataError(f"{reader.src.name}: no lines to score")
        if out is not None:
            if out.group is not None:
                out.group.flush()  # the last group: no next one will close it
            writing = time.perf_counter()
            out.finish(*last, summary.counts, reader.fmt_used)
            if paths is not None:
                scorer.timings.add("write", time.perf_counter() - writing)
        elif paths is not None:
            journal_path(paths, scorer.rank).unlink(missing_ok=True)
    except BaseException:
        if out is not None:
            out.abandon_stdin()
        raise
    finally:
        if out is not None:
            out.close()


def _score_window(
    scorer: StepScorer,
    window: Window,
    summary: ScoreSummary,
    paths: dict[str, Path] | None,
    job: str | None,
    on_steps: Callable[[int], None] | None,
) -> Iterator[StepScores]:
    """The window's scores in input order; with ``paths`` (a file input and output: resumable), each forward batch
    is kept in this process's journal as it finishes, and one an interrupted run finished is taken from there."""
    items = window.items
    journal = None
    if paths is not None and items:
        journal = BatchJournal(
            journal_path(paths, scorer.rank),
            {
                "prmkit_version": __version__,
                "job": job,
                "window": [window.entries[0][0].number, window.last.number],
                "solutions": len(items),
                "batch_tokens": scorer.batch_tokens,
                "packing": scorer.packing,
                "rank": scorer.rank,
                "world_size": scorer.world_size,
            },
        )
    try:
        return iter(scorer.score_solutions(items, on_batch=on_steps, batch_log=journal))
    finally:
        if journal is not None:
            journal.close()
            summary.batches_reused += journal.replayed


def _write_window(
    window: Window,
    results: Iterator[StepScores],
    out: ResumableOutput | None,
    summary: ScoreSummary,
    threshold: float,
    src: InputSource,
) -> None:
    """Count every record of the window and (process 0) write it: scored, held for its group's ranking, or rejected."""
    counts = summary.counts
    writer = out.group if out is not None else None
    for rec, rows, problem in window.entries:
        counts.lines_in += 1
        summary.lines_this_run += 1
        if problem is not None:
            counts.lines_rejected += 1
            if out is not None:
                out.reject(rec, *problem)
            continue
        counts.lines_scored += 1
        for obj, _, steps in rows or ():
            res = next(results)
            counts.rows_out += 1
            counts.steps += len(steps)
            summary.steps_this_run += len(steps)
            counts.tokens += res.num_tokens
            counts.steps_truncated += sum(s is None for s in res.scores)
            counts.rows_truncated += bool(res.truncated)
            if writer is not None:
                scored = _scored_object(obj, res, threshold)
                if writer.spec.field not in scored:  # a converted row (math-shepherd, prm800k): say its group
                    scored[writer.spec.field] = rec.record[writer.spec.field]
                writer.add(window.keys[rec.number], rec.number, scored)
            elif out is not None:
                out.write(_scored_line(obj, res, threshold, src.where(rec.number)))


PRMKIT_FIELDS = ("step_scores", "aggregates", "first_error", "truncated")


def _scored_line(obj: dict, res: StepScores, threshold: float, where: str) -> str:
    return _record_line(_scored_object(obj, res, threshold), where)


def _record_line(obj: dict, where: str) -> str:
    try:
        return dumps_record(obj) + "\n"
    except ValueError:  # the record was checked before scoring, so only a score can be NaN
        raise PrmkitError(
            f"{where}: the model gave a score that is not a number (NaN); stopped before writing it",
            hint="a float16 model can overflow: try --dtype float32 (or bfloat16)",
        ) from None


def _scored_object(obj: dict, res: StepScores, threshold: float) -> dict:
    out = dict(obj)
    if "step_scores" in out and "truncated" in out and not res.truncated:
        del out["truncated"]  # a stale flag from scoring an earlier output again
    out["step_scores"] = res.scores
    out["aggregates"] = aggregate(res.scores)
    out["first_error"] = first_error_index(res.scores, threshold)
    if res.truncated:
        out["truncated"] = True
    return out
