"""Options shared by several commands, defined once so every command spells them the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prmkit.config.load import unescape  # noqa: F401 - one reading of escapes for flags and config files
from prmkit.data.formats import format_choices

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see `prmkit config init`).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set section.key=value (repeatable).", metavar="KEY=VALUE"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
SkipInvalidOpt = Annotated[
    bool | None,
    typer.Option(
        "--skip-invalid/--no-skip-invalid", help="Write bad rows to a rejects file and go on, instead of stopping."
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output instead of refusing.")]
StepSeparatorOpt = Annotated[
    str | None, typer.Option("--step-separator", help=r"Step separator; backslash escapes such as '\n' are understood.")
]
FormatOpt = Annotated[str | None, typer.Option("--format", help=" | ".join(format_choices()) + ".")]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU).")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.", envvar="PRMKIT_DEBUG")]
