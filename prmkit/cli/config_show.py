"""What a command will use: the config with the values commands derive from it (`prmkit config show`).

Commands fill in some keys themselves: ``model.tiny`` and ``train.example`` set what the user left unset (train's
learning rate among them), the PRM kinds have their authors' defaults, and train evaluates on a schedule of its own.
Nothing here builds or loads anything, so `config show` answers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prmkit.config.load import dump_config
from prmkit.config.schema import SECTIONS, Config, eval_schedule
from prmkit.core.redact import redact
from prmkit.training.example import example_settings, put, tiny_settings

BUILT = object()
"""A derived value known only once it is built (the tiny model's directory): shown as a comment, not a value."""


def derived_settings(cfg: Config) -> list[tuple[str, Any, str]]:
    """The values commands derive from the config, as ``(dotted key, value, from what)``, in the order train derives
    them; the value is :data:`BUILT` when it exists only once train has built it."""
    from prmkit.kinds.registry import find_kind

    view = dataclasses.replace(
        cfg,
        training_arguments=dict(cfg.training_arguments),
        explicit=set(cfg.explicit),
        **{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS},
    )
    out: list[tuple[str, Any, str]] = []

    def derive(items: dict[str, Any], why: str) -> None:
        for dotted, value in items.items():
            out.append((dotted, value, why))
            put(view, dotted, value)

    if cfg.model.tiny and not cfg.model.name_or_path:
        out.append(
            (
                "model.name_or_path",
                BUILT,
                f"model.tiny: a tiny {cfg.model.tiny} model for model.tokenizer, built when train starts",
            )
        )
        derive(tiny_settings(view), "model.tiny")
    if cfg.train.example:
        if not view.model.name_or_path:
            out.append(("model.name_or_path", BUILT, "train.example: a tiny Qwen2 model, built when train starts"))
        derive(example_settings(view), "train.example")
    # The kind whose defaults fill model.step_tag and model.system_prompt: model.kind's, else train.kind's.
    tagged = [
        (key, k)
        for key, name in (("model.kind", cfg.model.kind), ("train.kind", cfg.train.kind))
        if (k := find_kind(name)) is not None and k.uses_step_tag
    ]
    if tagged:
        where, kind = tagged[0]
        if cfg.model.step_tag is None:
            derive({"model.step_tag": kind.default_tag}, f"{where} {kind.name}")
        if kind.default_system_prompt is not None and cfg.model.system_prompt is None:
            derive({"model.system_prompt": kind.default_system_prompt}, f"{where} {kind.name}")
    ta = view.training_arguments
    for key, value in eval_schedule(ta, bool(view.data.eval)).items():
        if ta.get(key, "no") != value:
            why = (
                "no data.eval"
                if not view.data.eval
                else "train.save_steps, as data.eval is set"
                if key == "eval_steps"
                else "data.eval is set"
            )
            derive({f"train.{key}": value}, why)
    for section in ("eval", "score"):
        if getattr(cfg, section).dtype == "auto" and cfg.model.dtype != "auto":
            derive({f"{section}.dtype": cfg.model.dtype}, "model.dtype")
    return out


def show_config(cfg: Config) -> tuple[dict[str, dict[str, Any]], str]:
    """What `prmkit config show` prints: the config with the derived values in (as a dict, and as YAML whose derived
    lines say what they come from, e.g. ``learning_rate: 0.002  # derived: model.tiny``)."""
    derived = derived_settings(cfg)
    view = dataclasses.replace(
        cfg,
        training_arguments=dict(cfg.training_arguments),
        **{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS},
    )
    notes: dict[tuple[str, str], str] = {}
    for dotted, value, why in derived:
        if value is not BUILT:
            put(view, dotted, value)
        section, _, key = dotted.partition(".")
        notes[(section, key)] = why
    lines, section = [], ""
    for line in dump_config(view).splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            note = notes.get((section, line.strip().partition(":")[0]))
            if note:
                line += f"  # derived: {note}"
        lines.append(line)
    return redact(view.to_dict()), "\n".join(lines) + "\n"
