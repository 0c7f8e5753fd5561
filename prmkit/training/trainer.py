"""What ``transformers.Trainer`` runs with in prmkit: the Trainer subclass, its callbacks and the token meter.

This module imports transformers at its top; :func:`prmkit.training.recipe.setup_trainer` imports it when it builds the
Trainer, so importing the recipe stays light (the ``prmkit train --num-processes`` launcher imports it only to check
the config and the output directory before it starts the training processes).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from prmkit.core.checkpoints import mark_complete, save_failure
from prmkit.core.jsonio import dumps
from prmkit.errors import Interrupted
from prmkit.training.batching import LengthGroupedSampler
from prmkit.training.distributed import StrategyPlan, enable_cpu_deepspeed, enable_cpu_fsdp
from prmkit.training.kernels import check_forward_untouched

log = logging.getLogger("prmkit")

ENV_DEBUG_ROWS = "PRMKIT_DEBUG_ROWS_DIR"
"""Debug: a directory where each rank writes the `row` ids of the training examples it saw (rows-rank{N}.json)."""


class TokenMeter:
    """Non-padding tokens trained on by this rank; a device tensor, read only when shown, so no step waits on it."""

    def __init__(self) -> None:
        self.total: Any = 0
        self.rows: list[int] | None = [] if os.environ.get(ENV_DEBUG_ROWS) else None

    def add(self, n_tokens: Any) -> None:
        self.total = self.total + n_tokens

    def value(self) -> int:
        return int(self.total.item()) if hasattr(self.total, "item") else int(self.total)


def write_debug_rows(meter: TokenMeter, rank: int) -> None:
    directory = os.environ.get(ENV_DEBUG_ROWS)
    if not directory or meter.rows is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"rows-rank{rank}.json").write_text(dumps(meter.rows), encoding="utf-8")


class StepTrainer(Trainer):
    """The Trainer with prmkit's sampler, token meter and debug row log; the loss is ``compute_loss_func``."""

    def __init__(
        self,
        *args: Any,
        batching: str,
        lengths: Sequence[int] | None,
        meter: TokenMeter,
        on_checkpoint: Any = None,
        strategy: StrategyPlan | None = None,
        **kwargs: Any,
    ):
        self.prmkit_strategy = strategy
        self.prmkit_batching = batching
        self.prmkit_lengths = lengths
        self.prmkit_meter = meter
        self.prmkit_on_checkpoint = on_checkpoint
        super().__init__(*args, **kwargs)
        # The loss is computed outside the model; don't hand the model loss kwargs it might not expect.
        self.model_accepts_loss_kwargs = False
        self.prmkit_at_end = AtEndCheck()
        self.add_callback(self.prmkit_at_end)
        if self.args.use_liger_kernel:
            self.add_callback(ForwardCheck())

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.prmkit_strategy is not None:  # accelerate drops FSDP and DeepSpeed over CPU processes
            asked = self.prmkit_strategy.asked
            enable_cpu_fsdp(self, asked) or enable_cpu_deepspeed(self, asked)

    prmkit_evaluating = False
    """True from the start of an evaluation until it returns: an out-of-memory error with it still set came from
    evaluating, and is reported with the evaluation's own fixes."""

    def evaluate(self, *args: Any, **kwargs: Any):
        self.prmkit_evaluating = True
        metrics = super().evaluate(*args, **kwargs)
        self.prmkit_evaluating = False
        return metrics

    def _get_train_sampler(self, train_dataset: Any = None):
        if self.prmkit_batching == "grouped" and self.prmkit_lengths is not None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(self.prmkit_lengths, self.args.per_device_train_batch_size, seed)
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.prmkit_at_end.nothing_left:
            # A checkpoint saved at the last step (a run stopped during its final save): the Trainer would still
            # train the rest of the epoch it resumes in. No batch, and training stops before any step.
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("row", None)
        n_tokens = inputs.pop("n_tokens", None)
        inputs.pop("skip_logits", None)  # the Trainer adds it for Liger's causal-LM loss, which a PRM does not use
        if model.training:
            if n_tokens is not None:
                self.prmkit_meter.add(n_tokens)
            if rows is not None and self.prmkit_meter.rows is not None:
                self.prmkit_meter.rows.extend(int(r) for r in rows.tolist())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        # A checkpoint is complete only once every process has written its part; the marker says so, and older
        # checkpoints are rotated away only after it exists, so a kill at any moment leaves a complete one.
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers 5.0-5.1: only the Trainer's own method (it reads args.save_total_limit)
            rotate_checkpoints = None  # type: ignore[assignment]  # the fallback below takes over

        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        run_dir = self._get_output_dir(trial=trial)
        path = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            failed = save_failure(e, f"cannot save {path.name} in {run_dir}", Path(run_dir))
            if failed is None:
                raise
            raise failed from e
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(path)
            if rotate_checkpoints is None:
                self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            else:
                rotate_checkpoints(
                    output_dir=run_dir,
                    save_total_limit=limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=True,
                )
            if self.prmkit_on_checkpoint is not None:
                self.prmkit_on_checkpoint(path)


