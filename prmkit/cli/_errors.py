"""Known errors become one actionable line and an exit code; only --debug shows a traceback, with secrets masked.

Besides prmkit's own errors, the environment's failures are mapped here, in one place: file-system errors
(`OSError`: permission denied, read-only file system, full disk, ...) and malformed JSON that reached the top.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import typer

from prmkit.cli._options import DebugOpt
from prmkit.cli._output import MaskedStream, Output
from prmkit.core.atomic import TEMP_SUFFIX
from prmkit.core.redact import mask
from prmkit.errors import ConfigError, DataError, PrmkitError, first_line, write_failure

MAX_SHOWN_PROBLEMS = 10  # problem lines printed under an error; the rest are counted

_ELSEWHERE = (
    "write somewhere else: the command's output option, data.cache_dir or $PRMKIT_CACHE for prepared "
    "data, $HF_HOME for downloads"
)
_FULL = "free some space or write somewhere else, then run the same command again"
# What running again does after a full disk, where it is more than starting over (the command's function name).
_FULL_AGAIN = {
    "score": "; it resumes where it stopped",
    "train": " with --resume in place of any --overwrite, to continue from the last complete checkpoint",
}

# errno -> (what happened, what to do)
_OS_ERRORS: dict[int, tuple[str, str | None]] = {
    errno.EACCES: ("permission denied", f"check the permissions there, or (for an output) {_ELSEWHERE}"),
    errno.EPERM: ("operation not permitted", f"check the permissions there, or (for an output) {_ELSEWHERE}"),
    errno.EROFS: ("read-only file system", _ELSEWHERE),
    errno.ENOSPC: ("no space left on device", _FULL),
    errno.EDQUOT: ("disk quota exceeded", _FULL),
    errno.ENOENT: ("no such file or directory", None),
    errno.ENOTDIR: ("a part of this path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory, not a file", "check the path"),
    errno.EEXIST: ("already exists (a file where a directory is needed?)", "check the path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "check the links along the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.ENFILE: ("too many open files in the system", "close other programs and run again"),
    errno.EIO: ("input/output error", "the disk or network file system failed; check it and run again"),
    errno.EFBIG: ("file too large for this file system", _ELSEWHERE),
}


def debug_enabled() -> bool:
    return os.environ.get("PRMKIT_DEBUG", "") not in ("", "0", "false")


def report(err: PrmkitError, out: Output) -> None:
    out.error(err.message)
    if isinstance(err, (DataError, ConfigError)):
        for line in err.problems[:MAX_SHOWN_PROBLEMS]:
            out.error(f"  {line}")
        if len(err.problems) > MAX_SHOWN_PROBLEMS:
            out.error(f"  ... and {len(err.problems) - MAX_SHOWN_PROBLEMS} more")
    if err.hint:
        out.hint(err.hint)


def describe_os_error(err: OSError, command: str | None = None) -> tuple[str, str | None]:
    """One line naming the path and what went wrong, and a hint (for ``command``, where it depends on the command)."""
    what, hint = _OS_ERRORS.get(err.errno or -1, (None, None))
    if hint == _FULL:
        hint += _FULL_AGAIN.get(command or "", "")
    if what is None:
        what = err.strerror or first_line(err)
    if err.filename is None:
        return what, hint
    path = Path(os.fsdecode(err.filename))
    # prmkit's hidden temporary names (a file, or a directory a whole output is built in) mean nothing to a user; the
    # directory they go in does.
    temp = next(
        (p for p in reversed((path, *path.parents)) if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)),
        path if path.name.startswith(".") else None,
    )
    if temp is not None:
        return f"{os.path.abspath(temp.parent)}: cannot write here: {what}", hint
    where = f"{path} -> {os.fsdecode(err.filename2)}" if err.filename2 is not None else str(path)
    return f"{where}: {what}", hint


def describe_json_error(err: json.JSONDecodeError) -> tuple[str, str | None]:
    return (
        f"malformed JSON ({err.msg} at line {err.lineno} column {err.colno})",
        "a JSON file prmkit read is damaged; run it again as `prmkit --debug COMMAND ...` to see which",
    )


def _broken_pipe() -> None:
    # The reader went away (`prmkit score ... -o - | head`): say so once, and let nothing else write to the pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    Output().error("the output pipe was closed before everything was written")


def mask_stderr() -> None:
    """From here on, mask secrets in everything that reaches stderr: tracebacks, and libraries' logs and warnings.

    Called once by the CLI's entry point. stdout is left alone: `score -o -` writes the user's data there.
    """
    if not isinstance(sys.stderr, MaskedStream):
        sys.stderr = MaskedStream(sys.stderr)
    sys.excepthook = _masked_excepthook


def _masked_excepthook(exc_type, exc, tb) -> None:
    sys.stderr.write(mask("".join(traceback.format_exception(exc_type, exc, tb))))
    sys.stderr.flush()


def handle_errors(func: Callable) -> Callable:
    """Wrap a command so a known error prints one line (and a hint) and exits with its code, without a traceback.

    The command also takes ``--debug`` after its name (``prmkit score ... --debug``), as the root does before it.
    """

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        if debug:
            os.environ["PRMKIT_DEBUG"] = "1"
        try:
            return func(*args, **kwargs)
        except PrmkitError as err:
            if debug_enabled():
                raise
            report(err, Output())
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:
            if debug_enabled():
                raise
            signum = getattr(err, "signum", signal.SIGINT)
            Output().error(f"interrupted ({signal.Signals(signum).name})")
            raise typer.Exit(128 + signum) from None
        except BrokenPipeError:
            if debug_enabled():
                raise
            _broken_pipe()
            raise typer.Exit(1) from None
        except (OSError, json.JSONDecodeError) as err:
            if debug_enabled():
                raise
            message, hint = (
                describe_os_error(err, func.__name__) if isinstance(err, OSError) else describe_json_error(err)
            )
            report(PrmkitError(message, hint=hint), Output())
            raise typer.Exit(1) from None
        except Exception as err:
            # safetensors and torch report a failed write (a full disk) as their own errors, not OSError.
            why = write_failure(err)
            if why is None or debug_enabled():
                raise
            report(PrmkitError(f"cannot write a file: {why}", hint=f"free some space, or {_ELSEWHERE}"), Output())
            raise typer.Exit(1) from None

    # Typer reads the options from the signature: the command's own, then --debug.
    signature = inspect.signature(func, eval_str=True)
    debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), debug]
    )
    return wrapper
