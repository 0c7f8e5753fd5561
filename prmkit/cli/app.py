"""The root `prmkit` app: one module per command, registered here."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from prmkit.cli import config_cmd, eval_cmd, prepare_cmd, push_cmd, score_cmd, serve_cmd, train_cmd
from prmkit.cli._errors import mask_stderr
from prmkit.core.version import __version__
from prmkit.models.memory import use_expandable_segments

app = typer.Typer(
    name="prmkit",
    help="Train, evaluate, score and publish process-supervised reward models (PRMs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: rich's tables cut long option names and words short at 80 columns ("--no-skip-inval…").
    rich_markup_mode=None,
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


# Short lines for `prmkit --help`, which would otherwise cut each docstring's first sentence at 80 columns.
app.command("prepare", no_args_is_help=False, short_help="Tokenize step-labelled data into a cached dataset.")(
    prepare_cmd.prepare
)
app.command("train", short_help="Train a PRM into a self-describing model directory.")(train_cmd.train)
app.command("eval", short_help="Evaluate PRMs: step metrics, ProcessBench F1, Best-of-N.")(eval_cmd.evaluate)
app.command("score", short_help="Score every step of every solution in a JSONL file.")(score_cmd.score)
app.command("serve", short_help="Serve a PRM's step scores over HTTP (RL rewards, test-time search).")(serve_cmd.serve)
app.command("push", short_help="Publish a model directory and its card to the Hub.")(push_cmd.push)
app.add_typer(config_cmd.app, name="config", short_help="Write a config template or show a resolved config.")


def main() -> None:
    mask_stderr()
    try:
        app()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            leave(e.code or 0)
        raise


def leave(code: int) -> None:
    """End the process once the command is done, without tearing down the interpreter.

    Freeing torch, transformers and a loaded model module by module takes longer than many a command's work (0.9 s of
    a `prmkit score` on a CPU; a CUDA context takes longer still). Every output is closed and synced by then, so the
    exit handlers are run and the standard streams and logs flushed, and the process ends at once. With threads
    still running (none of prmkit's own), the normal shutdown waits for them instead.
    """
    import atexit
    import logging
    import sys
    import threading

    if threading.active_count() > 1:
        return
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:
        return
    run_exit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: what could be said has been said
    os._exit(code)


if __name__ == "__main__":
    main()
