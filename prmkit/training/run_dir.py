"""A training output directory: one run per directory, planned before anything is touched, resumed only when it is
the same run."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prmkit.config.load import dump_config, load_yaml
from prmkit.config.schema import TRAINING_ARGUMENT_DEFAULTS, Config
from prmkit.core.atomic import write_atomic
from prmkit.core.checkpoints import checkpoint_problem, latest_complete_checkpoint, set_aside
from prmkit.core.filenames import CONFIG_YAML
from prmkit.core.outputs import OutputLock, refuse_inputs_inside
from prmkit.core.overwrite import _OWN_HIDDEN, FINAL_TMP, _set_aside_contents, settle_overwrite
from prmkit.core.redact import redact
from prmkit.errors import UsageError

log = logging.getLogger("prmkit")


# Keys that may change between a run and its resumption: where it writes, how often it logs/saves/evaluates, how
# long it runs. Anything else changing means a different run.
_VOLATILE_TRAIN_KEYS = {
    "output_dir",
    "resume_from_checkpoint",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "eval_steps",
    "eval_strategy",
    "report_to",
    "disable_tqdm",
    "push_to_hub",
    "run_name",
    "log_level",
    "log_level_replica",
    "per_device_eval_batch_size",
    "eval_on_start",
    "ddp_timeout",
}


_VOLATILE_PREFIXES = ("hub_", "dataloader_")


_VOLATILE_DATA_KEYS = {"num_proc", "cache_dir"}


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
    # prmkit_config.yaml is saved redacted, so both sides are compared redacted.
    flat = _flatten(json.loads(json.dumps(redact(config_dict), default=str)))
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


# What a resumed run may change without a word: where it is and how it was started.
_IGNORED_ON_RESUME = {
    "train.output_dir",
    "train.resume_from_checkpoint",
    "train.disable_tqdm",
    "data.num_proc",
    "data.cache_dir",
}


# What it may change with a warning: how often it logs, saves and evaluates, and where it reports. The schedule (epochs,
# steps, batch sizes), the data and the optimisation are not among them: changing those mid-run gives a run that
# neither config describes ("step 143 of 114").
_HARMLESS_ON_RESUME = {
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "logging_nan_inf_filter",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_only_model",
    "eval_steps",
    "eval_strategy",
    "eval_delay",
    "eval_on_start",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
    "report_to",
    "run_name",
    "log_level",
    "log_level_replica",
    "push_to_hub",
    "ddp_timeout",
    "dataloader_num_workers",
    "dataloader_prefetch_factor",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
}


# A checkpoint of another model (or of LoRA adapters for it) cannot be resumed at all, whatever is accepted.
_MODEL_KEYS = {
    "model.name_or_path",
    "model.tokenizer",
    "model.tiny",
    "model.init_from_config",
    "train.kind",
    "train.lora",
}


@dataclass
class ConfigChanges:
    """How a config differs from the one a run recorded: (key, recorded value, new value) per changed key."""

    model: list[tuple[str, Any, Any]] = field(default_factory=list)
    schedule: list[tuple[str, Any, Any]] = field(default_factory=list)
    """Everything that changes what the resumed run computes: epochs, steps, batch sizes, data, seed, optimiser."""
    harmless: list[tuple[str, Any, Any]] = field(default_factory=list)


def _with_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """Flattened config keys, with the default filled in for a key one side does not record."""
    from dataclasses import fields

    from prmkit.config.schema import SECTIONS, training_argument_fields

    out = dict(flat)
    for section in ("model", "data", "train"):
        for f in fields(SECTIONS[section]):
            default = f.default if f.default_factory is MISSING else f.default_factory()
            out.setdefault(f"{section}.{f.name}", default)
    return out | {
        f"train.{name}": f.default
        for name, f in training_argument_fields().items()
        if f"train.{name}" not in out and f.default is not MISSING
    }


def config_changes(recorded: dict[str, Any], config_dict: dict[str, Any]) -> ConfigChanges:
    """Compare a run's recorded config (prmkit_config.yaml) with the one now given, key by key (both redacted)."""
    then = _with_defaults(_flatten(json.loads(json.dumps(redact(recorded), default=str))))
    now = _with_defaults(_flatten(json.loads(json.dumps(redact(config_dict), default=str))))
    changes = ConfigChanges()
    for key in sorted(set(then) | set(now)):
        section, _, name = key.partition(".")
        if section not in ("model", "data", "train") or key in _IGNORED_ON_RESUME or then.get(key) == now.get(key):
            continue
        if key in _MODEL_KEYS:
            bucket = changes.model
        elif section == "train" and (name in _HARMLESS_ON_RESUME or name.startswith("hub_")):
            bucket = changes.harmless
        else:
            bucket = changes.schedule
        bucket.append((key, then.get(key), now.get(key)))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``key (was A, now B)`` for every change, on one line; long values shortened."""

    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} (was {short(a)}, now {short(b)})" for key, a, b in changes)


@dataclass
class OutputPlan:
    output_dir: Path
    action: str  # fresh | overwrite | resume
    checkpoint: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Checkpoints newer than ``checkpoint`` found incomplete: (path, why). They are set aside before resuming."""


