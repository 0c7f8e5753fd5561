"""What a training run did: :class:`TrainResult`, which :func:`prmkit.training.recipe.train` returns and
:func:`prmkit.training.save.save_final` records in ``prmkit.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What a training run did; `prmkit train --json` prints it."""

    output_dir: str
    model_dir: str | None
    """Where the trained model is (None when the run was interrupted before it finished)."""
    seconds: float = 0.0
    global_step: int = 0
    max_steps: int = 0
    epochs: float = 0.0
    train_rows: int = 0
    eval_rows: int = 0
    tokens: int = 0
    """Non-padding tokens trained on, all ranks together."""
    tokens_per_second: float = 0.0
    train_loss: float | None = None
    """Mean training loss over the steps run in this process (the Trainer's `train_loss`)."""
    final_loss: float | None = None
    """The last logged training loss."""
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    eval_error: str | None = None
    """Why the final evaluation has no figures (it ran out of memory); None when it ran or there was no eval data."""
    batching: str = ""
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    memory: dict[str, Any] | None = None
    """The memory plan: the estimate, the budget, and why checkpointing is on or off
    (prmkit.models.memory.MemoryPlan)."""
    peak_memory_gib: float | None = None
    """Peak memory reserved by this process's CUDA allocator (rank 0), when training ran on CUDA."""
    allocator: str | None = None
    loss_history: list[list[float]] = field(default_factory=list)
    """[step, loss] for every logged training loss."""
    lora: dict[str, Any] | None = None
    world_size: int = 1
    strategy: dict[str, Any] | None = None
    """The distributed strategy that ran (prmkit.training.distributed.Strategy): DDP, FSDP, DeepSpeed, one process."""
    resumed_from: str | None = None
    skipped_checkpoints: list[dict[str, str]] = field(default_factory=list)
    """Checkpoints newer than ``resumed_from`` that were incomplete, each with the reason; set aside, not used."""
    interrupted: bool = False
    signal: str | None = None
    """The signal that interrupted the run ("SIGINT", "SIGTERM"); the CLI exits with 128 + its number."""
    checkpoint: str | None = None
    """The latest checkpoint directory, if any (after an interrupt: the one to resume from)."""
    pushed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
