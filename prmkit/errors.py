"""The exceptions prmkit raises for problems a user can fix.

The CLI maps each to a one-line message and an exit code (see ``prmkit/cli/_errors.py``); library callers catch them
like any exception. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import reprlib
from collections.abc import Iterator, Mapping
from typing import Any

_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def named_first_line(exc: BaseException) -> str:
    """``"Type: first line"``, or just the type's name when the message is empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def write_failure(exc: BaseException) -> str | None:
    """Why safetensors or torch could not write a file (``"no space left on device"``), or None for any other error.

    Neither raises OSError for a failed write: safetensors raises ``SafetensorError("Error while serializing: I/O
    error: No space left on device (os error 28)")``, torch a RuntimeError from its zip writer (``"[enforce fail at
    inline_container.cc:672] . unexpected pos 576 vs 534"``, or ``"PytorchStreamWriter failed writing file ..."``),
    which names no errno at all.
    """
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        found = _OS_ERROR.search(text)
        return os.strerror(int(found.group(1))).lower() if found else None
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "a file could not be written (is the disk full?)"
    return None


SHOWN_CHARS = 300
"""How much of a value a message shows: a user's value can be megabytes (a long string, a YAML alias bomb)."""


class _Shown(reprlib.Repr):
    """``repr`` that stops early: bounded work and length whatever the value's size or nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset = 4, 12, 12, 12, 12
        self.maxdict, self.maxstring, self.maxlong, self.maxother = 12, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS

    def repr_dict(self, x: dict, level: int) -> str:
        # reprlib sorts the keys; a message should show them as the user wrote them.
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in list(x.items())[: self.maxdict]]
        return "{" + ", ".join(items) + (", ..." if len(x) > self.maxdict else "") + "}"


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters (the same as ``repr`` for a short value)."""
    text = _Shown().repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PrmkitError(Exception):
    """A failure while running: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(PrmkitError):
    """Bad usage or bad input: exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override that does not fit the schema; ``problems`` lists them when there are several."""

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint=hint)
        self.problems = list(problems or [])


class DataError(UsageError):
    """Input data that cannot be read or does not fit its format.

    ``problems`` holds one line per bad row (up to a limit), each naming the source, the row, the field and the reason.
    """

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = list(problems or [])


class TrainingOutOfMemory(PrmkitError):
    """The device ran out of memory while training; the message names the fixes and the checkpoint kept."""


class Interrupted(KeyboardInterrupt):
    """A second stop signal while a run was already stopping: ends it at once. The CLI exits with 128 + ``signum``
    (130 for SIGINT, 143 for SIGTERM), as shells and job schedulers expect."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def reworded(flags: Mapping[str, str]) -> Iterator[None]:
    """Say what the code inside says in another command's terms: each ``--flag`` in ``flags`` is replaced, in the
    errors raised and in the `prmkit` logger's records, by what that command takes instead (``--set key=value``).

    For code shared by commands with different options: `prmkit train` pushes with the Hub code of `prmkit push`,
    whose hints name push's flags.
    """
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(f)}(?![\w-])" for f in sorted(flags, key=len, reverse=True)))

    def swap(text: str) -> str:
        return pattern.sub(lambda m: flags[m.group(0)], text) if text else text

    class Swap(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args = swap(record.getMessage()), None
            return True

    logger, swapper = logging.getLogger("prmkit"), Swap()
    logger.addFilter(swapper)
    try:
        yield
    except PrmkitError as e:
        e.message, e.hint = swap(e.message), swap(e.hint) if e.hint else e.hint
        e.args = (e.message,)
        raise
    finally:
        logger.removeFilter(swapper)
