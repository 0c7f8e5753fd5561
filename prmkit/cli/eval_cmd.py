"""`prmkit eval`: score labelled data with one or more PRMs and write a report (JSON, Markdown, plots)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

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


@handle_errors
def evaluate(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model directories or Hub ids; several are compared side by side.", metavar="MODEL", show_default=False
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            "-d",
            help="Evaluation data (repeatable): a file, saved dataset or Hub id; "
            "named by its file stem or Hub split, or NAME=SRC. Sets eval.data.",
            metavar="SRC",
        ),
    ] = None,
    model_opt: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Another model to evaluate (repeatable).", metavar="MODEL")
    ] = None,
    format_: FormatOpt = None,
    step_separator: StepSeparatorOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="A step is judged correct when its score is >= this (sets eval.threshold; default 0.5).",
        ),
    ] = None,
    tune_threshold: Annotated[
        str | None,
        typer.Option(
            "--tune-threshold",
            metavar="SUBSET",
            help="Pick the threshold that maximises first-error F1 on "
            "this subset and apply it to all (sets eval.tune_threshold).",
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            "-o",
            help="Where report.json, report.md and plots go (sets eval.output_dir; default ./eval).",
        ),
    ] = None,
    plots: Annotated[
        bool | None,
        typer.Option(
            "--plots/--no-plots",
            help="Write PNG plots (sets eval.plots; default: when "
            "matplotlib is installed, else a warning; --plots requires it).",
        ),
    ] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    skip_invalid: SkipInvalidOpt = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate PRMs: step metrics, ProcessBench first-error F1, outcome and Best-of-N accuracy.

    Examples:

      prmkit eval runs/prm --data processbench/gsm8k.json --data processbench/math.json -o eval/

      prmkit eval runs/prm-a runs/prm-b --data gsm8k.json --tune-threshold gsm8k -o compare/

    An output directory holding only an earlier report is replaced; any other non-empty one needs --overwrite.

    (Over 100 lines because its signature declares the command's options, one per parameter.)
    """
    out = Output(json_)
    attach_logging(out)
    if threshold is not None and tune_threshold is not None:
        raise UsageError("--threshold and --tune-threshold exclude each other", hint="give one of them")
    cfg = load_config(
        config,
        set_,
        {
            "eval.data": data,
            "eval.format": format_,
            "eval.threshold": threshold,
            "eval.tune_threshold": tune_threshold,
            "eval.output_dir": str(output_dir) if output_dir is not None else None,
            "eval.plots": plots,
            "eval.dtype": dtype,
            "eval.device": device,
            # The data options prepare and train take, on the same keys.
            "data.step_separator": unescape(step_separator),
            "data.skip_invalid": skip_invalid,
        },
    )
    ev = cfg.eval
    names = [*(models or []), *(model_opt or [])]
    if not names and cfg.model.name_or_path:
        names = [cfg.model.name_or_path]
    if not names:
        raise UsageError("no model to evaluate", hint="e.g. prmkit eval runs/prm --data gsm8k.json")
    if not ev.data:
        raise UsageError("no evaluation data", hint="pass --data FILE (repeatable) or set eval.data")

    from prmkit import api
    from prmkit.evaluation.write import check_output_dir

    out_dir = Path(ev.output_dir).expanduser()
    check_output_dir(out_dir, overwrite, models=names, data=ev.data, config=str(config) if config is not None else None)
    plots = _plots(ev.plots)

    # Under `accelerate launch` every process scores a share and receives all scores; one of them speaks and writes.
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        logging.getLogger("prmkit").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise beside our own progress

    from prmkit.scoring import end_distributed

    with _progress(enabled=main) as progress:
        try:
            # --threshold beats tuning asked for in a config (api.evaluate's rule for its threshold argument).
            result = api.evaluate(cfg, models=names, threshold=threshold, progress=progress)
        finally:
            end_distributed()
    if main:
        _write(out, result, out_dir, names, plots, warn_no_plots=ev.plots is None and not plots)


def _plots(asked: bool | None) -> bool:
    """Whether to write plots: asked for (refused now, before any scoring, when matplotlib is missing), refused, or
    (None) when matplotlib is installed."""
    from prmkit.evaluation.write import check_plotting

    if asked:
        check_plotting()
    elif asked is None:
        return _plotting_available()
    return bool(asked)


def _write(out: Output, result, out_dir: Path, names: list[str], plots: bool, warn_no_plots: bool) -> None:
    """Write the report files and plots, print the report, and say what was written and what to do next."""
    from prmkit.core.filenames import REJECTS_FILE
    from prmkit.evaluation.render import rich_tables
    from prmkit.evaluation.write import write_outputs

    files = write_outputs(result, out_dir, plots=plots)
    out.result(
        {**result.report, "output_dir": str(out_dir), "files": [str(p) for p in files]}, *rich_tables(result.report)
    )
    out.info(f"wrote {', '.join(p.name for p in files)} to {out_dir}")
    if warn_no_plots:
        out.warn("no plots: matplotlib is not installed; pip install 'prmkit[plot]' adds them (--no-plots: no warning)")
    if result.rejects:
        out.warn(f"{len(result.rejects)} invalid rows skipped; see {out_dir / REJECTS_FILE}")
    report_path = out_dir / "report.json"
    if len(names) == 1:
        out.hint(f"to put these figures in the model card: prmkit push {names[0]} --eval-report {report_path}")
    else:
        out.hint(
            f"to put a model's figures in its card: prmkit push MODEL --eval-report {report_path} "
            "(push quotes that model's part of the comparison)"
        )


def _plotting_available() -> bool:
    from prmkit.evaluation.report import MissingExtraError
    from prmkit.evaluation.write import check_plotting

    try:
        check_plotting()
    except MissingExtraError:
        return False
    return True


class _progress:
    """A transient progress bar on stderr, drawn only on a terminal (logs and pipes stay clean)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Any = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        console = stderr()
        if self.enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("scoring {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
        return self if self._bar is not None else None

    def __call__(self, description: str, done: int, total: int) -> None:
        assert self._bar is not None
        if description not in self._tasks:
            self._tasks[description] = self._bar.add_task(description, total=total)
        self._bar.update(self._tasks[description], completed=done)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