def output_dir_of(cfg: Config) -> Path:
    return Path(cfg.training_arguments.get("output_dir") or TRAINING_ARGUMENT_DEFAULTS["output_dir"])


def _is_dangerous_to_delete(path: Path) -> bool:
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    return resolved in (Path(resolved.anchor), Path.home().resolve()) or resolved == cwd or resolved in cwd.parents


def _train_inputs(cfg: Config, overwrite: bool) -> list[tuple[str, Any]]:
    """What a run reads, by the name a user would look for; with --overwrite also the config file and the cache."""
    ta = cfg.training_arguments
    inputs: list[tuple[str, Any]] = [
        ("data.train", cfg.data.train),
        ("data.eval", cfg.data.eval),
        ("model.name_or_path", cfg.model.name_or_path),
        ("model.tokenizer", cfg.model.tokenizer),
    ]
    inputs += [
        (f"train.{key}", ta[key])
        for key in ("deepspeed", "fsdp_config", "accelerator_config")
        if isinstance(ta.get(key), (str, Path))
    ]
    if ta.get("push_to_hub"):
        inputs.append(("push.eval_report", cfg.push.eval_report))  # read after training, when the model is pushed
    if overwrite:
        from prmkit.data.prepare import cache_root

        # A config file or cache inside a run being resumed is fine (`-c runs/x/prmkit_config.yaml --resume`).
        inputs += [("--config", cfg.source), ("the prepared-data cache", cache_root(cfg.data.cache_dir))]
    return inputs


