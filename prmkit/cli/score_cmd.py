"""`prmkit score`: a PRM scores every step of every solution in a JSONL file (or any source `prepare` reads)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    JsonOpt,
    OverwriteOpt,
    SetOpt,
    SkipInvalidOpt,
    StepSeparatorOpt,
    unescape,
)
from prmkit.cli._output import Output, attach_logging, stderr
from prmkit.config.load import load_config
from prmkit.errors import UsageError

if TYPE_CHECKING:
    from prmkit.scoring import ScoreSummary


@handle_errors
def score(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="A prmkit output directory, a transformers model directory, or a Hub id."),
    ],
    input_: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="JSONL with prompt + completions (or problem + steps), any format `prepare` reads, or '-' for stdin.",
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="JSONL file to write, or '-' for stdout.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    step_separator: StepSeparatorOpt = None,
    format_: FormatOpt = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="First error = first step scoring below this (score.threshold).")
    ] = None,
    batch_tokens: Annotated[
        int | None, typer.Option("--batch-tokens", help="Token budget of one forward batch (score.batch_tokens).")
    ] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    skip_invalid: SkipInvalidOpt = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            "--group-by",
            metavar="FIELD",
            help="Rank the lines sharing this field's value (their lines must be together): adds rank (1 = best) and "
            "group_size (score.group_by).",
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select", metavar="best", help="With --group-by: write only each group's best line (score.select)."
        ),
    ] = None,
    aggregate: Annotated[
        str | None,
        typer.Option(
            "--aggregate",
            metavar="min|prod|last|mean",
            help="What ranks a group's lines (score.aggregate; default min).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Score every step of every solution: adds step_scores, aggregates and first_error to each line.

    Re-running the same command after an interruption continues where it stopped.

    Examples:

      prmkit score runs/prm solutions.jsonl -o scored.jsonl

      prmkit score runs/prm candidates.jsonl -o best.jsonl --group-by problem_id --select best --aggregate min

      cat solutions.jsonl | prmkit score runs/prm - -o - > scored.jsonl

      accelerate launch -m prmkit score runs/prm solutions.jsonl -o scored.jsonl

    (Over 100 lines because its signature declares the command's options, one per parameter.)
    """
    from prmkit.scoring.timings import Timings

    timings = Timings.since_process_start()
    out = Output(json_)
    attach_logging(out)  # before the config, whose warnings (a separator's escapes) go through it
    cfg = load_config(
        config,
        set_,
        {
            "score.threshold": threshold,
            "score.batch_tokens": batch_tokens,
            "score.dtype": dtype,
            "score.device": device,
            "score.format": format_,
            "score.skip_invalid": skip_invalid,
            "score.group_by": group_by,
            "score.select": select,
            "score.aggregate": aggregate,
        },
    )
    from prmkit import api

    api.check_score_file(cfg, input_, output)  # the group settings, and an output that is the input: before loading
    if json_ and output == "-":
        raise UsageError("--json needs --output FILE: with --output - stdout carries the scored lines")
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("prmkit").setLevel(logging.ERROR)  # one process speaks for all

    from transformers.utils import logging as hf_logging

    from prmkit.scoring import end_distributed
    from prmkit.scoring.settings import ScorerSettings

    hf_logging.disable_progress_bar()  # a weight-loading bar per process is noise beside our own progress

    # Loaded here rather than by api.score_file: the progress display needs to know which process speaks.
    scorer = ScorerSettings.from_config(cfg, "score").load(
        model, step_separator=unescape(step_separator), timings=timings
    )
    main = scorer.is_main_process
    progress = _Progress(total=_total(input_) if main else None, enabled=main)
    try:
        summary = api.score_file(
            cfg,
            input_,
            output,
            model=scorer,
            overwrite=overwrite,
            stdout=sys.stdout,
            on_progress=progress.lines if main else None,
            on_steps=progress.steps if main else None,
            on_reject=lambda where: out.warn(f"rejected {where}"),
        )
    finally:
        progress.stop()
        end_distributed()
    if main:
        _say(out, summary, output, json_)


def _say(out: Output, summary: ScoreSummary, output: str, json_: bool) -> None:
    """What was scored and written, on stderr; with --json the summary on stdout."""
    data = summary.to_dict()
    if summary.already_complete:
        out.info(f"{output} is already complete ({data['rows_out']} rows); nothing to do (--overwrite scores again)")
    else:
        rate = f"{data['lines_per_s']} lines/s, {data['steps_per_s']} steps/s" if data["lines_per_s"] else ""
        parts = [f"resumed after line {summary.resumed_at_line}"] if summary.resumed_at_line else []
        if summary.batches_reused:
            parts.append(f"{summary.batches_reused} batches reused from the interrupted run")
        resumed = f" ({'; '.join(parts)})" if parts else ""
        out.info(
            f"scored {data['lines_scored']} of {data['lines_in']} lines{resumed}: {data['rows_out']} rows, "
            f"{data['steps']} steps in {data['seconds']:.1f} s ({rate}); {data['lines_rejected']} rejected"
        )
    if summary.group_by and not summary.already_complete:
        g = summary.group_by
        what = "the best line of each" if g["select"] == "best" else "every line, ranked, of"
        out.info(
            f"wrote {what} {g['groups_written']} groups ({g['field']}, by {g['aggregate']} step score; the "
            f"largest held {g['max_group_lines']} lines)"
        )
    if data["rows_truncated"]:
        out.warn(
            f"{data['rows_truncated']} rows lost {data['steps_truncated']} steps to max_length: "
            'their step_scores hold null and the line says "truncated": true'
        )
    if summary.rejects:
        out.info(f"rejected lines written to {summary.rejects}")
    if output != "-":
        out.info(f"wrote {output}")
        if json_:
            out.result(data)


def _total(spec: str) -> int | None:
    if spec == "-":
        return None
    try:
        from prmkit.scoring import InputSource

        return InputSource(spec).total()
    except Exception:  # only an ETA depends on it; reading errors surface when scoring starts
        return None


class _Progress:
    """Lines/s, steps/s and an ETA on stderr while scoring; rich hides it when stderr is not a terminal."""

    def __init__(self, total: int | None, enabled: bool):
        self.enabled = enabled
        self.started = time.perf_counter()
        self.n_steps = 0
        self.n_lines = 0
        self._progress: Any = None
        self._task: Any = None
        self.total = total

    def _start(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        columns: list[Any] = [
            TextColumn("scoring"),
            BarColumn() if self.total else TextColumn(""),
            TextColumn("{task.completed}/{task.total} lines" if self.total else "{task.fields[lines]} lines"),
            TextColumn("{task.fields[lines_rate]} lines/s, {task.fields[steps_rate]} steps/s"),
        ]
        if self.total:
            columns.append(TimeRemainingColumn())
        self._progress = Progress(*columns, console=stderr(), transient=False)
        self._task = self._progress.add_task("score", total=self.total, lines=0, lines_rate="-", steps_rate="-")
        self._progress.start()

    def _refresh(self, line: int | None = None) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._start()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        fields = {
            "lines": self.n_lines,
            "lines_rate": f"{self.n_lines / elapsed:.1f}",
            "steps_rate": f"{self.n_steps / elapsed:.1f}",
        }
        if line is not None:
            fields["completed"] = line
        self._progress.update(self._task, **fields)

    def steps(self, n: int) -> None:
        self.n_steps += n
        self._refresh()

    def lines(self, info: dict) -> None:
        self.n_lines = info["lines_this_run"]
        self.n_steps = info["steps_this_run"]  # exact, and across processes (per-batch counts are this process's)
        self._refresh(info["line"])

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