class ForwardCheck(TrainerCallback):
    """Liger is applied when training starts: check then that it left the token-classification forward alone."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_forward_untouched(model)


class AtEndCheck(TrainerCallback):
    """Whether the run starts at (or past) its last step: resumed from the checkpoint of its last step, it has
    nothing left to train, and ends with the checkpoint's weights (the same as the run that saved it)."""

    nothing_left = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.nothing_left = 0 < state.max_steps <= state.global_step
        if self.nothing_left and state.is_world_process_zero:
            log.info(
                f"nothing left to train: the checkpoint is at step {state.global_step} of "
                f"{state.max_steps}; saving its model"
            )

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.nothing_left:
            # No step ran: the checkpoint already holds this state and its evaluation (the final one comes later).
            control.should_save = control.should_evaluate = control.should_log = False
        return control


class InterruptCallback(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the step, save a checkpoint, stop. A second one: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self.signal: str | None = None
        """The signal that stopped the run: "SIGINT" or "SIGTERM" (the CLI exits with 128 + its number)."""
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # SIGTERM too: a launcher (torchrun) or a job scheduler stops workers with it, and waits a while.
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, handler)
        self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.uninstall()
            raise Interrupted(signum)
        self.requested = True
        self.signal = signal.Signals(signum).name
        again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {self.signal} or Ctrl-C"
        log.warning(f"{self.signal} received: saving a checkpoint after this step; {again} stops without saving")

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.requested
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop at the same step, or the others wait forever in the next collective.
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class ProgressCallback(TrainerCallback):
    """Step, loss, learning rate, tokens/s and ETA on stderr (rich); a bar on a terminal, lines otherwise."""

    def __init__(self, console: Any, meter: TokenMeter, world_size: int) -> None:
        self.console = console
        self.meter = meter
        self.world_size = world_size
        self.progress: Any = None
        self.task: Any = None
        self.start = 0.0
        self.start_step = 0
        self.start_tokens = 0
        self.last_logs: dict[str, Any] = {}

    def _tps(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.meter.value() - self.start_tokens) * self.world_size / elapsed if elapsed > 0 else 0.0

    def _fields(self, state) -> str:
        parts = []
        if "loss" in self.last_logs:
            parts.append(f"loss {self.last_logs['loss']:.4f}")
        if "learning_rate" in self.last_logs:
            parts.append(f"lr {self.last_logs['learning_rate']:.2e}")
        parts.append(f"{self._tps():,.0f} tok/s")
        return "  ".join(parts)

    def _eta(self, state) -> str:
        done = state.global_step - self.start_step
        if done <= 0 or not state.max_steps:
            return "?"
        left = (time.perf_counter() - self.start) / done * (state.max_steps - state.global_step)
        return time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start = time.perf_counter()
        self.start_step = state.global_step
        self.start_tokens = self.meter.value()
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs or "learning_rate" in logs:
            self.last_logs.update({k: v for k, v in logs.items() if k in ("loss", "learning_rate")})
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, info=self._fields(state))
            else:
                self.console.print(
                    f"step {state.global_step}/{state.max_steps}  {self._fields(state)}  eta {self._eta(state)}",
                    markup=False,
                    highlight=False,
                )
        evals = {k[5:]: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if evals:
            shown = "  ".join(
                f"{k} {v:.4f}" for k, v in evals.items() if k in ("loss", "accuracy", "correct_f1", "wrong_f1", "auroc")
            )
            self.console.print(f"eval at step {state.global_step}: {shown}", markup=False, highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
