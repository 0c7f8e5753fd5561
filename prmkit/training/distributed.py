"""Which distributed strategy a run asked for, which one ran, and FSDP and DeepSpeed on CPU processes.

A user asks for a strategy in three places: the launcher's environment (``accelerate launch --use_fsdp`` or an
accelerate config file set ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), or the ``train`` section
(``train.fsdp`` / ``train.fsdp_config`` / ``train.deepspeed``, TrainingArguments' own fields). accelerate then
decides what runs, and may replace the request without a word:

- accelerate (1.16) turns FSDP on only over an accelerator's process group (``MULTI_GPU``, ``MULTI_NPU``, ...).
  Over CPU processes (``MULTI_CPU``, gloo) it drops the FSDP plugin and the Trainer wraps the model in
  ``DistributedDataParallel``. torch's FSDP2 (``fully_shard``) does run on CPU with gloo, so for FSDP version 2
  prmkit installs the plugin accelerate built from the same settings (:func:`enable_cpu_fsdp`); FSDP version 1 is
  not promoted and stays DDP.
- accelerate runs DeepSpeed only when the processes are not on the CPU (``ACCELERATE_USE_CPU``), and without that
  variable CPU processes form no process group at all. DeepSpeed's own CPU accelerator runs ZeRO over gloo, so
  prmkit installs the DeepSpeed plugin there too (:func:`enable_cpu_deepspeed`).
- FSDP and DeepSpeed are dropped in a single process started without a launcher (nothing to shard across).

:func:`expected_strategy` predicts the outcome before anything is written (so ``train.require_strategy: true``
refuses early), :func:`running_strategy` reads what the accelerator really set up, and :func:`check_strategy` warns
(or refuses) naming what was asked and what runs. :func:`record_wrapping` adds what the model was wrapped in and
the share of the parameters rank 0 holds, seen when training starts: the proof that sharding happened.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from prmkit.errors import ConfigError, UsageError
from prmkit.models.memory import Sharding

log = logging.getLogger("prmkit")

FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD = "FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"
ACCELERATOR_TYPES = (
    "MULTI_GPU",
    "MULTI_NPU",
    "MULTI_XPU",
    "MULTI_MLU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_HPU",
    "MULTI_NEURON",
    "FSDP",
    "DEEPSPEED",
)
"""accelerate's process groups over which it turns FSDP on (its AcceleratorState): every MULTI_* but MULTI_CPU."""


@dataclass
class Strategy:
    """A distributed strategy: what a run asked for, or what ran. Recorded in prmkit.json and the run summary."""

    name: str = "single"
    """single | ddp | fsdp | deepspeed"""
    world_size: int = 1
    nodes: int = 1
    fsdp_version: int | None = None
    sharding: str | None = None
    """FSDP: FULL_SHARD (reshard after forward: ZeRO-3-like) | SHARD_GRAD_OP (ZeRO-2-like) | HYBRID_SHARD | NO_SHARD."""
    shard_size: int | None = None
    """Processes a parameter is sharded across (the world size, or one node's under HYBRID_SHARD)."""
    state_dict_type: str | None = None
    """FSDP: FULL_STATE_DICT | SHARDED_STATE_DICT, how checkpoints are written (the final model is always full)."""
    zero_stage: int | None = None
    offload: str | None = None
    """What lives in CPU memory between uses: "params", "optimizer", "params+optimizer"; None for nothing."""
    backend: str | None = None
    """The process group's backend: gloo (CPU) | nccl (CUDA) | ..."""
    source: str | None = None
    """Where the request came from (asked strategies only)."""
    wrapper: str | None = None
    """The class the model was wrapped in when training started (DistributedDataParallel, FSDP..., DeepSpeedEngine)."""
    local_parameter_share: float | None = None
    """Parameter elements held by rank 0 over all parameter elements, when training started (1/world under FSDP)."""
    replaced: str | None = None
    """What was asked, when something else ran (the warning's text)."""

    def describe(self) -> str:
        if self.name == "single":
            return "one process"
        where = f"{self.world_size} process{'es' if self.world_size != 1 else ''}"
        if self.nodes > 1:
            where += f" on {self.nodes} nodes"
        if self.name == "fsdp":
            bits = [b for b in (self.sharding, self.state_dict_type) if b]
            if self.offload:
                bits.append(f"{self.offload} offloaded")
            return f"FSDP{self.fsdp_version or ''}" + (f" ({', '.join(bits)})" if bits else "") + f" on {where}"
        if self.name == "deepspeed":
            stage = f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""
            off = f" ({self.offload} offloaded)" if self.offload else ""
            return f"DeepSpeed{stage}{off} on {where}"
        return f"DDP on {where}"

    def label(self) -> str:
        """The short name a comparison uses: "FSDP2", "DeepSpeed ZeRO-3", "DDP", "one process"."""
        if self.name == "fsdp":
            return f"FSDP{self.fsdp_version or ''}"
        if self.name == "deepspeed":
            return "DeepSpeed" + (f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else "")
        return "DDP" if self.name == "ddp" else "one process"

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if v is not None}, "description": self.describe()}

    def sharding_for_memory(self) -> Sharding:
        """How this strategy divides weights, gradients and optimizer states per rank (:mod:`prmkit.models.memory`)."""
        n = max(1, int(self.shard_size or self.world_size or 1))
        label = self.describe()
        if self.name == "fsdp" and self.sharding in (FULL_SHARD, HYBRID_SHARD):
            return Sharding(weights=n, gradients=n, optimizer=n, gathers_layers=n > 1, label=label)
        if self.name == "fsdp" and self.sharding == SHARD_GRAD_OP:
            # The parameters are gathered in the forward pass and stay whole until the backward pass is done.
            return Sharding(weights=1, gradients=n, optimizer=n, label=label)
        if self.name == "deepspeed" and self.zero_stage is not None and self.zero_stage >= 1:
            stage = self.zero_stage
            return Sharding(
                weights=n if stage >= 3 else 1,
                gradients=n if stage >= 2 else 1,
                optimizer=n,
                gathers_layers=stage >= 3 and n > 1,
                label=label,
            )
        return Sharding(label=label)


