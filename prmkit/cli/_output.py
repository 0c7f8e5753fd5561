"""The one place that prints: results to stdout, progress, warnings, errors and hints to stderr.

Everything printed here goes through prmkit.core.redact: no token, password or URL credential reaches the terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console

from prmkit.core.redact import mask, redact


class MaskedStream:
    """A text stream that masks secrets in what is written to it and passes everything else through."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, flush, encoding, ... of the real stream
        return getattr(self._stream, name)


def _stdout() -> Console:
    # Built per call so that a redirected sys.stdout (CliRunner, pipes) is honoured.
    return Console(file=MaskedStream(sys.stdout), soft_wrap=True, highlight=False)


def stderr() -> Console:
    return Console(file=MaskedStream(sys.stderr), soft_wrap=True, highlight=False)


class Output:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode

    def result(self, data: dict[str, Any] | None = None, *renderables: Any) -> None:
        """Print a command's result: one JSON object with --json, else the rich renderables (or the data as text)."""
        if self.json_mode:
            from prmkit.core.jsonio import dumps

            payload = json.loads(dumps(data if data is not None else {}))  # plain types, so redact sees every string
            sys.stdout.write(dumps(redact(payload)) + "\n")
            sys.stdout.flush()
            return
        console = _stdout()
        if renderables:
            for item in renderables:
                console.print(item)
        elif data is not None:
            for key, value in data.items():
                console.print(f"{key}: {value}", markup=False)

    def text(self, text: str) -> None:
        text = mask(text)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")

    def info(self, message: str) -> None:
        stderr().print(message, markup=False)

    def warn(self, message: str) -> None:
        stderr().print(f"[yellow]warning:[/yellow] {_escape(message)}")

    def error(self, message: str) -> None:
        stderr().print(f"[red]error:[/red] {_escape(message)}")

    def hint(self, message: str) -> None:
        stderr().print(f"[dim]hint:[/dim] {_escape(message)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _ToOutput(logging.Handler):
    """Routes the library's `prmkit` logger to stderr, so library code never prints itself."""

    def __init__(self, out: Output):
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.out.warn(message)
        else:
            self.out.info(message)


def attach_logging(out: Output, verbose: bool = True) -> None:
    logger = logging.getLogger("prmkit")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _ToOutput)]
    logger.addHandler(_ToOutput(out))
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
