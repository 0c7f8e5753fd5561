"""Train a PRM: a token-classification model whose label at each step's last separator token says "step correct".

The loop is `transformers.Trainer` (so accelerate, DeepSpeed, FSDP and checkpoints come with it); prmkit adds:

- data from :func:`prmkit.data.prepare.prepare_splits` (cached; the main process prepares, the other ranks read the
cache);
- a loss that takes hard (0/1) and soft (probability) step labels alike;
- batching: ``padded`` (random order), ``grouped`` (similar lengths together, less padding), ``packed`` (no padding
  at all, with flash-attention's or FlexAttention's variable-length kernels on a GPU);
- memory that fits: the expandable-segments allocator, and gradient checkpointing turned on only when the estimated
  peak would not fit the device (:mod:`prmkit.models.memory`); an out-of-memory error becomes one message naming the
  fixes;
- step-level eval metrics at labelled positions, gathered across ranks in fixed shapes;
- a self-describing output directory (weights, tokenizer, ``prmkit.json``, the resolved config), safe resuming, and a
  checkpoint on Ctrl-C.

The recipe reads top to bottom: :func:`train` runs :func:`setup_run` (the config, the processes, the output
directory's plan), :func:`setup_data`, :func:`setup_model`, :func:`setup_trainer`, :func:`fit`, :func:`collect_result`,
:func:`final_eval_metrics` and :func:`save_model`, in that order. The Trainer subclass and its callbacks are in
:mod:`prmkit.training.trainer`, the final model directory in :mod:`prmkit.training.save`.

Everything here is callable from Python: ``train(load_config("cfg.yaml"))``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.config.schema import Config, eval_schedule
from prmkit.config.training_args import (
    GROUPED_STRATEGIES,
    LENGTH_COLUMN,
    check_integrations,
    check_training_arguments,
    training_argument_fields,
)
from prmkit.core.checkpoints import latest_complete_checkpoint, save_failure
from prmkit.core.overwrite import settle_overwrite
from prmkit.core.version import __version__
from prmkit.errors import ConfigError, PrmkitError, TrainingOutOfMemory, UsageError, first_line, reworded
from prmkit.kinds.heads import preprocess_logits_for_metrics, step_loss_func
from prmkit.kinds.registry import get_kind
from prmkit.models.loading import (
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
from prmkit.training.batching import StepCollator, make_compute_metrics, resolve_batching
from prmkit.training.distributed import StrategyPlan, join_cpu_processes, plan_strategy
from prmkit.training.example import apply_example, apply_tiny
from prmkit.training.kernels import liger_kernel_config, liger_supports, model_class_for, varlen_kernels_available
from prmkit.training.lm_tag import LMTag
from prmkit.training.result import TrainResult
from prmkit.training.run_dir import OutputPlan, claim_output_dir, prepare_output_dir
from prmkit.training.save import save_final

log = logging.getLogger("prmkit")

ENV_LAUNCHED = "PRMKIT_LAUNCHED"
"""Set by `prmkit train --num-processes` in the processes it launches, so they never launch again."""


def resolve_config(cfg: Config) -> Config:
    """The config a run actually uses (the tiny model and the example filled in); recorded as prmkit_config.yaml."""
    if cfg.model.tiny:
        apply_tiny(cfg)
    if cfg.train.example:
        apply_example(cfg)
    if not cfg.model.name_or_path:
        raise UsageError(
            "no model: set model.name_or_path",
            hint="e.g. --model Qwen/Qwen2-0.5B, or --example for an offline smoke run",
        )
    if not cfg.data.train:
        raise UsageError(
            "no training data: set data.train", hint="e.g. --train trl-lib/math_shepherd or --train rows.jsonl"
        )
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


# ---------------------------------------------------------------------------------------------------------------------
# The recipe: train() runs these steps, top to bottom


@dataclass
class Run:
    """What every step reads: the resolved config, the output directory's plan, this process, the Trainer's settings."""

    cfg: Config
    plan: OutputPlan
    state: Any
    """accelerate's ``PartialState``: this process among the others."""
    args: Any
    """``transformers.TrainingArguments``."""
    model_config: Any
    strategy: StrategyPlan
    """The distributed strategy asked for, and (once the Trainer exists) the one that runs."""
    lock: Any = None
    """The output directory's lock (main process only), held until the run ends."""


