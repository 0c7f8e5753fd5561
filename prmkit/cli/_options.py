"""Options shared by several commands, defined once so every command spells them the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prmkit.config.load import unescape  # noqa: F401 - one reading of escapes for flags and config files

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
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.", envvar="PRMKIT_DEBUG")]