def plan_output_dir(
    cfg: Config,
    overwrite: bool = False,
    resume: bool | str | None = None,
    extra_inputs: Sequence[tuple[str, Any]] = (),
    accept_changes: bool = False,
) -> OutputPlan:
    """Decide what to do with the output directory, without touching it; raises UsageError when it is not ours.

    An empty or missing directory starts fresh. One holding this same run (same model, data and training keys in its
    prmkit_config.yaml) is resumed with ``resume``, from its newest complete checkpoint; anything else is refused
    unless ``overwrite``. An input (data, model, tokenizer, config file, cache, ``extra_inputs``) inside a directory
    this run would replace or write into is refused outright, links resolved.

    Resuming compares the config with the run's: a change to the schedule, data or training keys is refused with every
    changed key named, unless ``accept_changes`` (``--resume-with-changes``); a change to how often it logs, saves or
    evaluates is a warning.
    """
    out = output_dir_of(cfg)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or start it over")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {out} is a file")
    occupied = out.is_dir() and any(p.name not in _OWN_HIDDEN for p in out.iterdir())
    if isinstance(resume, str) and resume.lower() not in ("true", "last"):
        problem = checkpoint_problem(resume)
        if problem:
            raise UsageError(f"cannot resume from {resume}: {problem}", hint="give a complete checkpoint directory")
        resume_path: str | None = str(resume)
    else:
        resume_path = None
    if not occupied:
        if resume:
            raise UsageError(f"nothing to resume: {out} holds no run", hint="drop --resume to start a new run")
        return OutputPlan(out, "fresh")
    if overwrite and _is_dangerous_to_delete(out):
        raise UsageError(f"refusing to delete {out.resolve()} for --overwrite", hint="choose a dedicated --output-dir")
    refuse_inputs_inside(
        out,
        [*_train_inputs(cfg, overwrite), *extra_inputs],
        "--overwrite would replace" if overwrite else "training writes into",
    )
    if overwrite:
        return OutputPlan(out, "overwrite")
    saved = out / CONFIG_YAML
    if not saved.is_file():
        raise UsageError(
            f"output directory {out} is not empty and holds no prmkit run",
            hint="choose another --output-dir, or pass --overwrite to replace its contents",
        )
    try:
        previous = load_yaml(saved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        previous = {}
    if resume:
        _check_resumed_config(out, config_changes(previous, cfg.to_dict()), accept_changes)
    mine, theirs = run_identity(cfg.to_dict()), run_identity(previous)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ and not resume:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise UsageError(
            f"output directory {out} holds a different run ({shown} differ)",
            hint="choose another --output-dir, or pass --overwrite to replace it",
        )
    if resume_path is not None:
        return OutputPlan(out, "resume", resume_path)
    last, skipped = latest_complete_checkpoint(out)
    if not resume:
        raise UsageError(
            f"output directory {out} already holds this run",
            hint=f"pass --resume to continue from {last.name}, or --overwrite to start over"
            if last
            else "pass --overwrite to start over (it holds no checkpoint to resume from)",
        )
    if last is None:
        if skipped:
            names = ", ".join(p.name for p, _ in skipped)
            path, why = skipped[0]
            raise UsageError(
                f"nothing to resume: no complete checkpoint ({names}; {path.name}: {why})",
                hint="pass --overwrite to start over",
            )
        raise UsageError(f"nothing to resume: {out} holds no checkpoint yet", hint="pass --overwrite to start over")
    return OutputPlan(out, "resume", str(last), [(str(p), why) for p, why in skipped])


def _check_resumed_config(out: Path, changes: ConfigChanges, accept_changes: bool) -> None:
    if changes.model:
        raise UsageError(
            f"cannot resume {out}: its checkpoints are of another model: {describe_changes(changes.model)}",
            hint="choose another --output-dir, or pass --overwrite to start over",
        )
    if changes.schedule and not accept_changes:
        raise UsageError(
            f"cannot resume {out} with a config that differs from its {CONFIG_YAML}: "
            f"{describe_changes(changes.schedule)}",
            hint=f"give the same settings again (e.g. --config {out / CONFIG_YAML}), or pass "
            "--resume-with-changes to continue with the new ones",
        )
    if changes.schedule:
        log.warning(
            f"resuming with changed settings, as --resume-with-changes allows: {describe_changes(changes.schedule)}"
        )
    if changes.harmless:
        log.warning(
            f"resuming with changed logging, saving or evaluation settings: {describe_changes(changes.harmless)}"
        )


def claim_output_dir(
    cfg: Config,
    overwrite: bool = False,
    resume: bool | str | None = None,
    extra_inputs: Sequence[tuple[str, Any]] = (),
    accept_changes: bool = False,
) -> tuple[OutputPlan, OutputLock]:
    """Lock the output directory, settle what a killed ``--overwrite`` left, and plan; the caller releases the lock.

    Raises :class:`prmkit.core.outputs.OutputBusy` (naming its PID) when another run holds the directory.
    """
    out = output_dir_of(cfg)
    lock = OutputLock(out, "prmkit train").acquire()
    try:
        settled = settle_overwrite(out)
        if settled:
            log.warning(settled)
        plan = plan_output_dir(
            cfg, overwrite=overwrite, resume=resume, extra_inputs=extra_inputs, accept_changes=accept_changes
        )
    except BaseException:
        lock.release()
        raise
    return plan, lock


def prepare_output_dir(plan: OutputPlan, cfg: Config) -> None:
    """Make the output directory ready for the run; call it once every input has been read.

    ``--overwrite`` deletes nothing yet: the previous contents move into a hidden directory inside the output, and
    go for good only once the new run has saved a complete checkpoint or its model (:func:`settle_overwrite`).
    """
    if plan.action == "overwrite":
        _set_aside_contents(plan.output_dir)
    for path, why in plan.skipped:
        moved = set_aside(Path(path))
        log.warning(f"skipping {Path(path).name}: incomplete ({why}); moved to {moved.name}")
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(plan.output_dir / FINAL_TMP, ignore_errors=True)
    write_atomic(plan.output_dir / CONFIG_YAML, dump_config(cfg))


"""The previous contents of an output directory being overwritten (until the new run saves something)."""
