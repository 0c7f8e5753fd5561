"""Training memory: the allocator default, a pure estimate of peak memory, and the `gradient_checkpointing: auto` plan.

Why an estimate and not a trial step: a trial step costs a model load and a forward/backward on the device, and an
out-of-memory error inside it leaves the allocator fragmented. The estimate is arithmetic over the model config and
the prepared lengths, so it can run before anything touches the device, and it is tested with numbers.

Where the activation coefficients come from: the bytes autograd saves per token in one decoder layer of a
Llama/Qwen2-style model (RMSNorm, RoPE, GQA attention through SDPA/flash/flex, SwiGLU MLP), measured with
``torch.autograd.graph.saved_tensors_hooks`` on models of several shapes (tests/test_memory.py re-measures one).
They fit ``a*hidden + b*intermediate + c*kv_dim + d*heads`` exactly:

- fp32 weights, no autocast: 32h + 16i + 8kv + 4 heads
- bf16/fp16 weights: 20h + 8i + 4kv + 4 heads (RMSNorm computes in fp32, hence 20h and not 16h)
- fp32 weights with bf16/fp16 autocast (TrainingArguments bf16/fp16): 30h + 8i + 4kv + 4 heads, plus a 16-bit copy
  of every matmul weight held from the forward to the backward pass (the residual stream stays fp32)

With checkpointing a layer keeps only its input (the residual stream: 4 bytes per hidden unit in fp32 and autocast, 2
in bf16) and recomputes one layer at a time in the backward pass. The vocabulary adds no activations here: the head
has ``num_labels`` outputs, not ``vocab`` (it only adds embedding weights, gradients and optimizer states).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3


def size(n: float | None) -> str:
    """Bytes for people: GiB with one decimal, MiB below one GiB (tiny models must not all read 0.0 GiB)."""
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA allocator

ALLOC_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
"""Every variable torch reads the caching allocator's settings from; a user who set any of them has chosen."""
ALLOC_DEFAULT = "expandable_segments:True"
ENV_ALLOC_DEFAULTED = "PRMKIT_ALLOC_CONF_DEFAULT"
"""Set beside the default, so a launched child (which inherits it) still knows prmkit chose it, not the user."""


