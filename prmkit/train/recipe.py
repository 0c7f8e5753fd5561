"""Train a PRM: a token-classification model whose label at each step's last separator token says "step correct".

The loop is `transformers.Trainer` (so accelerate, DeepSpeed, FSDP and checkpoints come with it); prmkit adds:

- data from :func:`prmkit.data.prepare.prepare_splits` (cached; the main process prepares, the other ranks read the cache);
- a loss that takes hard (0/1) and soft (probability) step labels alike;
- batching: ``padded`` (random order), ``grouped`` (similar lengths together, less padding), ``packed`` (no padding
  at all, with flash-attention's or FlexAttention's variable-length kernels on a GPU);
- memory that fits: the expandable-segments allocator, and gradient checkpointing turned on only when the estimated
  peak would not fit the device (:mod:`prmkit.models.memory`); an out-of-memory error becomes one message naming the fixes;
- step-level eval metrics at labelled positions, gathered across ranks in fixed shapes;
- a self-describing output directory (weights, tokenizer, ``prmkit.json``, the resolved config), safe resuming, and a
  checkpoint on Ctrl-C.

Everything here is callable from Python: ``train(load_config("cfg.yaml"))``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from prmkit.config.schema import Config, eval_schedule
from prmkit.config.training_args import (
    GROUPED_STRATEGIES,
    LENGTH_COLUMN,
    check_integrations,
    check_training_arguments,
    training_argument_fields,
)
from prmkit.core.filenames import PRMKIT_JSON
from prmkit.core.jsonio import dumps
from prmkit.core.version import __version__
from prmkit.errors import (
    ConfigError,
    Interrupted,
    PrmkitError,
    TrainingOutOfMemory,
    UsageError,
    first_line,
    reworded,
)
from prmkit.models.loading import (
    BASE_MODEL_DIR,
    disable_dropout,
    ensure_pad_token,
    is_causal,
    load_model_config,
    load_model_for_training,
)
from prmkit.models.lora import apply_lora
from prmkit.models.memory import (
    GIB,
    MemoryPlan,
    allocator_setting,
    device_budget,
    eval_oom_hint,
    model_shape,
    oom_hint,
    plan_memory,
    release_memory,
    size,
    use_expandable_segments,
)
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.tokenization import TokenizationParams
from prmkit.train.kernels import (
    check_forward_untouched,
    liger_kernel_config,
    liger_supports,
    model_class_for,
    varlen_kernels_available,
)

if TYPE_CHECKING:  # pragma: no cover
    pass

from prmkit.core.checkpoints import (
    latest_complete_checkpoint,
    mark_complete,
    save_failure,
)
from prmkit.core.overwrite import FINAL_TMP, settle_overwrite
from prmkit.kinds.heads import preprocess_logits_for_metrics, step_loss_func
from prmkit.train.batching import (
    LengthGroupedSampler,
    StepCollator,
    make_compute_metrics,
    resolve_batching,
)
from prmkit.train.example import apply_example, apply_tiny
from prmkit.train.lm_tag import LMTag
from prmkit.train.run_dir import OutputPlan, claim_output_dir, prepare_output_dir

log = logging.getLogger("prmkit")

ENV_LAUNCHED = "PRMKIT_LAUNCHED"
"""Set by `prmkit train --num-processes` in the processes it launches, so they never launch again."""
ENV_DEBUG_ROWS = "PRMKIT_DEBUG_ROWS_DIR"
"""Debug: a directory where each rank writes the `row` ids of the training examples it saw (rows-rank{N}.json)."""


# ---------------------------------------------------------------------------------------------------------------------
# Results


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
    """The memory plan: the estimate, the budget, and why checkpointing is on or off (prmkit.models.memory.MemoryPlan)."""
    peak_memory_gib: float | None = None
    """Peak memory reserved by this process's CUDA allocator (rank 0), when training ran on CUDA."""
    allocator: str | None = None
    loss_history: list[list[float]] = field(default_factory=list)
    """[step, loss] for every logged training loss."""
    lora: dict[str, Any] | None = None
    world_size: int = 1
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