@dataclass
class DataSetup:
    tokenizer: Any
    lm_tag: LMTag | None
    """What the lm-tag kind adds (its tag token, its loss); None for the other kinds."""
    prepared: Any
    """The prepared splits (:func:`prmkit.data.prepare.prepare_splits`); their metadata goes into prmkit.json."""
    train_ds: Any
    eval_ds: Any
    """None when there is no eval data."""
    soft: bool
    """Whether the labels are probabilities (soft) rather than 0/1."""


@dataclass
class ModelSetup:
    model: Any
    batching: str
    attn: str
    """The attention implementation the loaded model runs with ("" when neither the config nor the model names one)."""
    cuda: bool
    lora_info: dict[str, Any] | None


@dataclass
class TrainerSetup:
    trainer: Any
    """:class:`prmkit.training.trainer.StepTrainer`."""
    meter: Any
    interrupt: Any
    memory: MemoryPlan


@dataclass
class Fitted:
    output: Any
    """What ``Trainer.train`` returned."""
    seconds: float
    tokens: int
    """Non-padding tokens trained on, all ranks together."""


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
    run whose config changes its schedule or data is refused unless ``accept_changes`` (``--resume-with-changes``). A
    rich
    ``console`` gets the progress display; without one, progress goes to the `prmkit` logger only at the end.
    """
    run = setup_run(cfg, overwrite=overwrite, resume=resume, accept_changes=accept_changes)
    try:
        data = setup_data(run)
        model = setup_model(run, data)
        # Every input has been read (tokenizer, data, weights): only now may the output directory change.
        if run.state.is_main_process:
            prepare_output_dir(run.plan, run.cfg)
        run.state.wait_for_everyone()
        setup = setup_trainer(run, data, model, console, callbacks)
        fitted = fit(run, setup)
        result = collect_result(run, data, model, setup, fitted)
        if result.interrupted:
            return result
        if data.eval_ds is not None:
            result.eval_metrics = final_eval_metrics(setup.trainer, result)
        save_model(run, data, model, setup.trainer, result)
        push_flag = run.cfg.training_arguments.get("push_to_hub")
        if push_flag and run.state.is_main_process:
            result.pushed = _push(run.cfg, run.plan.output_dir, model.lora_info)
        run.state.wait_for_everyone()
        return result
    finally:
        end_run(run)


def setup_run(cfg: Config, overwrite: bool, resume: bool | str | None, accept_changes: bool) -> Run:
    """Check what can fail early (the model's config, the data sources), then claim the output directory: the main
    process locks it and decides; every process follows its answer, refusals included."""
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
    join_cpu_processes()  # launched processes on a machine without a GPU: one gloo group, not N lone runs
    args = build_training_arguments(cfg, has_eval)
    _ = args.device  # initialises the distributed state before PartialState is asked for it
    state = PartialState()
    strategy = plan_strategy(args, state, cfg.train.require_strategy)  # refuses here, before anything is written

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
    return Run(cfg, plan, state, args, model_config, strategy, lock)


def end_run(run: Run) -> None:
    """However the run ended (finished, interrupted, failed): keep it if it saved something, else restore."""
    if run.state.is_main_process and run.plan.action == "overwrite":
        settled = settle_overwrite(run.plan.output_dir)
        if settled:
            log.warning(settled)
    if run.lock is not None:
        run.lock.release()


def setup_data(run: Run) -> DataSetup:
    """The tokenizer (checked against the model's vocabulary) and the prepared splits (the main process prepares them;
    the other processes read its cache)."""
    from prmkit.data.prepare import prepare_splits
    from prmkit.models.files import check_tokenizer_fits
    from prmkit.models.loading import load_tokenizer

    cfg, state, model_config = run.cfg, run.state, run.model_config
    has_eval = has_eval_data(cfg)
    tokenizer_name = cfg.tokenizer_name
    assert tokenizer_name is not None  # resolve_config (in setup_run) refuses a run without a model
    tokenizer = load_tokenizer(tokenizer_name, cfg.model.trust_remote_code)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    check_tokenizer_fits(
        tokenizer,
        getattr(text_config, "vocab_size", None),
        tokenizer_name,
        cfg.data.step_separator if get_kind(cfg.train.kind).uses_separator else None,
    )
    ensure_pad_token(tokenizer)
    lm_tag = LMTag.setup(cfg, tokenizer) if get_kind(cfg.train.kind).reads_reward_tokens else None
    # The main process prepares first; then each other machine's first process (a cache hit on shared storage, its
    # own copy otherwise: prepare is deterministic, so the same rows in the same order); then every other process.
    with state.main_process_first(), state.local_main_process_first():
        prepared = prepare_splits(cfg, tokenizer)
    if prepared.rejects_path is not None and state.is_main_process:
        rejected = sum(r.rows_rejected for r in prepared.reports.values())
        log.warning(f"skipped {rejected} invalid rows (data.skip_invalid); they are listed in {prepared.rejects_path}")
    dsd = prepared.load()
    train_ds = dsd["train"]
    eval_ds = dsd["eval"] if has_eval and "eval" in dsd else None
    soft = train_ds.features["labels"].feature.dtype == "float32"
    return DataSetup(tokenizer, lm_tag, prepared, train_ds, eval_ds, soft)


def setup_model(run: Run, data: DataSetup) -> ModelSetup:
    """The batching and attention the device allows, then the model: its head for the kind, dropout off, LoRA."""
    cfg, args, state, model_config = run.cfg, run.args, run.state, run.model_config
    cuda = args.device.type == "cuda"
    kernels = varlen_kernels_available(model_class_for(model_config, cfg.train.kind)) if cuda else []
    batching, attn = resolve_batching(
        cfg.train.batching, cfg.model.attn_implementation, cuda=cuda, causal=is_causal(model_config), kernels=kernels
    )
    if batching == "grouped" and getattr(args, "train_sampling_strategy", "random") not in GROUPED_STRATEGIES:
        batching = "padded"  # `auto` chose grouped; the order asked for is the Trainer's sampler's (padded batches)
    lm_tag = data.lm_tag
    model = load_model_for_training(
        cfg.model,
        data.tokenizer,
        seed=args.seed,
        config=model_config,
        kind=cfg.train.kind,
        new_tokens=lm_tag.new_ids if lm_tag else None,
        attn_implementation=attn,
    )
    if cfg.train.disable_dropout:
        disable_dropout(model)
    lora_info = None
    if cfg.train.lora is not None:
        model = apply_lora(model, cfg.train.lora, cfg.train.kind)
        pc = model.peft_config["default"]
        lora_info = {
            "r": pc.r,
            "alpha": pc.lora_alpha,
            "dropout": pc.lora_dropout,
            "target_modules": sorted(pc.target_modules)
            if isinstance(pc.target_modules, (set, list))
            else pc.target_modules,
            "modules_to_save": _present_modules(model, pc.modules_to_save),
            "merged": bool(cfg.train.lora_merge),
        }
        if state.is_main_process:
            trainable, total = model.get_nb_trainable_parameters()
            log.info(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    attn = str(getattr(model.config, "_attn_implementation", None) or attn or "")
    return ModelSetup(model, batching, attn, cuda, lora_info)


def setup_trainer(run: Run, data: DataSetup, model: ModelSetup, console: Any, callbacks: list | None) -> TrainerSetup:
    """The memory plan (gradient checkpointing only when the run would not fit without it), then the Trainer with
    prmkit's collator, loss, metrics and callbacks."""
    # Imported here, not at the top: the trainer module imports transformers, and importing this one stays light
    # (the `prmkit train --num-processes` launcher imports it to check the config before starting any process).
    from prmkit.training.trainer import InterruptCallback, ProgressCallback, StepTrainer, TokenMeter

    cfg, args, state, model_config = run.cfg, run.args, run.state, run.model_config
    batching, attn, cuda, lm_tag = model.batching, model.attn, model.cuda, data.lm_tag
    train_ds, eval_ds = data.train_ds, data.eval_ds
    if batching == "packed" and not (cuda and attn.startswith(("flash", "flex"))):
        log.info(
            f"packed batching with {attn or 'default'} attention: correct, but attention runs over a dense mask of "
            "the whole pack"
        )
    if args.use_liger_kernel and liger_supports(getattr(model_config, "model_type", None)) is False:
        log.warning(f"Liger has no kernels for model type {model_config.model_type!r}; training without them")
    if eval_ds is not None and batching != "packed":
        import numpy as np

        # Less padding; the metrics do not depend on the order.
        eval_ds = eval_ds.select(np.argsort(np.asarray(eval_ds["num_tokens"]), kind="stable"))
    if len(train_ds) == 0:
        raise UsageError(f"{cfg.data.train}: no training rows left after preparation")
    lengths = train_ds["num_tokens"]
    memory = _memory_plan(cfg, args, state, model.model, model_config, lengths, batching, attn, run.strategy)
    set_checkpointing(args, memory.checkpointing)
    if state.is_main_process:
        log.info(memory.preflight())
        if memory.fits is False:
            log.warning("the run may not fit the device; what would: " + "; ".join(memory.advice))
    # Rows come out of the dataset as numpy arrays: the collator copies them whole, not token by token.
    train_ds = train_ds.with_format("numpy")
    if eval_ds is not None:
        eval_ds = eval_ds.with_format("numpy")

    meter = TokenMeter()
    interrupt = InterruptCallback()
    all_callbacks: list = [interrupt]
    if console is not None and state.is_main_process:
        all_callbacks.append(ProgressCallback(console, meter, state.num_processes))
    all_callbacks += list(callbacks or [])
    plan = run.plan
    trainer = StepTrainer(
        model=model.model,
        args=args,
        data_collator=StepCollator(data.tokenizer.pad_token_id, batching, data.soft, causal=is_causal(model_config)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=data.tokenizer,
        compute_loss_func=(lm_tag.loss if lm_tag else step_loss_func)(args.label_smoothing_factor),
        compute_metrics=make_compute_metrics(cfg.eval.threshold) if eval_ds is not None else None,
        preprocess_logits_for_metrics=(lm_tag.preprocess if lm_tag else preprocess_logits_for_metrics)
        if eval_ds is not None
        else None,
        callbacks=all_callbacks,
        batching=batching,
        lengths=lengths if batching == "grouped" else None,
        meter=meter,
        # An --overwrite run that has saved a complete checkpoint has something to keep: the previous contents go.
        on_checkpoint=(lambda _path: settle_overwrite(plan.output_dir)) if plan.action == "overwrite" else None,
        strategy=run.strategy,
    )
    run.strategy.confirm(trainer)
    trainer.add_callback(run.strategy.callback(trainer))
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout, which is for results only
    return TrainerSetup(trainer, meter, interrupt, memory)


def fit(run: Run, setup: TrainerSetup) -> Fitted:
    """Train (from the checkpoint when resuming); out of memory becomes one message naming the fixes."""
    import torch

    # Imported here for the reason setup_trainer gives (it imports transformers).
    from prmkit.training.trainer import write_debug_rows

    args, state, plan = run.args, run.state, run.plan
    trainer, meter, interrupt, memory = setup.trainer, setup.meter, setup.interrupt, setup.memory
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
                f"{trainer.args.per_device_eval_batch_size} rows)",
                hint=eval_oom_hint(checkpoint),
            ) from None
        budget = f" of the {size(memory.usable_bytes)} usable" if memory.usable_bytes is not None else ""
        raise TrainingOutOfMemory(
            f"out of memory at step {trainer.state.global_step + 1} (estimated peak {size(memory.estimate.total)}"
            f"{budget}, gradient checkpointing {'on' if memory.checkpointing else 'off'}, largest micro-batch "
            f"{memory.estimate.batch.describe()})",
            hint=oom_hint(memory, checkpoint),
        ) from None
    finally:
        interrupt.uninstall()
        write_debug_rows(meter, state.process_index)
    seconds = time.perf_counter() - started
    tokens_tensor = torch.tensor([meter.value()], dtype=torch.long, device=args.device)
    tokens = (
        int(trainer.accelerator.reduce(tokens_tensor, reduction="sum").item())
        if state.num_processes > 1
        else meter.value()
    )
    return Fitted(output, seconds, tokens)


def collect_result(run: Run, data: DataSetup, model: ModelSetup, setup: TrainerSetup, fitted: Fitted) -> TrainResult:
    """What the run did, from the Trainer's state and log; an interrupted run's result names its last checkpoint."""
    import torch

    args, state, plan = run.args, run.state, run.plan
    trainer, memory, interrupt = setup.trainer, setup.memory, setup.interrupt
    train_ds, eval_ds, cuda, attn = data.train_ds, data.eval_ds, model.cuda, model.attn
    output, seconds, tokens = fitted.output, fitted.seconds, fitted.tokens
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
        train_loss=None
        if output.training_loss is None or math.isnan(output.training_loss) or trainer.prmkit_at_end.nothing_left
        else float(output.training_loss),
        final_loss=float(losses[-1]) if losses else None,
        batching=model.batching,
        attn_implementation=attn or None,
        gradient_checkpointing=memory.checkpointing,
        memory=memory.to_dict(),
        peak_memory_gib=round(torch.cuda.max_memory_reserved(args.device) / GIB, 2) if cuda else None,
        allocator=allocator_setting() if cuda else None,
        loss_history=history,
        lora=model.lora_info,
        world_size=state.num_processes,
        strategy=run.strategy.to_dict(),
        resumed_from=plan.checkpoint if plan.action == "resume" else None,
        skipped_checkpoints=[{"checkpoint": p, "reason": why} for p, why in plan.skipped],
    )
    if interrupt.stopped:
        result.interrupted = True
        result.signal = interrupt.signal
        last, _ = latest_complete_checkpoint(plan.output_dir)
        result.checkpoint = str(last) if last else None
    return result


