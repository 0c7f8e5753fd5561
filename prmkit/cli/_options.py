"""Options shared by several commands, defined once so every command spells them the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config file (see `prmkit config init`).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config key: --set section.key=value (repeatable).", metavar="KEY=VALUE"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
SkipInvalidOpt = Annotated[
    Optional[bool],
    typer.Option("--skip-invalid/--no-skip-invalid", help="Write bad rows to a rejects file and go on, instead of stopping."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output instead of refusing.")]
StepSeparatorOpt = Annotated[
    Optional[str],
    typer.Option("--step-separator", help=r"Step separator; backslash escapes such as '\n' are understood."),
]
FormatOpt = Annotated[
    Optional[str],
    typer.Option("--format", help="auto | stepwise | math-shepherd | prm800k | processbench."),
]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU).")
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")]


def unescape(text: str | None) -> str | None:
    r"""Turn the escapes a shell user types ('\n', '\t', '\\') into the characters they mean."""
    if text is None or "\\" not in text:
        return text
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
