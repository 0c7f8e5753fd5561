"""`prmkit score`'s file job: read records, score them with the engine, write JSONL resumably.

Results are committed window by window to ``OUTPUT.partial`` beside a small state file, and the scores of every
forward batch of the window in progress go to a journal as the batch finishes (:mod:`prmkit.scoring.resume`), so a
killed run resumes where it stopped, losing at most one batch, and the finished output is byte-identical to an
uninterrupted run. Records come from :mod:`prmkit.scoring.source`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prmkit.core.version import __version__
from prmkit.core.atomic import remove_leftovers
from prmkit.data.sources import SourceRecord, reject_entry
from prmkit.errors import DataError, PrmkitError, UsageError
from prmkit.data.formats import Options, RowError, check_format
from prmkit.core.jsonio import dumps, dumps_record
from prmkit.metrics import aggregate, first_error_index
from prmkit.core.outputs import OutputLock, refuse_inputs_inside
from prmkit.scoring.engine import StepScorer, StepScores
from prmkit.scoring.groups import GroupOrder, GroupSpec, GroupWriter, key_of
from prmkit.scoring.resume import (
    DIGEST,
    BatchJournal,
    HashedFile,
    check_state,
    describe_mismatch,
    from_stdin,
    fsync_dir,
    journal_path,
    output_paths,
    read_state,
    remove_files,
    remove_journals,
    remove_unresumable,
    verified_prefix,
    write_state,
)
from prmkit.scoring.source import SCORE_SIGNATURES, InputSource, detect_score_format, rows_to_score

log = logging.getLogger("prmkit")


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

    A second run writing the same ``output`` is refused while the first is alive (:class:`prmkit.core.outputs.OutputBusy`
    names its PID), and so is an output (or one of its companion files) that is the input or lies inside the model.
    ``lock`` is supplied by the wrapper that takes and releases it; callers leave it out.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"score.threshold must lie in [0, 1], got {threshold}")
    if fmt not in ("auto", "stepwise", "math-shepherd", "prm800k", "processbench"):
        raise UsageError(f"unknown format {fmt!r}", hint="auto, stepwise, math-shepherd, prm800k or processbench")
    window_rows = sort_window or scorer.sort_window
    src = InputSource(input_spec)
    if src.stdin and scorer.world_size > 1:
        raise UsageError("reading stdin needs a single process", hint="give the input as a file under accelerate launch")
    main = scorer.is_main_process
    paths = None if str(output) == "-" else output_paths(output)
    started = time.perf_counter()
    summary = ScoreSummary(input=src.name, output=str(output), model=str(scorer.identity.get("name")), format=fmt,
                           device=str(scorer.device), dtype=str(scorer.dtype).removeprefix("torch."),
                           batch_tokens=scorer.batch_tokens,
                           packing=getattr(scorer.model.config, "_attn_implementation", None) if scorer.packing else None)

    # Process 0 alone decides where to start; the others follow its answer, refusals included.
    job: dict[str, Any] = {}
    plan: dict[str, Any] = {}
    hashes: dict[str, Any] = {}
    if main:
        try:
            if paths:
                _refuse_overlap(paths, src, scorer)
            if lock is not None:
                lock.acquire()
            if paths is not None and not overwrite:
                summary.batch_tokens = _keep_derived_budget(scorer, paths)
            job = _job_identity(scorer, src, fmt, threshold, window_rows, group)
            plan = _plan_output(paths, job, src, overwrite) if paths else {}
            hashes = plan.pop("hashes", {})  # running hashes of the committed files: this process's, not broadcast
            # Every process's batch journal names the job, so one left by another model or input is never replayed.
            plan["job"] = _job_digest(job)
        except PrmkitError as e:
            plan = {"error": [isinstance(e, UsageError), e.message, e.hint]}
    plan = scorer.broadcast(plan)
    if "error" in plan:
        usage, message, hint = plan["error"]
        raise (UsageError if usage else PrmkitError)(message, hint=hint)
    known = ScoreCounts().to_dict()
    counts = summary.counts = ScoreCounts(**{k: v for k, v in plan.get("counts", {}).items() if k in known})
    if plan.get("complete"):
        summary.already_complete = True
        summary.format = plan.get("format") or fmt
        summary.rejects = str(paths["rejects"]) if paths and paths["rejects"].exists() else None
        summary.seconds = time.perf_counter() - started
        summary.timings = scorer.timings.to_dict()
        return summary
    after_line = int(plan.get("input_line", 0))
    after_offset = plan.get("input_offset")
    summary.resumed_at_line = after_line or None
    fmt_used: str | None = plan.get("format_detected")
    fmt_origin = "the format given" if fmt != "auto" else "the format detected when this output was started"
    out_fh = rej_fh = None
    order = writer = None
    if group is not None:
        order = GroupOrder(group.field)
        if after_line:
            order.replay(src.records(), after_line, src.where)
        if main:
            writer = GroupWriter(group, lambda obj, line: out_fh.write(_encode(_record_line(obj, src.where(line)))),
                                 paths["group"] if paths is not None else None)
            if paths is not None:
                writer.restore(plan.get("group"))

    def _encode(text: str) -> Any:
        return text if paths is None else text.encode("utf-8")

    def commit(line: int, offset: int | None, final: bool = False) -> None:
        if paths is None:
            out_fh.flush()
            return
        out_fh.flush()
        os.fsync(out_fh.fileno())
        if rej_fh is not None:
            rej_fh.flush()
            os.fsync(rej_fh.fileno())
        kept = writer.keep() if writer is not None else None
        write_state(paths["state"], {
            "prmkit_version": __version__,
            "status": "complete" if final else "running",
            **job,
            "format_detected": fmt_used,
            "progress": {
                "input_line": line,
                "input_offset": offset,
                "output_bytes": out_fh.tell(),
                "output_sha256": out_fh.hexdigest(),
                "rejects_bytes": rej_fh.tell() if rej_fh is not None else 0,
                "rejects_sha256": (rej_fh.hexdigest() if rej_fh is not None else hashlib.sha256().hexdigest()),
                "counts": counts.to_dict(),
                **({"group": kept} if kept else {}),
            },
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if writer is not None:
            writer.tidy(kept["file"] if kept else None)

    def write_reject(rec: SourceRecord, field_name: str, reason: str) -> None:
        nonlocal rej_fh
        if paths is None:
            if on_reject is not None:
                on_reject(f"{src.where(rec.number)}: {field_name}: {reason}")
            return
        if rej_fh is None:
            rej_fh = HashedFile(open(paths["rejects_partial"], "wb"))
        rej_fh.write((dumps(reject_entry(src.name, src.unit, rec, field_name, reason)) + "\n").encode("utf-8"))

    opts = Options(is_eval=True)
    lines_this_run = steps_this_run = 0
    last_line, last_offset = after_line, after_offset
    try:
        if main:
            if paths is None:
                out_fh = stdout
            else:
                if not plan.get("output_bytes") and not after_line:
                    # The state goes first: a partial file without one would be refused as somebody else's.
                    out_fh = HashedFile(open(paths["partial"], "wb"))
                    commit(0, 0 if src.source.kind == "jsonl" else None)
                    log.info(f"writing {paths['partial']}, renamed to {paths['output'].name} when complete; "
                             "if interrupted, run the same command again to resume")
                else:
                    out_fh = HashedFile(_cut(paths["partial"], plan["output_bytes"]), hashes["output"])
                if paths["rejects_partial"].exists():
                    rej_fh = HashedFile(_cut(paths["rejects_partial"], plan.get("rejects_bytes", 0)), hashes["rejects"])
        records = src.records(after_line, after_offset)
        exhausted = False
        while not exhausted:
            reading = time.perf_counter()
            # One window of whole records, so a resumed run sees exactly the windows of an uninterrupted one.
            pending: list[tuple[SourceRecord, list[tuple[dict, str, list[str]]] | None, tuple[str, str] | None]] = []
            keys: dict[int, str] = {}
            n_rows = 0
            while n_rows < window_rows:
                rec = next(records, None)
                if rec is None:
                    exhausted = True
                    break
                problem: tuple[str, str] | None = ("row", rec.problem) if rec.problem is not None else None
                rows = None
                if problem is None and order is not None:
                    order.see(rec.record, rec.number, src.where)  # a group seen again stops the run here
                if problem is None:
                    if fmt_used is None and isinstance(rec.record, dict):
                        fmt_used = fmt if fmt != "auto" else detect_score_format(rec.record, src.where(rec.number))
                        if fmt == "auto":
                            fmt_origin = f"the format detected from {src.unit} {rec.number}"
                            log.info(f"{src.name}: scoring {fmt_used} records (detected from {src.unit} {rec.number})")
                    try:
                        if fmt_used is not None:
                            check_format(fmt_used, rec.record, fmt_origin, SCORE_SIGNATURES)
                        rows = rows_to_score(fmt_used or "stepwise", rec.record, src.unit, rec.number, opts)
                        if group is not None:
                            keys[rec.number] = key_of(rec.record, group.field)
                    except RowError as e:
                        problem = (e.field, e.reason)
                if problem is not None and not skip_invalid:
                    # Stop before scoring anything more; what is committed stays, resumable with --skip-invalid.
                    raise DataError(
                        f"{src.where(rec.number)}: {problem[0]}: {problem[1]}",
                        hint="fix the line and re-run with --overwrite, or pass --skip-invalid to write bad lines "
                             "to a rejects file and go on",
                    )
                pending.append((rec, rows, problem))
                n_rows += len(rows or ())
            if not pending:
                break
            items = [(prompt, steps) for _, rows, _ in pending for _, prompt, steps in rows or ()]
            scorer.timings.add("tokenize", time.perf_counter() - reading)
            journal = None
            if paths is not None and items and not src.stdin:  # stdin cannot be resumed: nothing to keep
                journal = BatchJournal(journal_path(paths, scorer.rank), {
                    "prmkit_version": __version__, "job": plan.get("job"),
                    "window": [pending[0][0].number, pending[-1][0].number],
                    "solutions": len(items), "batch_tokens": scorer.batch_tokens, "packing": scorer.packing,
                    "rank": scorer.rank, "world_size": scorer.world_size,
                })
            try:
                results = iter(scorer.score_solutions(items, on_batch=on_steps, batch_log=journal))
            finally:
                if journal is not None:
                    journal.close()
                    summary.batches_reused += journal.replayed
            writing = time.perf_counter()
            for rec, rows, problem in pending:
                counts.lines_in += 1
                lines_this_run += 1
                if problem is not None:
                    counts.lines_rejected += 1
                    if main:
                        write_reject(rec, *problem)
                    continue
                counts.lines_scored += 1
                for obj, _, steps in rows:
                    res = next(results)
                    counts.rows_out += 1
                    counts.steps += len(steps)
                    steps_this_run += len(steps)
                    counts.tokens += res.num_tokens
                    counts.steps_truncated += sum(s is None for s in res.scores)
                    counts.rows_truncated += bool(res.truncated)
                    if writer is not None:
                        scored = _scored_object(obj, res, threshold)
                        if group.field not in scored:  # a converted row (math-shepherd, prm800k): say its group
                            scored[group.field] = rec.record[group.field]
                        writer.add(keys[rec.number], rec.number, scored)
                    elif main:
                        out_fh.write(_encode(_scored_line(obj, res, threshold, src.where(rec.number))))
            last_line, last_offset = pending[-1][0].number, pending[-1][0].offset
            if main:
                commit(last_line, last_offset)
                scorer.timings.add("write", time.perf_counter() - writing)
                if on_progress is not None:
                    on_progress({"line": last_line, "lines": counts.lines_in, "rows": counts.rows_out,
                                 "steps": counts.steps, "lines_this_run": lines_this_run,
                                 "steps_this_run": steps_this_run})
        summary.format = fmt_used or fmt
        if counts.lines_in == 0:
            raise DataError(f"{src.name}: no lines to score")
        if main:
            if writer is not None:
                writer.flush()  # the last group: no next one will close it
            if paths is None:
                out_fh.flush()
            else:
                writing = time.perf_counter()
                commit(last_line, last_offset, final=True)
                scorer.timings.add("write", time.perf_counter() - writing)
                out_fh.close()
                out_fh = None
                if rej_fh is not None:
                    rej_fh.close()
                    rej_fh = None
                _finish(paths)
        elif paths is not None:
            journal_path(paths, scorer.rank).unlink(missing_ok=True)
    except BaseException:
        if main and paths is not None and src.stdin:
            for fh in (out_fh, rej_fh):
                if fh is not None:
                    fh.close()
            out_fh = rej_fh = None
            remove_unresumable(paths, "scoring stdin cannot be resumed (give the input as a file for that)")
        raise
    finally:
        if paths is not None and out_fh is not None:
            out_fh.close()
        if rej_fh is not None:
            rej_fh.close()
    summary.rejects = str(paths["rejects"]) if paths and paths["rejects"].exists() else None
    summary.seconds = time.perf_counter() - started
    summary.timings = scorer.timings.to_dict()
    summary.lines_this_run = lines_this_run
    summary.steps_this_run = steps_this_run
    if writer is not None:
        summary.group_by = {**group.to_dict(), "groups_written": writer.groups, "max_group_lines": writer.max_buffered}
    return summary


def _job_identity(scorer: StepScorer, src: InputSource, fmt: str, threshold: float, window_rows: int,
                  group: GroupSpec | None = None) -> dict[str, Any]:
    """What must match for a run to continue an earlier one's output.

    The batching settings belong here too: they decide which solutions share a forward pass, and a batch of another
    shape can round the last bit of a score differently, so a resumed run must batch as the first one did.
    """
    return {
        "input": {"sha256": src.fingerprint()},
        "input_spec": src.name,
        "model": scorer.identity,
        "settings": {
            "tokenization": scorer.params.to_dict(),
            "format": fmt,
            "threshold": threshold,
            "dtype": str(scorer.dtype).removeprefix("torch."),
            "positive_label_id": scorer.positive_label_id,
            "mode": "prefix" if scorer.prefix_mode else "one-pass",
            "batch_tokens": scorer.batch_tokens,
            "sort_window": window_rows,
            "processes": scorer.world_size,
            "device": scorer.device.type,
            "packing": scorer.packing,
            **({"group_by": group.to_dict()} if group is not None else {}),
        },
    }


def _refuse_overlap(paths: dict[str, Path], src: InputSource, scorer: StepScorer) -> None:
    """The output and its companions (partial, state, rejects) must be neither the input nor inside the model."""
    inputs = [("input", None if src.stdin else src.spec), ("model directory", scorer.identity.get("name"))]
    for path in paths.values():
        refuse_inputs_inside(path, inputs, "--overwrite would replace" if path == paths["output"] else "scoring writes",
                             output_inside=True)


def _job_digest(job: dict[str, Any]) -> str:
    # What the state file checks before resuming (content, not names: the same file or model named otherwise matches).
    model = job["model"]
    key = {"input": job["input"], "model": model.get("sha256", model), "settings": job["settings"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _keep_derived_budget(scorer: StepScorer, paths: dict[str, Path]) -> int:
    """A budget sized to the device's free memory (not given) continues with the figure the run started with: free
    memory varies between runs, and a resumed run must batch as the first one did."""
    state = read_state(paths["state"]) if getattr(scorer, "batch_tokens_source", "given") != "given" else None
    settings = (state or {}).get("settings")
    recorded = settings.get("batch_tokens") if isinstance(settings, dict) else None
    if isinstance(recorded, int) and recorded >= 1 and recorded != scorer.batch_tokens:
        log.info(f"continuing with the batch budget the run started with ({recorded} tokens, not {scorer.batch_tokens})")
        scorer.batch_tokens = recorded
    return scorer.batch_tokens


def _cut(path: Path, size: int) -> Any:
    """``path`` opened to append after its first ``size`` bytes (the committed ones; a half-written line goes)."""
    fh = open(path, "r+b")
    fh.truncate(size)
    fh.seek(0, os.SEEK_END)
    return fh


def _finish(paths: dict[str, Path]) -> None:
    # The state already says complete; renaming is idempotent, so a crash in between is finished by the next run.
    if paths["rejects_partial"].exists():
        os.replace(paths["rejects_partial"], paths["rejects"])
    if paths["partial"].exists():
        os.replace(paths["partial"], paths["output"])
    remove_journals(paths)
    fsync_dir(paths["output"].parent)


def _plan_output(paths: dict[str, Path], job: dict, src: InputSource, overwrite: bool) -> dict[str, Any]:
    """Where a file job starts: fresh, resumed from the state file, already complete, or refused."""
    out = paths["output"]
    if out.is_dir():
        raise UsageError(f"{out} is a directory; --output takes a JSONL file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    removed, _ = remove_leftovers(out.parent, paths["state"].name)
    if removed:
        log.info(f"removed {removed} temporary file{'s' if removed > 1 else ''} left beside {out} by an interrupted run")
    if overwrite:
        remove_files(paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"], paths["state"])
        remove_journals(paths)
        return {"fresh": True}
    state = read_state(paths["state"])
    if state is not None and from_stdin(state) and state.get("status") != "complete":
        # An interrupted run that read stdin: nothing can tell where its input left off, so it cannot be continued.
        remove_unresumable(paths, "an earlier run read stdin and was interrupted; it cannot be continued")
        state = None
    if state is None:
        existing = [p for p in (paths["output"], paths["partial"], paths["rejects"], paths["rejects_partial"]) if p.exists()]
        if existing:
            raise UsageError(f"{existing[0]} exists and no scoring state records how it was made",
                             hint="pass --overwrite to replace it, or choose another --output")
        remove_journals(paths)  # no state says whose they are
        return {"fresh": True}
    if src.stdin:
        raise UsageError(f"{out}: cannot check that stdin is the input an earlier run scored",
                         hint="pass --overwrite to start over, or give the input as a file to resume")
    progress = check_state(paths, state)
    why = describe_mismatch(state, job)
    if why:
        raise UsageError(f"{out}: refusing to continue it: {why}",
                         hint="run with the settings it was started with to continue it (a resumed run must batch as "
                              "the first did to give the same bytes), pass --overwrite to start over, or choose "
                              "another --output")
    committed, rejected = progress.get("output_bytes", 0), progress.get("rejects_bytes", 0)
    if state.get("status") == "complete":
        # Renamed only if they are, byte for byte, what the run wrote; an output already renamed is the user's.
        for key, nbytes, digest in (("partial", committed, "output_sha256"), ("rejects_partial", rejected, "rejects_sha256")):
            if paths[key].exists() and DIGEST in state:
                verified_prefix(paths[key], nbytes, progress[digest], paths["state"], whole=True)
        _finish(paths)
        if not out.exists():
            raise UsageError(f"{out}: the state file says complete but the output is missing",
                             hint="pass --overwrite to score again")
        return {"complete": True, "counts": progress.get("counts", {}), "format": state.get("format_detected")}
    hashes = {
        # The partial is made before the first state is written, so a missing one was removed by hand.
        "output": verified_prefix(paths["partial"], committed, progress["output_sha256"], paths["state"],
                                  must_exist=progress.get("input_line", 0) > 0),
        "rejects": verified_prefix(paths["rejects_partial"], rejected, progress["rejects_sha256"], paths["state"]),
    }
    if progress.get("input_line"):
        log.info(f"resuming {paths['partial']} after {src.unit} {progress['input_line']} "
                 f"({progress.get('counts', {}).get('rows_out', 0)} rows already scored)")
    return {
        "input_line": progress.get("input_line", 0),
        "input_offset": progress.get("input_offset"),
        "output_bytes": committed,
        "rejects_bytes": rejected,
        "counts": progress.get("counts", {}),
        "format_detected": state.get("format_detected"),
        "hashes": hashes,
        "group": progress.get("group"),
    }


PRMKIT_FIELDS = ("step_scores", "aggregates", "first_error", "truncated")


def _scored_line(obj: dict, res: StepScores, threshold: float, where: str) -> str:
    return _record_line(_scored_object(obj, res, threshold), where)


def _record_line(obj: dict, where: str) -> str:
    try:
        return dumps_record(obj) + "\n"
    except ValueError:  # the record was checked before scoring, so only a score can be NaN
        raise PrmkitError(f"{where}: the model gave a score that is not a number (NaN); stopped before writing it",
                          hint="a float16 model can overflow: try --dtype float32 (or bfloat16)") from None


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
