"""The root `prmkit` app: one module per command, registered here."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from prmkit import __version__
from prmkit.cli import config_cmd, eval_cmd, prepare_cmd, push_cmd, score_cmd, train_cmd
from prmkit.cli._errors import mask_stderr
from prmkit.memory import use_expandable_segments

app = typer.Typer(
    name="prmkit",
    help="Train, evaluate, score and publish process-supervised reward models (PRMs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    if debug:
        os.environ["PRMKIT_DEBUG"] = "1"
    # prmkit draws its own progress on stderr; datasets' per-save bars would only interleave with it.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Before anything imports torch: the CUDA allocator reads its settings once, and processes launched from here
    # (accelerate launch, --num-processes) inherit them.
    use_expandable_segments()


app.command("prepare", no_args_is_help=False)(prepare_cmd.prepare)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)
app.command("score")(score_cmd.score)
app.command("push")(push_cmd.push)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    mask_stderr()
    app()


if __name__ == "__main__":
    main()
