"""`prmkit config init|show`: write the commented template, print the resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import ConfigOpt, JsonOpt, OverwriteOpt, SetOpt
from prmkit.cli._output import Output
from prmkit.config import dump_config, load_config, render_template
from prmkit.errors import UsageError

app = typer.Typer(help="Write a config template or show a resolved config.", no_args_is_help=True)


@app.command("init")
@handle_errors
def init(
    path: Annotated[Optional[Path], typer.Argument(help="Where to write the template; '-' or nothing prints it.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a commented template holding every key with its default.

    Example: prmkit config init prmkit.yaml
    """
    text = render_template()
    if path is None or str(path) == "-":
        Output().text(text)
        return
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    path.write_text(text, encoding="utf-8")
    Output().info(f"wrote {path}")


@app.command("show")
@handle_errors
def show(config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Print the resolved config: defaults < --config file < --set overrides.

    Example: prmkit config show -c prmkit.yaml --set data.max_length=2048
    """
    cfg = load_config(config, set_)
    out = Output(json_)
    if json_:
        out.result(cfg.to_dict())
    else:
        out.text(dump_config(cfg))
