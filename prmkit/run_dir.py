"""A training output directory: one run per directory, planned before anything is touched, resumed only when it is the same run."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from prmkit.atomic import write_atomic
from prmkit.config import TRAINING_ARGUMENT_DEFAULTS, Config, dump_config
from prmkit.errors import UsageError
from prmkit.modeling import (
    CONFIG_YAML,
)

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger("prmkit")

FINAL_TMP = ".prmkit-final"

# Keys that may change between a run and its resumption: where it writes, how often it logs/saves/evaluates, how
# long it runs. Anything else changing means a different run.
_VOLATILE_TRAIN_KEYS = {
    "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "logging_steps", "logging_strategy",
    "logging_first_step", "save_steps", "save_strategy", "save_total_limit", "eval_steps", "eval_strategy",
    "report_to", "disable_tqdm", "push_to_hub", "run_name", "log_level", "log_level_replica",
    "per_device_eval_batch_size", "eval_on_start", "ddp_timeout",
}
_VOLATILE_PREFIXES = ("hub_", "dataloader_")
_VOLATILE_DATA_KEYS = {"num_proc", "cache_dir"}



# ---------------------------------------------------------------------------------------------------------------------
# Output directory: one run per directory


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The keys that make two configs the same run (model, data, training), without where/how often it writes."""
    flat = _flatten(json.loads(json.dumps(config_dict, default=str)))
    keep: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in ("model", "data", "train"):
            continue
        if section == "train" and (name in _VOLATILE_TRAIN_KEYS or name.startswith(_VOLATILE_PREFIXES)):
            continue
        if section == "data" and name in _VOLATILE_DATA_KEYS:
            continue
        keep[key] = value
    return keep


@dataclass
class OutputPlan:
    output_dir: Path
    action: str  # fresh | overwrite | resume
    checkpoint: str | None = None


def _is_dangerous_to_delete(path: Path) -> bool:
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    return resolved in (Path(resolved.anchor), Path.home().resolve()) or resolved == cwd or resolved in cwd.parents


def plan_output_dir(cfg: Config, overwrite: bool = False, resume: bool | str | None = None) -> OutputPlan:
    """Decide what to do with the output directory, without touching it; raises UsageError when it is not ours.

    An empty or missing directory starts fresh. One holding this same run (same model, data and training keys in its
    prmkit_config.yaml) is resumed with ``resume``; anything else is refused unless ``overwrite``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.training_arguments.get("output_dir") or TRAINING_ARGUMENT_DEFAULTS["output_dir"])
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or start it over")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {out} is a file")
    occupied = out.is_dir() and any(p.name != FINAL_TMP for p in out.iterdir())
    if isinstance(resume, str) and resume.lower() not in ("true", "last"):
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").is_file():
            raise UsageError(f"cannot resume from {resume}: not a checkpoint directory (no trainer_state.json)")
        resume_path: str | None = str(ckpt)
    else:
        resume_path = None
    if not occupied:
        if resume:
            raise UsageError(f"nothing to resume: {out} holds no run", hint="drop --resume to start a new run")
        return OutputPlan(out, "fresh")
    if overwrite:
        if _is_dangerous_to_delete(out):
            raise UsageError(f"refusing to delete {out.resolve()} for --overwrite", hint="choose a dedicated --output-dir")
        return OutputPlan(out, "overwrite")
    saved = out / CONFIG_YAML
    if not saved.is_file():
        raise UsageError(f"output directory {out} is not empty and holds no prmkit run",
                         hint="choose another --output-dir, or pass --overwrite to replace its contents")
    try:
        previous = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        previous = {}
    mine, theirs = run_identity(cfg.to_dict()), run_identity(previous)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise UsageError(f"output directory {out} holds a different run ({shown} differ)",
                         hint="choose another --output-dir, or pass --overwrite to replace it")
    if not resume:
        last = get_last_checkpoint(str(out))
        raise UsageError(f"output directory {out} already holds this run",
                         hint=(f"pass --resume to continue from {Path(last).name}, " if last else "")
                         + "or --overwrite to start over")
    if resume_path is None:
        resume_path = get_last_checkpoint(str(out))
        if resume_path is None:
            raise UsageError(f"nothing to resume: {out} holds no checkpoint yet", hint="pass --overwrite to start over")
    return OutputPlan(out, "resume", resume_path)


def prepare_output_dir(plan: OutputPlan, cfg: Config) -> None:
    if plan.action == "overwrite":
        for item in plan.output_dir.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(plan.output_dir / FINAL_TMP, ignore_errors=True)
    write_atomic(plan.output_dir / CONFIG_YAML, dump_config(cfg))


