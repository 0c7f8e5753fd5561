"""`prmkit prepare`: step-labelled data in, a tokenized and cached DatasetDict out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import (
    ConfigOpt,
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
def prepare(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the prepared DatasetDict.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    train: Annotated[str | None, typer.Option("--train", help="Training data (sets data.train).")] = None,
    eval_: Annotated[str | None, typer.Option("--eval", help="Evaluation data (sets data.eval).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer (sets model.tokenizer).")] = None,
    format_: FormatOpt = None,
    step_separator: StepSeparatorOpt = None,
    skip_invalid: SkipInvalidOpt = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Tokenize step-labelled data into a cached dataset, exactly as train, eval and score will.

    Example: prmkit prepare -c prmkit.yaml -o prepared/ --skip-invalid
    """
    out = Output(json_)
    attach_logging(out)
    cfg = load_config(
        config,
        set_,
        {
            "data.train": train,
            "data.eval": eval_,
            "model.tokenizer": tokenizer,
            "data.format": format_,
            "data.step_separator": unescape(step_separator),
            "data.skip_invalid": skip_invalid,
        },
    )
    from prmkit.data.prepare import prepare_splits  # numpy and the tokenizers: not for --help
    from prmkit.models.loading import load_tokenizer

    if not cfg.tokenizer_name:
        raise UsageError(
            "no tokenizer: set model.tokenizer or model.name_or_path", hint="e.g. --tokenizer Qwen/Qwen2-0.5B"
        )
    tok = load_tokenizer(cfg.tokenizer_name, cfg.model.trust_remote_code)
    with _Progress() as progress:
        result = prepare_splits(
            cfg,
            tok,
            output=output,
            skip_invalid=cfg.data.skip_invalid,
            overwrite=overwrite,
            on_progress=progress.update,
        )
    summary = {
        "output": str(result.path),
        "cache_hit": result.cache_hit,
        "rejects": str(result.rejects_path) if result.rejects_path else None,
        "splits": {name: r.to_dict() for name, r in result.reports.items()},
    }
    out.result(summary, *_tables(summary))


class _Progress:
    """Rows tokenized per split, rows/s and an ETA on stderr; rich draws nothing when stderr is not a terminal."""

    def __enter__(self) -> _Progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("tokenizing {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TimeRemainingColumn(),
            console=stderr(),
            transient=True,
            auto_refresh=False,
        )  # redrawn per chunk: no thread competing with tokenization
        self._tasks: dict[str, Any] = {}
        self._progress.start()
        return self

    def update(self, split: str, done: int, total: int) -> None:
        if split not in self._tasks:
            self._tasks[split] = self._progress.add_task(split, total=total)
        self._progress.update(self._tasks[split], completed=done, refresh=True)

    def __exit__(self, *exc) -> None:
        self._progress.stop()


def _tables(summary: dict) -> list:
    table = Table(title="prepared" + (" (cache hit: nothing re-tokenized)" if summary["cache_hit"] else ""))
    table.add_column("")
    splits = summary["splits"]
    for name in splits:
        table.add_column(name, justify="right")
    rows = [
        ("source", "source"),
        ("format", "format"),
        ("rows in", "rows_in"),
        ("rows rejected", "rows_rejected"),
        ("rows after conversion", "rows_converted"),
        ("rows dropped (all labels truncated)", "rows_dropped_truncated"),
        ("rows kept", "rows_kept"),
        ("steps", "steps"),
        ("steps lost to truncation", "steps_lost_to_truncation"),
        ("steps containing the separator", "steps_with_separator"),
        ("labels +", "labels_positive"),
        ("labels -", "labels_negative"),
        ("labels soft", "labels_soft"),
        ("soft label mean", "soft_label_mean"),
        ("tokens p50", "tokens_p50"),
        ("tokens p95", "tokens_p95"),
        ("tokens max", "tokens_max"),
    ]
    for title, key in rows:
        values = [splits[n].get(key) for n in splits]
        table.add_row(title, *[f"{v:.3f}" if isinstance(v, float) else str(v) for v in values])
    items = [table, f"saved to {summary['output']}"]
    if summary["rejects"]:
        items.append(f"rejected rows written to {summary['rejects']}")
    return items
