"""The exceptions prmkit raises for problems a user can fix.

The CLI maps each to a one-line message and an exit code (see ``prmkit/cli/_errors.py``); library callers catch them
like any exception. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, Mapping


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


class NotImplementedYet(PrmkitError):
    def __init__(self, what: str):
        super().__init__(f"`prmkit {what}` is not implemented yet.")


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

    def swap(text: str | None) -> str | None:
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
        e.message, e.hint = swap(e.message), swap(e.hint)
        e.args = (e.message,)
        raise
    finally:
        logger.removeFilter(swapper)
