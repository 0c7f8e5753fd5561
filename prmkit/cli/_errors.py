"""Known errors become one actionable line and an exit code; only --debug shows a traceback."""

from __future__ import annotations

import functools
import os
from typing import Callable

import typer

from prmkit.cli._output import Output
from prmkit.errors import DataError, PrmkitError

MAX_PROBLEMS = 10


def debug_enabled() -> bool:
    return os.environ.get("PRMKIT_DEBUG", "") not in ("", "0", "false")


def report(err: PrmkitError, out: Output) -> None:
    out.error(err.message)
    if isinstance(err, DataError):
        for line in err.problems[:MAX_PROBLEMS]:
            out.error(f"  {line}")
        if len(err.problems) > MAX_PROBLEMS:
            out.error(f"  ... and {len(err.problems) - MAX_PROBLEMS} more")
    if err.hint:
        out.hint(err.hint)


def handle_errors(func: Callable) -> Callable:
    """Wrap a command so a PrmkitError prints its message and exits with its code, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PrmkitError as err:
            if debug_enabled():
                raise
            report(err, Output())
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            Output().error("interrupted")
            raise typer.Exit(130) from None

    return wrapper