def resolve_config(cfg: Config) -> Config:
    """The config a run actually uses (the tiny model and the example filled in); recorded as prmkit_config.yaml."""
    if cfg.model.tiny:
        apply_tiny(cfg)
    if cfg.train.example:
        apply_example(cfg)
    if not cfg.model.name_or_path:
        raise UsageError("no model: set model.name_or_path", hint="e.g. --model Qwen/Qwen2-0.5B, or --example for an offline smoke run")
    if not cfg.data.train:
        raise UsageError("no training data: set data.train", hint="e.g. --train trl-lib/math_shepherd or --train rows.jsonl")
    from prmkit.data.splits import check_eval_fraction, prepared_eval

    check_eval_fraction(cfg.data)
    if not cfg.is_set("data.eval") and cfg.data.eval_fraction is None and prepared_eval(cfg.data.train):
        # prepare's output with an eval split: evaluate on it, as `load_from_disk(dir)["eval"]` would be used.
        log.info(f"data.eval: using the eval split of {cfg.data.train}")
        cfg.data.eval = cfg.data.train
    return cfg


def has_eval_data(cfg: Config) -> bool:
    return bool(cfg.data.eval or cfg.data.eval_fraction)


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks


class TokenMeter:
    """Non-padding tokens trained on by this rank; a device tensor, read only when shown, so no step waits on it."""

    def __init__(self) -> None:
        self.total: Any = 0
        self.rows: list[int] | None = [] if os.environ.get(ENV_DEBUG_ROWS) else None

    def add(self, n_tokens: Any) -> None:
        self.total = self.total + n_tokens

    def value(self) -> int:
        return int(self.total.item()) if hasattr(self.total, "item") else int(self.total)


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    class StepTrainer(Trainer):
        """The Trainer with prmkit's sampler, token meter and debug row log; the loss is ``compute_loss_func``."""

        def __init__(self, *args: Any, batching: str, lengths: Sequence[int] | None, meter: TokenMeter,
                     on_checkpoint: Any = None, **kwargs: Any):
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
                rotate_checkpoints = None

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
                    rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                       best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
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
                log.info(f"nothing left to train: the checkpoint is at step {state.global_step} of "
                         f"{state.max_steps}; saving its model")

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
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                         TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
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
                    self.console.print(f"step {state.global_step}/{state.max_steps}  {self._fields(state)}  "
                                       f"eta {self._eta(state)}", markup=False, highlight=False)
            evals = {k[5:]: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            if evals:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in evals.items()
                                  if k in ("loss", "accuracy", "correct_f1", "wrong_f1", "auroc"))
                self.console.print(f"eval at step {state.global_step}: {shown}", markup=False, highlight=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return StepTrainer, InterruptCallback, ProgressCallback


# ---------------------------------------------------------------------------------------------------------------------
# Training


def build_training_arguments(cfg: Config, has_eval: bool):
    """TrainingArguments from the config's `train` section, with prmkit's settings for what the user left unset."""
    from transformers import TrainingArguments

    ta = dict(cfg.training_arguments)
    check_training_arguments(ta, cfg.train.batching)
    for key, value in ta.items():
        # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the strategy "no".
        if value is False and (key.endswith("_strategy") or key == "hub_strategy"):
            ta[key] = "no"
    ta.pop("push_to_hub", None)  # prmkit pushes the finished directory itself (prmkit.hub), not the Trainer
    # ... with this token (see _push): the Trainer would pickle it into every checkpoint's training_args.bin.
    ta.pop("hub_token", None)
    ta.pop("resume_from_checkpoint", None)
    ta.setdefault("disable_tqdm", True)
    # transformers' default is 3 epochs; prmkit's template and README promise 1 (the seed recipe's).
    ta.setdefault("num_train_epochs", 1)
    ta.setdefault("remove_unused_columns", False)  # the collator needs `row`; the model never sees it
    ta.setdefault("label_names", ["labels"])
    if "length_column_name" in training_argument_fields():
        # The Trainer's length samplers (train_sampling_strategy) read the lengths prmkit stored, not every row.
        ta["length_column_name"] = LENGTH_COLUMN
    # Every trainable parameter takes part in every forward pass; searching for unused ones costs a graph walk a step.
    ta.setdefault("ddp_find_unused_parameters", False)
    import torch

    if ta.get("use_liger_kernel"):
        ta["liger_kernel_config"] = liger_kernel_config(ta.get("liger_kernel_config"), cuda=torch.cuda.is_available())
    if not torch.cuda.is_available():
        ta.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator; without one it only warns
    ta.update(eval_schedule(ta, has_eval))  # `config show` prints the same
    try:
        args = TrainingArguments(**ta)
    except (ValueError, TypeError, ImportError) as e:  # ImportError: a package a setting needs is missing
        raise ConfigError(f"train: {first_line(e)}") from None
    check_integrations(args)
    return args


def train(
    cfg: Config,
    overwrite: bool = False,
    resume: bool | str | None = None,
    console: Any = None,
    callbacks: list | None = None,
    accept_changes: bool = False,
) -> TrainResult:
    """Train a PRM as the config says and write the model directory; see the module docstring.

    ``resume`` (True: the last checkpoint; a path: that one) defaults to ``train.resume_from_checkpoint``; a resumed
    run whose config changes its schedule or data is refused unless ``accept_changes`` (``--resume-with-changes``). A rich
    ``console`` gets the progress display; without one, progress goes to the `prmkit` logger only at the end.
    """
    import torch
    from accelerate import PartialState

    from prmkit.data.sources import resolve_source

    cfg = resolve_config(cfg)
    if not torch.cuda.is_initialized():
        use_expandable_segments()  # the CLI did it already; a Python caller gets it here, before CUDA starts
    model_config = load_model_config(cfg.model)  # a missing or bidirectional model fails here, before any data work
    for spec in (cfg.data.train, cfg.data.eval):
        if spec:
            resolve_source(spec)  # a missing, empty, UTF-16 or stdin source too, before the output directory is touched
    if resume is None:
        resume = cfg.training_arguments.get("resume_from_checkpoint") or None
    has_eval = has_eval_data(cfg)
    args = build_training_arguments(cfg, has_eval)
    _ = args.device  # initialises the distributed state before PartialState is asked for it
    state = PartialState()

    # The main process locks the output directory and decides; every process follows its answer, refusals included.
    lock = None
    decision: dict[str, Any] = {}
    if state.is_main_process:
        try:
            plan, lock = claim_output_dir(cfg, overwrite=overwrite, resume=resume, accept_changes=accept_changes)
            decision = {"plan": plan}
        except PrmkitError as e:
            decision = {"error": (type(e), e.message, e.hint)}
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list([decision])[0]
    if "error" in decision:
        kind, message, hint = decision["error"]
        raise kind(message, hint=hint)
    plan = decision["plan"]
    try:
        return _train_planned(cfg, plan, state, args, model_config, console, callbacks)
    finally:
        # However the run ended (finished, interrupted, failed): keep it if it saved something, else restore.
        if state.is_main_process and plan.action == "overwrite":
            settled = settle_overwrite(plan.output_dir)
            if settled:
                log.warning(settled)
        if lock is not None:
            lock.release()


def _train_planned(cfg: Config, plan: OutputPlan, state: Any, args: Any, model_config: Any, console: Any,
                   callbacks: list | None) -> TrainResult:
    import torch

    from prmkit.data.prepare import prepare_splits
    from prmkit.models.files import check_tokenizer_fits
    from prmkit.models.loading import load_tokenizer

    has_eval = has_eval_data(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name, cfg.model.trust_remote_code)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    check_tokenizer_fits(tokenizer, getattr(text_config, "vocab_size", None), cfg.tokenizer_name,
                         cfg.data.step_separator if cfg.train.kind != "lm-tag" else None)
    ensure_pad_token(tokenizer)
    lm_tag = LMTag.setup(cfg, tokenizer) if cfg.train.kind == "lm-tag" else None
    with state.main_process_first():
        prepared = prepare_splits(cfg, tokenizer)
    if prepared.rejects_path is not None and state.is_main_process:
        rejected = sum(r.rows_rejected for r in prepared.reports.values())
        log.warning(f"skipped {rejected} invalid rows (data.skip_invalid); they are listed in {prepared.rejects_path}")
    dsd = prepared.load()
    train_ds = dsd["train"]
    eval_ds = dsd["eval"] if has_eval and "eval" in dsd else None
    soft = train_ds.features["labels"].feature.dtype == "float32"

    cuda = args.device.type == "cuda"
    kernels = varlen_kernels_available(model_class_for(model_config, cfg.train.kind)) if cuda else []
    batching, attn = resolve_batching(cfg.train.batching, cfg.model.attn_implementation, cuda=cuda,
                                      causal=is_causal(model_config), kernels=kernels)
    if batching == "grouped" and getattr(args, "train_sampling_strategy", "random") not in GROUPED_STRATEGIES:
        batching = "padded"  # `auto` chose grouped; the order asked for is the Trainer's sampler's (padded batches)
    model = load_model_for_training(cfg.model, tokenizer, seed=args.seed, config=model_config, kind=cfg.train.kind,
                                    new_tokens=lm_tag.new_ids if lm_tag else None, attn_implementation=attn)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    lora_info = None
    if cfg.train.lora is not None:
        model = apply_lora(model, cfg.train.lora, cfg.train.kind)
        pc = model.peft_config["default"]
        lora_info = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout,
                     "target_modules": sorted(pc.target_modules) if isinstance(pc.target_modules, (set, list)) else pc.target_modules,
                     "modules_to_save": _present_modules(model, pc.modules_to_save), "merged": bool(cfg.train.lora_merge)}
        if state.is_main_process:
            trainable, total = model.get_nb_trainable_parameters()
            log.info(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    # Every input has been read (tokenizer, data, weights): only now may the output directory change.
    if state.is_main_process:
        prepare_output_dir(plan, cfg)
    state.wait_for_everyone()
    attn = str(getattr(model.config, "_attn_implementation", None) or attn or "")
    if batching == "packed" and not (cuda and attn.startswith(("flash", "flex"))):
        log.info(f"packed batching with {attn or 'default'} attention: correct, but attention runs over a dense mask of the whole pack")
    if args.use_liger_kernel and liger_supports(getattr(model_config, "model_type", None)) is False:
        log.warning(f"Liger has no kernels for model type {model_config.model_type!r}; training without them")
    if eval_ds is not None and batching != "packed":
        import numpy as np

        # Less padding; the metrics do not depend on the order.
        eval_ds = eval_ds.select(np.argsort(np.asarray(eval_ds["num_tokens"]), kind="stable"))
    if len(train_ds) == 0:
        raise UsageError(f"{cfg.data.train}: no training rows left after preparation")
    lengths = train_ds["num_tokens"]
    memory = _memory_plan(cfg, args, state, model, model_config, lengths, batching, attn)
    set_checkpointing(args, memory.checkpointing)
    if state.is_main_process:
        log.info(memory.preflight())
        if memory.fits is False:
            log.warning("the run may not fit the device; what would: " + "; ".join(memory.advice))
    # Rows come out of the dataset as numpy arrays: the collator copies them whole, not token by token.
    train_ds = train_ds.with_format("numpy")
    if eval_ds is not None:
        eval_ds = eval_ds.with_format("numpy")

    StepTrainer, InterruptCallback, ProgressCallback = _trainer_classes()
    meter = TokenMeter()
    interrupt = InterruptCallback()
    all_callbacks: list = [interrupt]
    if console is not None and state.is_main_process:
        all_callbacks.append(ProgressCallback(console, meter, state.num_processes))
    all_callbacks += list(callbacks or [])
    trainer = StepTrainer(
        model=model,
        args=args,
        data_collator=StepCollator(tokenizer.pad_token_id, batching, soft, causal=is_causal(model_config)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        compute_loss_func=(lm_tag.loss if lm_tag else step_loss_func)(args.label_smoothing_factor),
        compute_metrics=make_compute_metrics(cfg.eval.threshold) if eval_ds is not None else None,
        preprocess_logits_for_metrics=(lm_tag.preprocess if lm_tag else preprocess_logits_for_metrics)
        if eval_ds is not None else None,
        callbacks=all_callbacks,
        batching=batching,
        lengths=lengths if batching == "grouped" else None,
        meter=meter,
        # An --overwrite run that has saved a complete checkpoint has something to keep: the previous contents go.
        on_checkpoint=(lambda _path: settle_overwrite(plan.output_dir)) if plan.action == "overwrite" else None,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout, which is for results only

    if plan.action == "resume":
        log.info(f"resuming from {plan.checkpoint}")
    started = time.perf_counter()
    interrupt.install()
    try:
        output = trainer.train(resume_from_checkpoint=plan.checkpoint if plan.action == "resume" else None)
    except _oom_errors():
        last, _ = latest_complete_checkpoint(plan.output_dir)
        checkpoint = str(last) if last else None
        if trainer.prmkit_evaluating:
            raise TrainingOutOfMemory(
                f"out of memory evaluating at step {trainer.state.global_step} (eval batches of "
                f"{trainer.args.per_device_eval_batch_size} rows)", hint=eval_oom_hint(checkpoint)) from None
        budget = f" of the {size(memory.usable_bytes)} usable" if memory.usable_bytes is not None else ""
        raise TrainingOutOfMemory(
            f"out of memory at step {trainer.state.global_step + 1} (estimated peak {size(memory.estimate.total)}"
            f"{budget}, gradient checkpointing {'on' if memory.checkpointing else 'off'}, largest micro-batch "
            f"{memory.estimate.batch.describe()})", hint=oom_hint(memory, checkpoint)) from None
    finally:
        interrupt.uninstall()
        _write_debug_rows(meter, state.process_index)
    seconds = time.perf_counter() - started
    tokens_tensor = torch.tensor([meter.value()], dtype=torch.long, device=args.device)
    tokens = int(trainer.accelerator.reduce(tokens_tensor, reduction="sum").item()) if state.num_processes > 1 else meter.value()

    history = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    losses = [loss for _, loss in history]
    result = TrainResult(
        output_dir=str(plan.output_dir),
        model_dir=None,
        seconds=round(seconds, 3),
        global_step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        epochs=round(float(trainer.state.epoch or 0.0), 4),
        train_rows=len(train_ds),
        eval_rows=len(eval_ds) if eval_ds is not None else 0,
        tokens=tokens,
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        train_loss=None if output.training_loss is None or math.isnan(output.training_loss)
        or trainer.prmkit_at_end.nothing_left else float(output.training_loss),
        final_loss=float(losses[-1]) if losses else None,
        batching=batching,
        attn_implementation=attn or None,
        gradient_checkpointing=memory.checkpointing,
        memory=memory.to_dict(),
        peak_memory_gib=round(torch.cuda.max_memory_reserved(args.device) / GIB, 2) if cuda else None,
        allocator=allocator_setting() if cuda else None,
        loss_history=history,
        lora=lora_info,
        world_size=state.num_processes,
        resumed_from=plan.checkpoint if plan.action == "resume" else None,
        skipped_checkpoints=[{"checkpoint": p, "reason": why} for p, why in plan.skipped],
    )
    if interrupt.stopped:
        result.interrupted = True
        result.signal = interrupt.signal
        last, _ = latest_complete_checkpoint(plan.output_dir)
        result.checkpoint = str(last) if last else None
        return result

    if eval_ds is not None:
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is None or last_eval.get("step") != trainer.state.global_step:
            last_eval = _final_evaluation(trainer, result)
        result.eval_metrics = {k[5:]: v for k, v in (last_eval or {}).items()
                               if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")}

    try:
        _save_final(trainer, cfg, tokenizer, prepared, plan.output_dir, state, result, lora_info, batching)
    except Exception as e:
        failed = save_failure(e, f"cannot save the trained model in {plan.output_dir}", plan.output_dir)
        if failed is None:
            raise
        raise failed from e
    if state.is_main_process:
        settle_overwrite(plan.output_dir)  # the finished model is in place: the previous contents go
    result.model_dir = str(plan.output_dir)
    last, _ = latest_complete_checkpoint(plan.output_dir)
    result.checkpoint = str(last) if last else None

    push_flag = cfg.training_arguments.get("push_to_hub")
    if push_flag and state.is_main_process:
        result.pushed = _push(cfg, plan.output_dir, lora_info)
    state.wait_for_everyone()
    return result


def _final_evaluation(trainer: Any, result: TrainResult) -> dict[str, Any] | None:
    """The evaluation after the last step; None, with the reason in ``result.eval_error``, when it runs out of memory.

    Training is done by then: its model is saved either way rather than lost to an evaluation that did not fit
    (evaluation batches can be larger than training ones, and nothing is checkpointed between the two).
    """
    try:
        return trainer.evaluate()
    except _oom_errors() as e:
        release_memory()
        result.eval_error = f"out of memory during the final evaluation ({first_line(e)})"
        log.warning(f"{result.eval_error}; the trained model is saved without its eval figures. Lower "
                    "train.per_device_eval_batch_size, or run `prmkit eval` on the saved model")
        return None


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    # torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
    return (getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError,)


def set_checkpointing(args: Any, enabled: bool) -> None:
    """Turn gradient checkpointing on or off in TrainingArguments (named activation_checkpointing since transformers
    5.2x, with gradient_checkpointing kept as its alias; the Trainer reads whichever its version has)."""
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(args, name):
            setattr(args, name, bool(enabled))


def requested_checkpointing(cfg: Config) -> str | bool:
    """train.gradient_checkpointing, or transformers' newer name for it when only that one was set."""
    requested = cfg.train.gradient_checkpointing
    if requested == "auto" and cfg.training_arguments.get("activation_checkpointing") is not None:
        return bool(cfg.training_arguments["activation_checkpointing"])
    return requested


def _memory_plan(cfg: Config, args: Any, state: Any, model: Any, model_config: Any, lengths: Sequence[int],
                 batching: str, attn: str) -> MemoryPlan:
    """The memory plan for this process; under several processes, all plan against the smallest budget."""
    import torch
    from accelerate.utils import DistributedType

    budget = device_budget(cfg.train.memory_budget_gb, args.device)
    if budget.bytes is not None and state.num_processes > 1 and torch.distributed.is_initialized():
        t = torch.tensor([budget.bytes], dtype=torch.long, device=args.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        budget = type(budget)(int(t.item()), budget.source + " (smallest of all processes)")
    shards = state.num_processes if state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP) else 1
    param = next(model.parameters())
    optim = getattr(args.optim, "value", args.optim)
    shape = model_shape(model_config, model, lm_head=cfg.train.kind == "lm-tag")
    return plan_memory(requested_checkpointing(cfg), shape, lengths,
                       args.per_device_train_batch_size, batching, budget, param_bytes=param.element_size(),
                       mixed=bool(args.bf16 or args.fp16), optimizer=str(optim), attention=attn or "sdpa", shards=shards)


def _present_modules(model: Any, names: Any) -> list[str]:
    # peft adds its generic head names ("classifier", "score") to modules_to_save; report the ones that exist.
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return sorted({n for n in names or [] if n in present})


def _write_debug_rows(meter: TokenMeter, rank: int) -> None:
    directory = os.environ.get(ENV_DEBUG_ROWS)
    if not directory or meter.rows is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"rows-rank{rank}.json").write_text(dumps(meter.rows), encoding="utf-8")


def _save_final(trainer: Any, cfg: Config, tokenizer: Any, prepared: Any, output_dir: Path, state: Any,
                result: TrainResult, lora_info: dict | None, batching: str) -> None:
    """Write the model beside the checkpoints: build it in a hidden directory, then move the files in."""
    from accelerate.utils import DistributedType

    tmp = output_dir / FINAL_TMP
    sharded = trainer.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    adapter_dir: str | None = None
    if lora_info is None:
        trainer.save_model(str(tmp))  # gathers DeepSpeed/FSDP shards; writes on the main process only
    elif cfg.train.lora_merge and not sharded:
        trainer.save_model(str(tmp / "adapter"))
        if state.is_main_process:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        adapter_dir = "adapter"
    else:
        if cfg.train.lora_merge:
            log.warning("LoRA merge is not done under DeepSpeed/FSDP; saving the adapter (merge it after loading)")
            if lora_info is not None:
                lora_info["merged"] = False
        trainer.save_model(str(tmp))
        adapter_dir = "."
        if cfg.model.init_from_config and state.is_main_process:
            # The random base cannot be downloaded again; keep it so the adapter can be loaded.
            base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
            _save_base_without_lora(base, tmp / BASE_MODEL_DIR)
    if not state.is_main_process:
        state.wait_for_everyone()
        return
    for pickled in (tmp / "training_args.bin", tmp / "adapter" / "training_args.bin"):
        pickled.unlink(missing_ok=True)  # a pickle, not part of the model; checkpoints keep their own copy

    params = TokenizationParams.from_data_config(cfg.data)
    from prmkit.tokenization import tokenizer_fingerprint

    hyper = {k: v for k, v in cfg.training_arguments.items() if not k.startswith("hub_") and k != "output_dir"}
    training = {
        **hyper,
        "disable_dropout": cfg.train.disable_dropout,
        "world_size": state.num_processes,
        "effective_batch_size": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps * state.num_processes,
        "global_step": result.global_step,
        "epochs": result.epochs,
        "train_loss": result.train_loss,
        "final_loss": result.final_loss,
        "eval": result.eval_metrics,
        **({"eval_error": result.eval_error} if result.eval_error else {}),
        "seconds": result.seconds,
        "gradient_checkpointing": result.gradient_checkpointing,
        "gradient_checkpointing_reason": (result.memory or {}).get("reason"),
        "memory": result.memory,
        "attn_implementation": result.attn_implementation,
    }
    data = {**prepared.metadata.get("data", {}), "cache_key": prepared.metadata.get("cache_key"),
            "splits": prepared.metadata.get("splits", {})}
    extra: dict[str, Any] = {
        "training": training,
        "lora": lora_info,
        "batching": batching,
        "model": {"init_from_config": cfg.model.init_from_config, "dtype": cfg.model.dtype,
                  "attn_implementation": cfg.model.attn_implementation,
                  "class": type(trainer.accelerator.unwrap_model(trainer.model)).__name__},
    }
    if adapter_dir is not None:
        extra["adapter_dir"] = adapter_dir
    if prepared.metadata.get("kind"):
        extra["kind"] = prepared.metadata["kind"]  # score, eval and push read the lm-tag layout from here
    metadata = build_metadata(params, cfg.model.name_or_path, data=data, tokenizer=tokenizer_fingerprint(tokenizer), extra=extra)
    (output_dir / PRMKIT_JSON).unlink(missing_ok=True)  # a resumed run replaces a finished model: not finished meanwhile
    for item in tmp.iterdir():
        dest = output_dir / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    tmp.rmdir()
    _check_tokenizer_round_trip(output_dir, tokenizer, cfg.model.trust_remote_code)
    # prmkit.json last: its presence says the directory holds a finished model.
    write_metadata(output_dir, metadata)
    state.wait_for_everyone()


def _check_tokenizer_round_trip(output_dir: Path, tokenizer: Any, trust_remote_code: bool) -> None:
    """Warn when the saved tokenizer loads back as something else (transformers 5 picks the tokenizer class from the
    model config's type, e.g. a plain BPE saved beside a Qwen2 config comes back as Qwen2Tokenizer)."""
    from transformers import AutoTokenizer

    if type(tokenizer).__name__ not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return  # a model-specific class loads back as itself; only a generic one can be replaced on loading
    try:
        again = AutoTokenizer.from_pretrained(str(output_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is worth a warning, not a failed run
        log.warning(f"the tokenizer saved in {output_dir} does not load back: {e}")
        return
    probes = ["The first equation is 3p + e = 124.\n", "  x\t\ty  \n\n  z", "Ünïcödé café 12345 ½ → ∑ 9.11 > 9.8",
              "Step 1: 40 * 0.25 = 10.ки\n"]
    if len(again) != len(tokenizer) or any(again.encode(t, add_special_tokens=False) != tokenizer.encode(t, add_special_tokens=False)
                                            for t in probes):
        log.warning(f"the tokenizer saved in {output_dir} loads back as {type(again).__name__}, which may tokenize "
                    f"differently from the {type(tokenizer).__name__} used in training; check model.tokenizer")


def _save_base_without_lora(peft_base: Any, path: Path) -> None:
    import copy

    from peft.utils import ModulesToSaveWrapper

    base = copy.deepcopy(peft_base)
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.original_module)
    from peft.tuners.lora import LoraLayer

    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    base.save_pretrained(str(path))


# `prmkit train` has none of push's flags: it pushes with the config's push keys, so the Hub code's hints say those.
PUSH_FLAGS_AS_KEYS = {
    "--repo-id": "--set push.repo_id=NAMESPACE/NAME", "--private": "--set push.private=true",
    "--revision": "--set push.revision=BRANCH", "--adapter": "--set push.adapter=true",
    "--eval-report": "--set push.eval_report=FILE", "--overwrite-card": "--set push.overwrite_card=true",
    "--allow-pickle": "--set push.allow_pickle=true", "--license": "--set push.license=ID",
}


def _push(cfg: Config, output_dir: Path, lora_info: dict | None) -> dict[str, Any] | None:
    import prmkit.hub as hub

    repo_id = cfg.push.repo_id or cfg.training_arguments.get("hub_model_id")
    if not repo_id:
        raise UsageError("train.push_to_hub is set but there is no repo id: set push.repo_id (or train.hub_model_id)")
    with reworded(PUSH_FLAGS_AS_KEYS):
        pushed = _push_model(hub, cfg, output_dir, repo_id)
    return pushed.to_dict() if hasattr(pushed, "to_dict") else {"repo_id": repo_id}


def _push_model(hub: Any, cfg: Config, output_dir: Path, repo_id: str) -> Any:
    return hub.push_model(
        output_dir, repo_id, private=cfg.push.private or bool(cfg.training_arguments.get("hub_private_repo")),
        revision=cfg.push.revision or cfg.training_arguments.get("hub_revision"),
        commit_message=cfg.push.commit_message or f"prmkit {__version__}: train",
        create_pr=cfg.push.create_pr, adapter=cfg.push.adapter, eval_report=cfg.push.eval_report,
        overwrite_card=cfg.push.overwrite_card, allow_pickle=cfg.push.allow_pickle, license=cfg.push.license,
        token=cfg.training_arguments.get("hub_token") or None,
    )