# ---------------------------------------------------------------------------------------------------------------------
# What was asked


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return str(environ.get(name, "false")).strip().lower() in ("1", "true", "yes")


def _nodes(environ: Mapping[str, str], world: int) -> int:
    """Machines taking part: torchrun (and so accelerate launch) sets LOCAL_WORLD_SIZE, processes on this node."""
    local = int(environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(1, world // local) if local > 0 else 1


def requested_strategy(args: Any, environ: Mapping[str, str] | None = None) -> Strategy:
    """The strategy asked for, from TrainingArguments (train.fsdp, train.deepspeed) and the launcher's environment."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    base = Strategy(name="ddp" if world > 1 else "single", world_size=world, nodes=_nodes(env, world))
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args or _flag(env, "ACCELERATE_USE_FSDP"):
        plugin_args = plugin_args or {}
        version = int(plugin_args.get("fsdp_version") or env.get("FSDP_VERSION", "1") or 1)
        reshard = plugin_args.get("reshard_after_forward", env.get("FSDP_RESHARD_AFTER_FORWARD"))
        # accelerate's defaults: the launcher's plugin writes sharded checkpoints under FSDP2, transformers' full ones.
        state_dict = (
            plugin_args.get("state_dict_type")
            or env.get("FSDP_STATE_DICT_TYPE")
            or ("SHARDED_STATE_DICT" if not plugin_args and version == 2 else "FULL_STATE_DICT")
        )
        source = "train.fsdp" if getattr(args, "fsdp_plugin_args", None) else "the launcher (ACCELERATE_USE_FSDP)"
        return replace(
            base,
            name="fsdp",
            fsdp_version=version,
            sharding=_sharding_name(reshard, version),
            state_dict_type=str(state_dict).upper(),
            source=source,
        )
    if getattr(args, "deepspeed", None) or _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        source = "train.deepspeed" if getattr(args, "deepspeed", None) else "the launcher (ACCELERATE_USE_DEEPSPEED)"
        return replace(
            base, name="deepspeed", zero_stage=int(stage) if stage not in (None, "") else None, source=source
        )
    return replace(base, source="the launcher" if world > 1 else None)


def _sharding_name(reshard: Any, version: int) -> str:
    """FSDP2's reshard_after_forward (a bool) or FSDP1's sharding strategy, as one of the FSDP1 names."""
    if reshard is None or reshard == "":
        return FULL_SHARD
    if isinstance(reshard, bool):
        return FULL_SHARD if reshard else SHARD_GRAD_OP
    text = str(getattr(reshard, "name", reshard)).strip().upper()
    if text in ("TRUE", "1", "YES"):
        return FULL_SHARD
    if text in ("FALSE", "0", "NO"):
        return SHARD_GRAD_OP
    if text.isdigit():  # accelerate's numbering of ShardingStrategy, from 1
        names = [FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD]
        return names[int(text) - 1] if 1 <= int(text) <= len(names) else text
    return text


# ---------------------------------------------------------------------------------------------------------------------
# What runs


def _type_name(value: Any) -> str:
    """An accelerate or torch enum member (DistributedType.FSDP, StateDictType.SHARDED_STATE_DICT) or its name, as
    its upper-case name."""
    return str(getattr(value, "name", value)).split(".")[-1].upper()


def _offloads_params(cpu_offload: Any) -> bool:
    """FSDP2's CPUOffloadPolicy (its base OffloadPolicy offloads nothing), FSDP1's CPUOffload(offload_params=True)."""
    if cpu_offload is None or cpu_offload is False:
        return False
    if type(cpu_offload).__name__ == "OffloadPolicy":
        return False
    return bool(getattr(cpu_offload, "offload_params", True))


def expected_strategy(asked: Strategy, distributed_type: Any, cpu: bool) -> Strategy:
    """What accelerate will set up for ``asked``, given the process group the launch made (PartialState's
    ``distributed_type``) and whether the processes run on the CPU; known before any model or output exists."""
    kind = _type_name(distributed_type)
    if kind == "NO":
        return Strategy(world_size=1, nodes=1)
    plain = Strategy(name="ddp", world_size=asked.world_size, nodes=asked.nodes)
    if asked.name == "fsdp":
        if kind in ACCELERATOR_TYPES or (kind == "MULTI_CPU" and asked.fsdp_version == 2):
            return replace(asked, source=None)
        return plain
    if asked.name == "deepspeed":
        # accelerate runs it over an accelerator's process group, prmkit over CPU processes (enable_cpu_deepspeed).
        enabled = kind in ("DEEPSPEED", "MULTI_CPU") or (not cpu and kind in ACCELERATOR_TYPES)
        return replace(asked, source=None) if enabled else plain
    return plain


def running_strategy(accelerator: Any, environ: Mapping[str, str] | None = None) -> Strategy:
    """The strategy the accelerator set up (after prmkit's CPU FSDP, if any)."""
    env = os.environ if environ is None else environ
    state = accelerator.state
    world = int(getattr(state, "num_processes", 1) or 1)
    base = Strategy(
        name="ddp" if world > 1 else "single",
        world_size=world,
        nodes=_nodes(env, world),
        backend=getattr(state, "backend", None) if world > 1 else None,
    )
    kind = _type_name(state.distributed_type)
    plugin = getattr(state, "fsdp_plugin", None)
    if kind == "FSDP" and plugin is not None:
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        reshard = (
            plugin.reshard_after_forward if version == 2 else (plugin.sharding_strategy or plugin.reshard_after_forward)
        )
        sharding, shard_size = _sharding_name(reshard, version), world
        parallelism = getattr(state, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "dp_replicate_size", 1) > 1:
            sharding, shard_size = HYBRID_SHARD, int(getattr(parallelism, "dp_shard_size", 1) or 1)
        elif sharding == HYBRID_SHARD:
            shard_size = int(env.get("LOCAL_WORLD_SIZE", world) or world)
        elif sharding == NO_SHARD:
            shard_size = 1
        offload = "params" if _offloads_params(getattr(plugin, "cpu_offload", None)) else None
        return replace(
            base,
            name="fsdp",
            fsdp_version=version,
            sharding=sharding,
            shard_size=shard_size,
            state_dict_type=_type_name(plugin.state_dict_type),
            offload=offload,
        )
    ds = getattr(state, "deepspeed_plugin", None)
    if kind == "DEEPSPEED" and ds is not None:
        zero = (getattr(ds, "deepspeed_config", None) or {}).get("zero_optimization", {})
        stage = zero.get("stage", getattr(ds, "zero_stage", None))
        offloaded = [
            part
            for part, key in (("params", "offload_param"), ("optimizer", "offload_optimizer"))
            if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")
        ]
        return replace(
            base,
            name="deepspeed",
            zero_stage=int(stage) if stage not in (None, "auto") else None,
            shard_size=world,
            offload="+".join(offloaded) or None,
        )
    return base


def check_strategy(
    asked: Strategy, ran: Strategy, require: bool, why: str | None = None, warn: bool = True
) -> Strategy:
    """Warn (when ``warn``: the main process) if the strategy that runs is not the one asked for, naming both; with
    ``train.require_strategy: true``, refuse. Returns ``ran`` with the replacement noted."""
    if asked.name in ("single", "ddp") or same_kind(asked, ran):
        return ran
    message = f"{asked.label()} was asked for ({asked.source}), but {ran.describe()} runs" + (f": {why}" if why else "")
    if require:
        raise ConfigError(
            message,
            hint="train.require_strategy is true; "
            + (replacement_hint(asked, ran) or "launch as the README's distributed section shows"),
        )
    if warn:
        log.warning(message + "; set train.require_strategy: true to refuse instead")
    return replace(ran, replaced=message)


def same_kind(asked: Strategy, ran: Strategy) -> bool:
    if asked.name != ran.name:
        return False
    if asked.name == "fsdp":
        return asked.fsdp_version == ran.fsdp_version
    if asked.name == "deepspeed" and asked.zero_stage is not None and ran.zero_stage is not None:
        return asked.zero_stage == ran.zero_stage
    return True


def replacement_reason(asked: Strategy, distributed_type: Any, cpu: bool) -> str | None:
    """Why accelerate will not run ``asked`` (None when it will)."""
    kind = _type_name(distributed_type)
    if asked.name not in ("fsdp", "deepspeed"):
        return None
    if kind == "NO":
        return "a single process started without a launcher has nothing to shard across"
    if asked.name == "fsdp" and kind == "MULTI_CPU" and asked.fsdp_version != 2:
        return "on CPU processes accelerate drops FSDP, and prmkit enables only FSDP version 2 (fully_shard) there"
    return None


def replacement_hint(asked: Strategy, ran: Strategy) -> str | None:
    if asked.name == "fsdp" and ran.name != "fsdp" and ran.world_size > 1:
        return "set fsdp_version: 2 (FSDP2) in the accelerate config, or train.fsdp_config: {version: 2}"
    if ran.world_size <= 1:
        return "launch several processes: prmkit train --num-processes N (or accelerate launch)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# FSDP on CPU processes


def enable_cpu_fsdp(trainer: Any, asked: Strategy) -> bool:
    """Install the FSDP plugin that accelerate dropped over CPU processes (FSDP version 2 only); see the module
    docstring. Call right after the Trainer made its accelerator. Returns whether it did."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    kind = _type_name(state.distributed_type)
    promoted_before = getattr(state, "prmkit_cpu_fsdp", False)
    if asked.name != "fsdp" or asked.fsdp_version != 2 or not (kind == "MULTI_CPU" or promoted_before):
        return False
    # The plugin accelerate would have used: from train.fsdp_config, else from the launcher's FSDP_* variables. A
    # fresh one per run: the Trainer adapts it to the model (LoRA), and a second run in the process must not inherit
    # the first one's.
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        return False
    mixed = getattr(state, "_mixed_precision", "no")
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    # AcceleratorState and PartialState share their attributes with every instance (their _shared_state dicts):
    # this is what AcceleratorState itself sets when it turns FSDP on over an accelerator's process group.
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["prmkit_cpu_fsdp"] = True
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    if plugin.activation_checkpointing and getattr(trainer.args, "gradient_checkpointing", False):
        raise ConfigError(
            "train.fsdp_config activation_checkpointing and train.gradient_checkpointing are both on: use one of them"
        )
    return True


def enable_cpu_deepspeed(trainer: Any, asked: Strategy) -> bool:
    """Install the DeepSpeed plugin that accelerate dropped over CPU processes (it runs DeepSpeed only when the
    processes are not on the CPU); DeepSpeed's own CPU accelerator and gloo run ZeRO there. Call right after the
    Trainer made its accelerator. Returns whether it did."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    state = trainer.accelerator.state
    kind = _type_name(state.distributed_type)
    if asked.name != "deepspeed" or not (kind == "MULTI_CPU" or getattr(state, "prmkit_cpu_deepspeed", False)):
        return False
    # The plugin TrainingArguments built (from train.deepspeed, else from the launcher's variables), as the Trainer
    # hands it to accelerate; set up as AcceleratorState sets up the plugin it keeps.
    plugin = getattr(trainer.args, "deepspeed_plugin", None) or DeepSpeedPlugin()
    plugin.set_mixed_precision(getattr(state, "_mixed_precision", "no"))
    plugin.select(_from_accelerator_state=True)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["deepspeed_plugins"] = plugin
    AcceleratorState._shared_state["prmkit_cpu_deepspeed"] = True
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    trainer.is_deepspeed_enabled = True
    if getattr(trainer.args, "hf_deepspeed_config", None) is None:
        from transformers.integrations.deepspeed import propagate_args_to_deepspeed

        propagate_args_to_deepspeed(trainer.accelerator, trainer.args)
    return True


def record_wrapping(trainer: Any, ran: Strategy) -> Strategy:
    """``ran`` with the wrapper class and the share of the parameters rank 0 holds, once the Trainer prepared the
    model (when training starts)."""
    wrapped = getattr(trainer, "model_wrapped", None)
    if wrapped is None:  # not `or`: a compiled module has no truth value (it forwards __len__ to the model)
        wrapped = trainer.model
    model = trainer.model
    local = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        full = p.numel()
        held = p.to_local().numel() if hasattr(p, "to_local") else full
        if getattr(p, "ds_numel", None) is not None:  # DeepSpeed ZeRO-3: the full size is kept beside the partition
            full, held = int(p.ds_numel), int(getattr(p, "ds_tensor", p).numel())
        total += full
        local += held
    share = round(local / total, 4) if total else None
    return replace(ran, wrapper=type(wrapped).__name__, local_parameter_share=share)


# ---------------------------------------------------------------------------------------------------------------------
# One run's strategy, from the request to what ran


@dataclass
class StrategyPlan:
    """A run's strategy: asked for, expected before the model exists, and what ran (recorded)."""

    asked: Strategy
    expected: Strategy
    require: bool = False
    main: bool = True
    ran: Strategy | None = None

    def confirm(self, trainer: Any) -> Strategy:
        """Read what the Trainer's accelerator set up; warn (or refuse) when it is not what was expected."""
        ran = running_strategy(trainer.accelerator)
        if ran.name == "fsdp":
            # torch warns at every evaluation that the root module returned a view (the logits), which an in-place
            # op would break; prmkit's losses and metrics only read the logits.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if not same_kind(self.expected, ran):
            ran = check_strategy(
                self.asked, ran, self.require, "accelerate set up something else than expected", warn=self.main
            )
        else:
            ran = replace(ran, replaced=self.expected.replaced)
        self.ran = ran
        return ran

    def callback(self, trainer: Any) -> Any:
        """A TrainerCallback that records the wrapper and rank 0's share of the parameters when training starts."""
        from transformers import TrainerCallback

        plan = self

        class WrappingCheck(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                plan.ran = record_wrapping(trainer, plan.ran or plan.expected)

        return WrappingCheck()

    def to_dict(self) -> dict[str, Any]:
        return (self.ran or self.expected).to_dict()


def join_cpu_processes(environ: MutableMapping[str, str] | None = None) -> bool:
    """Let processes launched on a machine without an accelerator form one gloo process group.

    transformers and accelerate build a CPU process group only when ``ACCELERATE_USE_CPU`` is set; without it, N
    processes started by ``accelerate launch`` (or torchrun) from an FSDP or DeepSpeed config each train alone, all
    writing the same output. Call before TrainingArguments set up the device. Returns whether it set the variable.
    """
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or "ACCELERATE_USE_CPU" in env or _accelerator_present():
        return False
    env["ACCELERATE_USE_CPU"] = "true"
    log.info("no GPU: the launched processes train on the CPU in one gloo process group (ACCELERATE_USE_CPU=true)")
    return True


def _accelerator_present() -> bool:
    import torch

    try:
        return torch.accelerator.current_accelerator() is not None
    except RuntimeError:  # torch 2.6 raises on CPU-only builds; later versions return None
        return False


def plan_strategy(args: Any, state: Any, require: bool, environ: Mapping[str, str] | None = None) -> StrategyPlan:
    """The strategy asked for and the one accelerate will run; warns once (on the main process) when they differ,
    and refuses under ``train.require_strategy: true`` before anything is written."""
    asked = requested_strategy(args, environ)
    if asked.world_size > 1 and _type_name(state.distributed_type) == "NO":
        raise UsageError(
            f"{asked.world_size} processes were launched but form no process group: each would train "
            "alone, writing the same output",
            hint="on a machine without a GPU set ACCELERATE_USE_CPU=true, or use prmkit train "
            "--num-processes N, which does",
        )
    cpu = getattr(getattr(args, "device", None), "type", "cpu") == "cpu"
    expected = expected_strategy(asked, state.distributed_type, cpu)
    why = replacement_reason(asked, state.distributed_type, cpu)
    expected = check_strategy(asked, expected, require, why, warn=state.is_main_process)
    if expected.name == "deepspeed" and _type_name(state.distributed_type) == "MULTI_CPU":
        # accelerate joins DeepSpeed's communication layer to the process group only when it runs DeepSpeed itself;
        # ZeRO-3 partitions the model as it loads, which must see every process.
        import deepspeed

        deepspeed.init_distributed(dist_backend=state.backend)
    return StrategyPlan(asked=asked, expected=expected, require=require, main=state.is_main_process)


# ---------------------------------------------------------------------------------------------------------------------
# Saving whole models from sharded ones


def fsdp_sharded_checkpoints(trainer: Any) -> bool:
    """Whether the Trainer runs FSDP writing sharded checkpoints (SHARDED_STATE_DICT): its save_model then writes no
    weights at all, as transformers leaves the final model to the checkpoint's shards."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return bool(trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type))


def save_whole_model(trainer: Any, path: str) -> None:
    """``trainer.save_model(path)``, except that under FSDP with sharded checkpoints the weights are gathered whole
    all the same: the output directory must load with plain transformers. Every process must call it."""
    if not fsdp_sharded_checkpoints(trainer):
        trainer.save_model(path)
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: the whole model, on rank 0
    if trainer.args.should_save:
        trainer._save(path, state_dict=state_dict)


def gathered_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The whole model's state dict on the main process when FSDP or ZeRO-3 shards the weights (every process must
    call it), else None: the model in memory is whole, and is read directly."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)  # needs the 16-bit gather on save
    return None


def _plain_class(module: Any) -> type:
    """The model's own class: FSDP2 swaps a wrapped module's class for a subclass named FSDP<class>."""
    cls = type(module)
    if cls.__name__.startswith("FSDP"):
        return next((c for c in cls.__mro__[1:] if c.__name__ == cls.__name__[4:]), cls)
    return cls


def _on_meta(model_class: Any, config: Any) -> Any:
    import torch
    from transformers.integrations import deepspeed as hf_deepspeed

    # Under ZeRO-3, transformers builds every model (and a head's inner model) inside deepspeed.zero.Init, which
    # partitions it across the processes: a collective this process would run alone. Its switch is the global
    # DeepSpeed config reference, unset here while the copy is built, and put back.
    held = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        with torch.device("meta"):
            return model_class(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def _assign(module: Any, weights: dict[str, Any], what: str) -> None:
    module.load_state_dict(weights, strict=False, assign=True)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state dict has no weights for {what}'s {missing[0]}")


def merged_lora(peft_model: Any, full: dict[str, Any]) -> Any:
    """The LoRA-merged model, built from the whole PEFT state dict ``full`` gathered from FSDP or ZeRO-3 shards: the
    model in memory is sharded, so a copy without sharding is made on the meta device, given the gathered weights
    (no second copy of them) and merged."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    config = peft_model.peft_config[peft_model.active_adapter]
    copy = get_peft_model(_on_meta(_plain_class(base), base.config), config)
    _assign(copy, full, "the LoRA model")
    return copy.merge_and_unload()


def save_lora_base(peft_base: Any, full: dict[str, Any], path: Any) -> None:
    """Save the base model under a LoRA adapter from the whole PEFT state dict ``full`` (gathered from FSDP shards):
    the base weights without the LoRA matrices, under their own names."""
    weights = {}
    for key, value in full.items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue  # the adapter's own weights (saved with the adapter)
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        weights[name] = value
    base = _on_meta(_plain_class(peft_base), peft_base.config)
    _assign(base, weights, "the base model")
    base.save_pretrained(str(path))
