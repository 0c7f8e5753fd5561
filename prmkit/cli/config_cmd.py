"""`prmkit config init|show`: write the commented template, print the resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import ConfigOpt, JsonOpt, OverwriteOpt, SetOpt
from prmkit.cli._output import Output, attach_logging
from prmkit.cli.config_show import derived_settings, show_config
from prmkit.config.load import load_config, render_template
from prmkit.errors import UsageError

app = typer.Typer(help="Write a config template or show a resolved config.", no_args_is_help=True)


@app.command("init")
@handle_errors
def init(
    path: Annotated[Path | None, typer.Argument(help="Where to write the template; '-' or nothing prints it.")] = None,
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


@app.command("show", short_help="Print the config a command will use, derived values marked.")
@handle_errors
def show(config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Print the config a command will use: defaults < --config file < --set overrides, with the values commands
    derive from it (model.tiny's learning rate, train.example's data, a PRM kind's defaults) marked "# derived".

    With --json, "derived" maps each derived key to what it comes from.

    Example: prmkit config show -c prmkit.yaml --set data.max_length=2048
    """
    out = Output(json_)
    attach_logging(out)
    cfg = load_config(config, set_)
    sections, text = show_config(cfg)
    if json_:
        out.result({**sections, "derived": {dotted: why for dotted, _value, why in derived_settings(cfg)}})
    else:
        out.text(text)