def use_expandable_segments(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make the CUDA caching allocator grow segments in place instead of caching one block per batch shape.

    Batches change shape every step (grouped lengths, packs), and with fixed segments the cache fragments: measured
    on an H200, 83 GiB reserved for what fits in 33 GiB. torch reads the setting once, when the allocator first runs,
    so this must happen before CUDA initialises: `prmkit`'s CLI entry calls it before torch is imported, and launched
    processes inherit it. Returns whether prmkit's default is in force (now or from a parent process).
    """
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in ALLOC_ENVS):
        return env.get(ENV_ALLOC_DEFAULTED) == "1" and env.get(ALLOC_ENVS[0]) == ALLOC_DEFAULT
    env[ALLOC_ENVS[0]] = ALLOC_DEFAULT
    env[ENV_ALLOC_DEFAULTED] = "1"
    return True


def allocator_setting(environ: Mapping[str, str] | None = None) -> str:
    """What the run summary says about the allocator: prmkit's default, or the user's own setting."""
    env = os.environ if environ is None else environ
    for name in ALLOC_ENVS:
        if env.get(name):
            own = env.get(ENV_ALLOC_DEFAULTED) == "1" and name == ALLOC_ENVS[0] and env[name] == ALLOC_DEFAULT
            return f"{name}={env[name]}" + (" (prmkit's default)" if own else " (yours)")
    return "torch's default (no allocator setting)"


# ---------------------------------------------------------------------------------------------------------------------
# Model and batch shapes


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that size a decoder's memory. ``params``/``trainable`` are counted when a model is at hand."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    num_labels: int = 2
    params: int | None = None
    trainable: int | None = None
    head_outputs: int | None = None
    """Logits per position: ``num_labels`` for a token-classification head, the vocabulary for an LM (lm-tag)."""

    @property
    def outputs(self) -> int:
        return self.head_outputs or self.num_labels

    @property
    def head_dim(self) -> int:
        return self.hidden // max(1, self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return h * h + 2 * h * kv + h * h + 3 * h * i + (h + 2 * kv) + 2 * h  # q, k, v, o, MLP, qkv biases, norms

    @property
    def total_params(self) -> int:
        if self.params is not None:
            return self.params
        return (
            self.embedding_params
            + self.layers * self.layer_params
            + self.hidden
            + self.hidden * self.num_labels
            + self.num_labels
        )

    @property
    def trainable_params(self) -> int:
        return self.total_params if self.trainable is None else self.trainable

    @property
    def non_embedding_params(self) -> int:
        """The parameters that cost 6 FLOPs a token in training (the usual MFU count)."""
        return max(0, self.total_params - self.embedding_params)


def model_shape(config: Any, model: Any = None, lm_head: bool = False) -> ModelShape:
    """A :class:`ModelShape` from a transformers config; with ``model``, its parameters are counted, not derived.
    ``lm_head``: the model ends in vocabulary logits (lm-tag), not a ``num_labels`` head."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    params = trainable = None
    if model is not None:
        seen: set[int] = set()
        params = trainable = 0
        for p in model.parameters():
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            n = int(getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3 partitions at load: its full size is kept
            params += n
            trainable += n if p.requires_grad else 0
    return ModelShape(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=int(getattr(text, "vocab_size", 0) or 0),
        num_labels=int(getattr(config, "num_labels", 2) or 2),
        params=params,
        trainable=trainable,
        head_outputs=int(getattr(text, "vocab_size", 0) or 0) if lm_head else None,
    )


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass: ``rows`` x ``width`` token positions (padding included); packed batches are one row."""

    rows: int
    width: int
    sequences: int

    @property
    def positions(self) -> int:
        return self.rows * self.width

    def describe(self) -> str:
        if self.rows == 1 and self.sequences > 1:
            return f"{self.sequences} rows packed into {self.width:,} tokens"
        return f"{self.rows} rows x {self.width:,} tokens"


def largest_micro_batch(lengths: Iterable[int], batch_size: int, batching: str) -> MicroBatch:
    """The biggest forward pass the run can meet: the ``batch_size`` longest rows (padded, or packed end to end).

    Random and grouped batches both can hold the longest row with others padded to it, so the worst case is
    ``batch_size x longest``; a pack holds no padding, so its worst case is the sum of the longest rows.
    """
    import numpy as np

    arr = np.asarray(list(lengths) if not hasattr(lengths, "__array__") else lengths, dtype=np.int64)
    if arr.size == 0:
        return MicroBatch(0, 0, 0)
    k = max(1, min(int(batch_size), arr.size))
    top = np.partition(arr, arr.size - k)[arr.size - k :]
    if batching == "packed":
        return MicroBatch(rows=1, width=int(top.sum()), sequences=k)
    return MicroBatch(rows=k, width=int(top.max()), sequences=k)


# ---------------------------------------------------------------------------------------------------------------------
# The estimate

# Bytes saved per token per decoder layer, as coefficients of (hidden, intermediate, kv_dim, heads); see the docstring.
LAYER_BYTES = {"fp32": (32, 16, 8, 4), "half": (20, 8, 4, 4), "autocast": (30, 8, 4, 4)}
# Per token outside the layers (embedding output, final norm, head, ids and labels), as a multiple of hidden.
BASE_BYTES = {"fp32": 13, "half": 9, "autocast": 11}
# The residual stream one checkpointed layer keeps per token, per hidden unit.
RESIDUAL_BYTES = {"fp32": 4, "half": 2, "autocast": 4}
HEADROOM = 0.92
"""Share of the budget a plan may fill: the rest is for cuBLAS/NCCL workspaces and what the allocator cannot reuse."""


def precision_mode(param_bytes: int, mixed: bool) -> str:
    """fp32 | half | autocast: 16-bit weights, or fp32 weights with TrainingArguments bf16/fp16 (autocast)."""
    if param_bytes <= 2:
        return "half"
    return "autocast" if mixed else "fp32"


def optimizer_state_bytes(optim: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter: Adam keeps two moments in the parameters' dtype."""
    name = (optim or "adamw_torch").lower()
    if "8bit" in name or "bnb" in name:
        return 2.0
    if "adafactor" in name:
        return 0.1 * param_bytes  # factored second moments: a row and a column per matrix
    if name.startswith("sgd") or "lion" in name:
        return float(param_bytes)
    return 2.0 * param_bytes


@dataclass(frozen=True)
class Sharding:
    """How many processes share each part of the model state: one process holds 1/n of it (per rank).

    DDP: nothing is divided. DeepSpeed ZeRO-1: the optimizer states; ZeRO-2 (and FSDP's SHARD_GRAD_OP): gradients and
    optimizer states; ZeRO-3 (and FSDP's FULL_SHARD): the weights as well. Activations are never divided: each rank
    runs its own micro-batch. ``gathers_layers``: the weights are sharded, so each rank gathers what it computes with
    (see :func:`estimate_memory`)."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    gathers_layers: bool = False
    label: str = "one process"
    """The strategy, as the pre-flight line names it ("FSDP2 (FULL_SHARD, ...) on 8 processes")."""

    @classmethod
    def full(cls, n: int) -> Sharding:
        n = max(1, int(n))
        return cls(n, n, n, gathers_layers=n > 1, label=f"weights, gradients and optimizer states sharded {n} ways")


@dataclass
class MemoryEstimate:
    """Peak device memory of one training process, in bytes, by part."""

    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    """Tensors the forward pass saves for the backward pass."""
    workspace: int
    """The backward pass's working set: one layer's activations (two with checkpointing: the recompute as well)."""
    checkpointing: bool
    batch: MicroBatch
    gathered: int = 0
    """Sharded weights gathered whole for computing (FSDP FULL_SHARD, ZeRO-3); see :func:`estimate_memory`."""

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.weight_copies
            + self.activations
            + self.workspace
            + self.gathered
        )

    def to_dict(self) -> dict[str, Any]:
        parts = {
            k: getattr(self, k)
            for k in ("weights", "gradients", "optimizer", "weight_copies", "activations", "workspace", "gathered")
        }
        return {
            "total_gib": round(self.total / GIB, 2),
            "total_bytes": self.total,
            "bytes": parts,
            "checkpointing": self.checkpointing,
            "largest_micro_batch": {
                "rows": self.batch.rows,
                "width": self.batch.width,
                "sequences": self.batch.sequences,
            },
        }

    def describe(self) -> str:
        gathered = f", gathered for compute {size(self.gathered)}" if self.gathered else ""
        return (
            f"{size(self.total)} (weights {size(self.weights)}, gradients {size(self.gradients)}, optimizer "
            f"{size(self.optimizer)}{gathered}, activations "
            f"{size(self.activations + self.weight_copies + self.workspace)})"
        )


def estimate_memory(
    shape: ModelShape,
    batch: MicroBatch,
    *,
    param_bytes: int = 4,
    mixed: bool = False,
    checkpointing: bool = False,
    optimizer: str = "adamw_torch",
    attention: str = "sdpa",
    shards: int = 1,
    sharding: Sharding | None = None,
) -> MemoryEstimate:
    """Peak memory of one process's training step on ``batch``: weights, gradients, optimizer states, activations.

    ``param_bytes`` is the weights' element size (4 for fp32, 2 for bf16/fp16), ``mixed`` means TrainingArguments
    bf16/fp16 (autocast over fp32 weights). ``sharding`` divides weights, gradients and optimizer states among the
    processes as the strategy does (``shards=n`` is short for full sharding n ways: ZeRO-3, FSDP FULL_SHARD); LoRA's
    frozen weights have no gradients or optimizer states, so only its trainable part counts there. When the weights
    are sharded, each process also holds whole, while it computes: the parameters outside the decoder layers (FSDP2
    keeps the root unit gathered from the forward pass to the end of the backward pass), one layer's parameters and
    that layer's unsharded gradients before they are reduce-scattered (``gathered``, an upper bound: it ignores
    that the local shard is part of the gathered whole). Activations are per process and never divided: they cover
    the forward pass's saved tensors, plus one layer's worth for the backward pass's working set (and, with
    checkpointing, one more for the recompute). Eager attention also keeps the full score matrix; SDPA, flash and
    flex attention do not.
    """
    mode = precision_mode(param_bytes, mixed)
    h, i, kv, heads = shape.hidden, shape.intermediate, shape.kv_dim, shape.heads
    a, b, c, d = LAYER_BYTES[mode]
    compute_bytes = 4 if mode == "fp32" else 2
    per_layer_token = a * h + b * i + c * kv + d * heads
    if attention.startswith("flex") and heads & (heads - 1):
        # transformers repeats K and V to the query heads for flex when the head count is not a power of two.
        per_layer_token += 2 * h * compute_bytes
    positions = batch.positions
    per_layer = per_layer_token * positions
    if attention == "eager":
        # The softmax output (fp32) and its 16/32-bit copy, heads x width x width for every row.
        per_layer += heads * batch.rows * batch.width * batch.width * (4 + compute_bytes)
    base = BASE_BYTES[mode] * h * positions
    # The logits live until the loss has read them, and their gradient as long again: negligible for a two-label
    # head, the largest single tensor for an LM head (lm-tag) over a 150k vocabulary.
    logits = shape.outputs * compute_bytes * positions if shape.outputs > 16 else 0
    base += logits
    if checkpointing:
        saved, workspace = base + shape.layers * RESIDUAL_BYTES[mode] * h * positions, 2 * per_layer + logits
    else:
        saved, workspace = base + shape.layers * per_layer, per_layer + logits
    split = sharding if sharding is not None else Sharding.full(shards) if int(shards) > 1 else Sharding()
    total, trainable = shape.total_params, shape.trainable_params
    weights = math.ceil(total * param_bytes / max(1, split.weights))
    gradients = math.ceil(trainable * param_bytes / max(1, split.gradients))
    optim = math.ceil(trainable * optimizer_state_bytes(optimizer, param_bytes) / max(1, split.optimizer))
    gathered = 0
    if split.gathers_layers and split.weights > 1:
        outside_layers = max(0, total - shape.layers * shape.layer_params)
        layer_grads = math.ceil(shape.layer_params * trainable / max(1, total))  # LoRA: the trainable part only
        gathered = (outside_layers + shape.layer_params + layer_grads) * param_bytes
    # Sharded weights are cast to 16 bits layer by layer as they are gathered: the copies are sharded as they are.
    copies = math.ceil(2 * shape.layers * shape.layer_params / max(1, split.weights)) if mode == "autocast" else 0
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optim,
        weight_copies=copies,
        activations=int(saved),
        workspace=int(workspace),
        checkpointing=checkpointing,
        batch=batch,
        gathered=gathered,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The budget and the plan


@dataclass(frozen=True)
class Budget:
    """Memory one training process may use, and where that figure came from."""

    bytes: int | None
    source: str


def release_memory() -> None:
    """Give back what an out-of-memory attempt left behind (its tensors, the allocator's cached blocks) before the
    next attempt or the next step."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_budget(explicit_gb: float | None = None, device: Any = None) -> Budget:
    """``train.memory_budget_gb`` when set; else, on CUDA, what this process may still allocate on its device.

    That is the device's free memory, capped by ``torch.cuda.set_per_process_memory_fraction`` (the allocator refuses
    to go past total x fraction, whatever is free). Without a CUDA device there is no budget.
    """
    if explicit_gb is not None:
        return Budget(int(float(explicit_gb) * GIB), f"train.memory_budget_gb = {float(explicit_gb):g}")
    import torch

    if not torch.cuda.is_available():
        return Budget(None, "no CUDA device")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return Budget(None, f"device {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = 1.0
    # Public since torch 2.8; the private getter it wraps is older.
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None) or getattr(
        torch._C, "_cuda_getMemoryFraction", None
    )
    if getter is not None:
        fraction = float(getter(index))
    name = torch.cuda.get_device_name(index)
    if fraction < 1.0:
        cap = int(total * fraction) - int(torch.cuda.memory_reserved(index))
        if cap < free:
            return Budget(
                max(0, cap), f"per-process memory fraction {fraction:.3f} of {name} ({total * fraction / GIB:.1f} GiB)"
            )
    return Budget(int(free), f"free memory of {name} ({total / GIB:.1f} GiB in all)")


@dataclass
class MemoryPlan:
    """What `prmkit train` decided about memory, and why; recorded in the run summary and in prmkit.json."""

    requested: str | bool
    checkpointing: bool
    reason: str
    budget_bytes: int | None
    budget_source: str
    usable_bytes: int | None
    estimate: MemoryEstimate
    estimate_without: MemoryEstimate
    estimate_with: MemoryEstimate
    fits: bool | None
    advice: list[str] = field(default_factory=list)
    strategy: str = "one process"
    """The distributed strategy the estimate assumed (its sharding); the estimate is per process."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("estimate", "estimate_without", "estimate_with"):
            out[key] = getattr(self, key).to_dict()
        return out

    def preflight(self) -> str:
        """One line for the log before training starts."""
        where = (
            f"{size(self.usable_bytes)} usable of {size(self.budget_bytes)} ({self.budget_source})"
            if self.budget_bytes is not None
            else self.budget_source
        )
        verdict = "fits" if self.fits else ("does NOT fit" if self.fits is False else "not checked")
        per = "in one process" if self.strategy == "one process" else f"per process under {self.strategy}"
        return (
            f"memory: estimated peak {self.estimate.describe()} {per}, for the largest micro-batch "
            f"({self.estimate.batch.describe()}), {where}: {verdict}; gradient checkpointing "
            f"{'on' if self.checkpointing else 'off'} ({self.reason})"
        )


def plan_memory(
    requested: str | bool,
    shape: ModelShape,
    lengths: Sequence[int],
    batch_size: int,
    batching: str,
    budget: Budget,
    **estimate_kwargs: Any,
) -> MemoryPlan:
    """Decide gradient checkpointing: an explicit true/false is obeyed; ``auto`` turns it on only when the run would
    not fit the budget without it. Either way, say whether the chosen setting fits and, if not, what would."""
    batch = largest_micro_batch(lengths, batch_size, batching)
    off = estimate_memory(shape, batch, checkpointing=False, **estimate_kwargs)
    on = estimate_memory(shape, batch, checkpointing=True, **estimate_kwargs)
    usable = int(budget.bytes * HEADROOM) if budget.bytes is not None else None
    if requested in (True, False):
        enabled = bool(requested)
        reason = f"train.gradient_checkpointing: {str(enabled).lower()}"
    elif usable is None:
        enabled = False
        reason = f"auto: {budget.source}, nothing to fit"
    elif off.total <= usable:
        enabled = False
        reason = f"auto: fits without it, {size(off.total)} of {size(usable)} usable"
    else:
        enabled = True
        reason = f"auto: {size(off.total)} without it exceeds the usable {size(usable)}; {size(on.total)} with it"
    chosen = on if enabled else off
    fits = None if usable is None else chosen.total <= usable
    advice = (
        []
        if usable is None or fits
        else _advice(shape, lengths, batch_size, batching, usable, enabled, on, estimate_kwargs)
    )
    sharding = estimate_kwargs.get("sharding")
    strategy = (
        sharding.label
        if sharding is not None
        else Sharding.full(estimate_kwargs.get("shards", 1)).label
        if estimate_kwargs.get("shards", 1) > 1
        else "one process"
    )
    return MemoryPlan(
        requested=requested,
        checkpointing=enabled,
        reason=reason,
        budget_bytes=budget.bytes,
        budget_source=budget.source,
        usable_bytes=usable,
        estimate=chosen,
        estimate_without=off,
        estimate_with=on,
        fits=fits,
        advice=advice,
        strategy=strategy,
    )


def _advice(
    shape: ModelShape,
    lengths: Sequence[int],
    batch_size: int,
    batching: str,
    usable: int,
    enabled: bool,
    on: MemoryEstimate,
    kwargs: dict[str, Any],
) -> list[str]:
    """What would make the run fit: only changes whose own estimate fits the same budget."""
    tips = []
    if not enabled and on.total <= usable:
        tips.append(f"train.gradient_checkpointing: true (or auto): {size(on.total)}")
    for smaller in range(batch_size - 1, 0, -1):
        est = estimate_memory(shape, largest_micro_batch(lengths, smaller, batching), checkpointing=True, **kwargs)
        if est.total <= usable:
            accum = math.ceil(batch_size / smaller)
            tips.append(
                f"train.per_device_train_batch_size: {smaller} with gradient_accumulation_steps x{accum} for the "
                f"same effective batch, and checkpointing on: {size(est.total)}"
            )
            break
    if batching != "packed":
        est = estimate_memory(shape, largest_micro_batch(lengths, batch_size, "packed"), checkpointing=True, **kwargs)
        if est.total <= usable:
            tips.append(f"train.batching: packed (no padding), with checkpointing: {size(est.total)}")
    if shape.trainable is None or shape.trainable >= 0.5 * shape.total_params:
        lora = ModelShape(**{**asdict(shape), "trainable": max(1, shape.total_params // 100)})
        est = estimate_memory(lora, on.batch, checkpointing=True, **kwargs)
        if est.total <= usable:
            tips.append(
                f"train.lora: {{r: 16}} (about 1% of the weights trained), with checkpointing: {size(est.total)}"
            )
    tips.append(
        "a smaller data.max_length (shorter rows)"
        if tips
        else "none of batch size, packing or LoRA fits alone: shorten rows (data.max_length), or use a larger device "
        "or several (DeepSpeed ZeRO-3 / FSDP shard the weights and optimizer)"
    )
    return tips


def _kept(checkpoint: str | None) -> str:
    return (
        f"The last checkpoint, {checkpoint}, is kept: rerun with --resume to continue from it."
        if checkpoint
        else "No checkpoint was saved yet."
    )


def eval_oom_hint(checkpoint: str | None) -> str:
    """The fixes for running out of memory while evaluating during training."""
    return (
        "try a smaller train.per_device_eval_batch_size (evaluation keeps no gradients, but its batches are "
        "often larger); or train.eval_strategy: no, and `prmkit eval` on the saved model. " + _kept(checkpoint)
    )


def oom_hint(plan: MemoryPlan | None, checkpoint: str | None) -> str:
    """The fixes an out-of-memory failure names, most effective first for the run that failed."""
    fixes = []
    if plan is None or not plan.checkpointing:
        fixes.append("train.gradient_checkpointing: true")
    fixes += [
        "a smaller train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch)",
        "train.batching: packed (no padding)",
        "train.lora: {r: 16}",
        "train.memory_budget_gb: the memory you really have",
    ]
    return "try " + "; or ".join(fixes) + f". {_kept(checkpoint)}"