def final_eval_metrics(trainer: Any, result: TrainResult) -> dict[str, Any]:
    """The eval figures at the last step: the last evaluation's when it ran there, else a final one."""
    last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last_eval is None or last_eval.get("step") != trainer.state.global_step:
        last_eval = _final_evaluation(trainer, result)
    return {
        k[5:]: v
        for k, v in (last_eval or {}).items()
        if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    }


def save_model(run: Run, data: DataSetup, model: ModelSetup, trainer: Any, result: TrainResult) -> None:
    """The trained model beside the checkpoints (:func:`prmkit.training.save.save_final`); an --overwrite run's previous
    contents go once it is in place."""
    plan, state = run.plan, run.state
    try:
        save_final(
            trainer,
            run.cfg,
            data.tokenizer,
            data.prepared,
            plan.output_dir,
            state,
            result,
            model.lora_info,
            model.batching,
        )
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
        log.warning(
            f"{result.eval_error}; the trained model is saved without its eval figures. Lower "
            "train.per_device_eval_batch_size, or run `prmkit eval` on the saved model"
        )
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


def _memory_plan(
    cfg: Config,
    args: Any,
    state: Any,
    model: Any,
    model_config: Any,
    lengths: Sequence[int],
    batching: str,
    attn: str,
    strategy: StrategyPlan,
) -> MemoryPlan:
    """The memory plan for this process; under several processes, all plan against the smallest budget."""
    import torch

    budget = device_budget(cfg.train.memory_budget_gb, args.device)
    if budget.bytes is not None and state.num_processes > 1 and torch.distributed.is_initialized():
        t = torch.tensor([budget.bytes], dtype=torch.long, device=args.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        budget = type(budget)(int(t.item()), budget.source + " (smallest of all processes)")
    param = next(model.parameters())
    optim = getattr(args.optim, "value", args.optim)
    shape = model_shape(model_config, model, lm_head=get_kind(cfg.train.kind).vocabulary_logits)
    return plan_memory(
        requested_checkpointing(cfg),
        shape,
        lengths,
        args.per_device_train_batch_size,
        batching,
        budget,
        param_bytes=param.element_size(),
        mixed=bool(args.bf16 or args.fp16),
        optimizer=str(optim),
        attention=attn or "sdpa",
        sharding=strategy.expected.sharding_for_memory(),
    )


def _present_modules(model: Any, names: Any) -> list[str]:
    # peft adds its generic head names ("classifier", "score") to modules_to_save; report the ones that exist.
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return sorted({n for n in names or [] if n in present})


# `prmkit train` has none of push's flags: it pushes with the config's push keys, so the Hub code's hints say those.
PUSH_FLAGS_AS_KEYS = {
    "--repo-id": "--set push.repo_id=NAMESPACE/NAME",
    "--private": "--set push.private=true",
    "--revision": "--set push.revision=BRANCH",
    "--adapter": "--set push.adapter=true",
    "--eval-report": "--set push.eval_report=FILE",
    "--overwrite-card": "--set push.overwrite_card=true",
    "--allow-pickle": "--set push.allow_pickle=true",
    "--license": "--set push.license=ID",
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
        output_dir,
        repo_id,
        private=cfg.push.private or bool(cfg.training_arguments.get("hub_private_repo")),
        revision=cfg.push.revision or cfg.training_arguments.get("hub_revision"),
        commit_message=cfg.push.commit_message or f"prmkit {__version__}: train",
        create_pr=cfg.push.create_pr,
        adapter=cfg.push.adapter,
        eval_report=cfg.push.eval_report,
        overwrite_card=cfg.push.overwrite_card,
        allow_pickle=cfg.push.allow_pickle,
        license=cfg.push.license,
        token=cfg.training_arguments.get("hub_token") or None,
    )
