"""Train a PRM: a token-classification model whose label at each step's last separator token says "step correct".

The loop is `transformers.Trainer` (so accelerate, DeepSpeed, FSDP and checkpoints come with it); prmkit adds:

- data from :func:`prmkit.dataset.prepare_splits` (cached; the main process prepares, the other ranks read the cache);
- a loss that takes hard (0/1) and soft (probability) step labels alike;
- batching: ``padded`` (random order), ``grouped`` (similar lengths together, less padding), ``packed`` (no padding
  at all, for flash-attention's variable-length kernels);
- step-level eval metrics at labelled positions, gathered across ranks in fixed shapes;
- a self-describing output directory (weights, tokenizer, ``prmkit.json``, the resolved config), safe resuming, and a
  checkpoint on Ctrl-C.

Everything here is callable from Python: ``train(load_config("cfg.yaml"))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import yaml

from prmkit import __version__
from prmkit.atomic import write_atomic
from prmkit.config import TRAINING_ARGUMENT_DEFAULTS, Config, DataConfig, dump_config
from prmkit.errors import ConfigError, UsageError
from prmkit.modeling import (
    BASE_MODEL_DIR,
    CONFIG_YAML,
    PRMKIT_JSON,
    apply_lora,
    build_metadata,
    disable_dropout,
    ensure_pad_token,
    is_causal,
    load_model_config,
    load_model_for_training,
    write_metadata,
)
from prmkit.tokenization import IGNORE_INDEX, TokenizationParams

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("prmkit")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLE_TRAIN = EXAMPLES_DIR / "prm800k_samples.jsonl"
EXAMPLE_EVAL = EXAMPLES_DIR / "processbench_gsm8k_sample.json"
EXAMPLE_OUTPUT_DIR = "runs/example"
# TrainingArguments the example fills in when they are still at their defaults: a random tiny model needs a large
# learning rate and a few epochs for its loss to move within seconds.
EXAMPLE_TRAINING = {
    "learning_rate": 2e-3,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "logging_steps": 5,
    "warmup_steps": 5,
    "save_strategy": "epoch",
    "eval_strategy": "epoch",
}
# With the example tokenizer's small vocabulary the longest PRM800K paths take ~1,200 tokens; keep all their steps.
EXAMPLE_MAX_LENGTH = 2048
EXAMPLE_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "max_position_embeddings": 4096}
EXAMPLE_VOCAB_SIZE = 4096
EXAMPLE_RECIPE_VERSION = 2  # bump when the example tokenizer or model changes, so the cached one is rebuilt

ENV_LAUNCHED = "PRMKIT_LAUNCHED"
"""Set by `prmkit train --num-processes` in the processes it launches, so they never launch again."""
ENV_DEBUG_ROWS = "PRMKIT_DEBUG_ROWS_DIR"
"""Debug: a directory where each rank writes the `row` ids of the training examples it saw (rows-rank{N}.json)."""
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
    batching: str = ""
    lora: dict[str, Any] | None = None
    world_size: int = 1
    resumed_from: str | None = None
    interrupted: bool = False
    checkpoint: str | None = None
    """The latest checkpoint directory, if any (after an interrupt: the one to resume from)."""
    pushed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# The bundled example: data in the package, a tokenizer trained from it, a tiny random Qwen2


def example_texts() -> list[str]:
    """Every prompt and step of the bundled example data, in file order (what the example tokenizer learns from)."""
    from prmkit.dataset import read_step_rows
    from prmkit.formats import Options

    texts: list[str] = []
    sources = [(EXAMPLE_TRAIN, "prm800k", False)]
    if EXAMPLE_EVAL.is_file():
        sources.append((EXAMPLE_EVAL, "processbench", True))
    level = log.level
    log.setLevel(logging.ERROR)  # prepare reports on the same files moments later; say things once
    try:
        for path, fmt, is_eval in sources:
            rows, _ = read_step_rows(str(path), fmt, Options(is_eval=is_eval), "", skip_invalid=True)
            for prompt, steps in zip(rows.prompts, rows.completions):
                texts.append(prompt)
                texts.extend(steps)
    finally:
        log.setLevel(level)
    return list(dict.fromkeys(texts))


def build_example_tokenizer(vocab_size: int = EXAMPLE_VOCAB_SIZE):
    """A byte-level BPE trained on the example data (deterministic, well under a second): no download needed.

    It splits text exactly as Qwen2's tokenizer does (NFC, Qwen2's pre-tokenizer regex, byte-level), because a
    directory holding a Qwen2 config loads its tokenizer as `Qwen2Tokenizer`, which imposes that pipeline. Like
    Qwen2's: no BOS, ``<|endoftext|>`` is both EOS and pad.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(example_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def example_base_dir(cache_dir: str | None = None) -> Path:
    """A directory with the example tokenizer and a tiny Qwen2 config (no weights), built once and cached."""
    from prmkit.dataset import cache_root

    h = hashlib.sha256(f"recipe={EXAMPLE_RECIPE_VERSION};{json.dumps(EXAMPLE_MODEL, sort_keys=True)}".encode())
    for path in (EXAMPLE_TRAIN, EXAMPLE_EVAL):
        if path.is_file():
            h.update(path.read_bytes())
    target = cache_root(cache_dir) / "example-model" / h.hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    from transformers import Qwen2Config

    tokenizer = build_example_tokenizer()
    config = Qwen2Config(**EXAMPLE_MODEL, vocab_size=len(tokenizer), num_labels=2, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Qwen2ForTokenClassification"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process (rank) built the same directory first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def apply_example(cfg: Config) -> None:
    """Fill in the example's data, model and settings wherever the config still holds the defaults."""
    if not cfg.data.train:
        cfg.data.train = str(EXAMPLE_TRAIN)
        if not cfg.data.eval:
            if EXAMPLE_EVAL.is_file():
                cfg.data.eval = str(EXAMPLE_EVAL)
            else:
                log.warning(f"{EXAMPLE_EVAL.name} is not installed with this copy of prmkit; training without eval")
    if not cfg.model.name_or_path:
        cfg.model.name_or_path = str(example_base_dir(cfg.data.cache_dir))
        cfg.model.init_from_config = True
    if cfg.data.max_length == DataConfig().max_length:
        cfg.data.max_length = EXAMPLE_MAX_LENGTH
    ta = cfg.training_arguments
    if ta.get("output_dir") == TRAINING_ARGUMENT_DEFAULTS["output_dir"]:
        ta["output_dir"] = EXAMPLE_OUTPUT_DIR
    for key, value in EXAMPLE_TRAINING.items():
        if key not in ta or ta[key] == TRAINING_ARGUMENT_DEFAULTS.get(key, object()):
            ta[key] = value


def resolve_config(cfg: Config) -> Config:
    """The config a run actually uses (the example filled in); recorded as prmkit_config.yaml."""
    if cfg.train.example:
        apply_example(cfg)
    if not cfg.model.name_or_path:
        raise UsageError("no model: set model.name_or_path", hint="e.g. --model Qwen/Qwen2-0.5B, or --example for an offline smoke run")
    if not cfg.data.train:
        raise UsageError("no training data: set data.train", hint="e.g. --train trl-lib/math_shepherd or --train rows.jsonl")
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Loss, batching, metrics


def step_loss(logits: "torch.Tensor", labels: "torch.Tensor", num_items_in_batch: Any = None) -> "torch.Tensor":
    """Cross-entropy at labelled positions; a label is a probability that the step is correct (0/1 or soft).

    ``-(p * log q1 + (1 - p) * log q0)``, which for p in {0, 1} is exactly the usual two-class cross-entropy. The
    sum is divided by ``num_items_in_batch`` (labelled steps in the whole accumulated batch) when the Trainer gives
    it, else by the steps in this batch.
    """
    import torch

    if hasattr(logits, "logits"):
        logits = logits.logits
    elif isinstance(logits, (tuple, list)):
        logits = logits[0]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits[mask].float(), dim=-1)
    target = labels[mask].to(logp.dtype)
    total = -(target * logp[:, 1] + (1.0 - target) * logp[:, 0]).sum()
    if num_items_in_batch is None:
        return total / mask.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _loss_func(outputs: Any, labels: "torch.Tensor", num_items_in_batch: Any = None) -> "torch.Tensor":
    return step_loss(outputs, labels, num_items_in_batch)


class StepCollator:
    """Pads (``padded``/``grouped``) or concatenates (``packed``) tokenized rows into a batch.

    ``packed`` gives one row of all sequences with ``position_ids`` restarting at 0 and no attention mask; transformers
    then keeps each sequence to itself (a block-diagonal mask, or flash-attention's variable-length kernel).

    Padding goes on the right. For a ``causal`` model that makes the attention mask redundant: a real token attends
    only to earlier positions, and every pad comes after the last real token, so the outputs at real (and labelled)
    positions are the same with or without it. Leaving it out lets SDPA/flash-attention take the plain causal path
    (no mask tensor, upper triangle skipped). Bidirectional models keep the mask.

    ``n_tokens`` (real tokens in the batch) is for the token meter; the trainer removes it before the forward pass.
    """

    def __init__(self, pad_token_id: int, mode: str = "padded", soft_labels: bool = False, causal: bool = False):
        if mode not in ("padded", "grouped", "packed"):
            raise ValueError(f"unknown batching mode {mode!r}")
        self.pad_token_id = int(pad_token_id)
        self.packed = mode == "packed"
        self.soft_labels = soft_labels
        self.causal = causal

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        label_dtype = torch.float32 if self.soft_labels else torch.long
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        if self.packed:
            flat_ids = [t for seq in ids for t in seq]
            positions = [p for seq in ids for p in range(len(seq))]
            flat_labels = [x for seq in labels for x in seq]
            batch = {
                "input_ids": torch.tensor([flat_ids], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "labels": torch.tensor([flat_labels], dtype=label_dtype),
            }
        else:
            width = max(len(seq) for seq in ids)
            input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
            label_tensor = torch.full((len(ids), width), IGNORE_INDEX, dtype=label_dtype)
            for i, (seq, lab) in enumerate(zip(ids, labels)):
                input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                label_tensor[i, :len(seq)] = torch.tensor(lab, dtype=label_dtype)
            batch = {"input_ids": input_ids, "labels": label_tensor}
            if not self.causal:
                lengths = torch.tensor([len(seq) for seq in ids])
                batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch["n_tokens"] = torch.tensor(sum(len(seq) for seq in ids), dtype=torch.long)
        if features and "row" in features[0]:
            batch["row"] = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)
        return batch


class LengthGroupedSampler:
    """Random batches of similar length: shuffle, sort within mega-batches of 50 batches, shuffle the batches.

    Unlike transformers' sampler it draws from its own generator seeded by (seed, epoch), so a resumed run replays
    exactly the order the interrupted one would have used, and every rank draws the same order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = 50):
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.mega = self.batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        ordered: list[int] = []
        for start in range(0, len(perm), self.mega):
            ordered += sorted(perm[start:start + self.mega], key=self.lengths.__getitem__, reverse=True)
        batches = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        order = torch.randperm(len(batches), generator=g).tolist()
        out = [i for b in order for i in batches[b]]
        if last:
            out += last  # the one short batch stays last, so every other batch keeps its boundaries
        return iter(out)


def resolve_batching(requested: str, model: Any) -> str:
    """`auto` packs only where it pays: CUDA with a flash-attention kernel; otherwise length-grouped padding."""
    if requested != "auto":
        return requested
    import torch

    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    if torch.cuda.is_available() and attn.startswith("flash_attention"):
        return "packed"
    return "grouped"


def preprocess_logits_for_metrics(logits: Any, labels: "torch.Tensor") -> "torch.Tensor":
    """Keep only p(step correct) at labelled positions, -100 elsewhere: the shape of ``labels``, a fixed shape per
    batch, so gathering across ranks never waits on a rank that has a different number of steps."""
    import torch

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    probs = torch.softmax(logits.float(), dim=-1)[..., 1]
    return torch.where(labels != IGNORE_INDEX, probs, torch.full_like(probs, float(IGNORE_INDEX)))


def make_compute_metrics(threshold: float = 0.5):
    """Step-level metrics over every labelled step of the eval set (prmkit.metrics.step_metrics)."""
    import numpy as np

    from prmkit.metrics import step_metrics

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        preds = np.asarray(eval_pred.predictions, dtype=np.float64)
        labels = np.asarray(eval_pred.label_ids, dtype=np.float64)
        mask = (labels != IGNORE_INDEX) & (preds != IGNORE_INDEX)
        if not mask.any():
            return {}
        m = step_metrics(preds[mask], labels[mask], threshold=threshold)
        keys = ("accuracy", "correct_f1", "wrong_f1", "prm_score", "auroc", "log_loss", "brier", "ece")
        out = {k: float(m[k]) for k in keys if m.get(k) is not None}
        out["steps"] = float(m["n"])
        return out

    return compute_metrics


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

        def __init__(self, *args: Any, batching: str, lengths: Sequence[int] | None, meter: TokenMeter, **kwargs: Any):
            self.prmkit_batching = batching
            self.prmkit_lengths = lengths
            self.prmkit_meter = meter
            super().__init__(*args, **kwargs)
            # The loss is computed outside the model; don't hand the model loss kwargs it might not expect.
            self.model_accepts_loss_kwargs = False

        def _get_train_sampler(self, train_dataset: Any = None):
            if self.prmkit_batching == "grouped" and self.prmkit_lengths is not None:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return LengthGroupedSampler(self.prmkit_lengths, self.args.per_device_train_batch_size, seed)
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rows = inputs.pop("row", None)
            n_tokens = inputs.pop("n_tokens", None)
            if model.training:
                if n_tokens is not None:
                    self.prmkit_meter.add(n_tokens)
                if rows is not None and self.prmkit_meter.rows is not None:
                    self.prmkit_meter.rows.extend(int(r) for r in rows.tolist())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    class InterruptCallback(TrainerCallback):
        """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

        def __init__(self) -> None:
            self.requested = False
            self.stopped = False
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
                raise KeyboardInterrupt
            self.requested = True
            log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to stop without saving)")

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


def _prepare_output_dir(plan: OutputPlan, cfg: Config) -> None:
    if plan.action == "overwrite":
        for item in plan.output_dir.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(plan.output_dir / FINAL_TMP, ignore_errors=True)
    write_atomic(plan.output_dir / CONFIG_YAML, dump_config(cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Training


def build_training_arguments(cfg: Config, has_eval: bool):
    """TrainingArguments from the config's `train` section, with prmkit's settings for what the user left unset."""
    from transformers import TrainingArguments

    ta = dict(cfg.training_arguments)
    for key, value in ta.items():
        # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the strategy "no".
        if value is False and (key.endswith("_strategy") or key == "hub_strategy"):
            ta[key] = "no"
    ta.pop("push_to_hub", None)  # prmkit pushes the finished directory itself (prmkit.hub), not the Trainer
    ta.pop("resume_from_checkpoint", None)
    ta.setdefault("disable_tqdm", True)
    # transformers' default is 3 epochs; prmkit's template and README promise 1 (the seed recipe's).
    ta.setdefault("num_train_epochs", 1)
    ta.setdefault("remove_unused_columns", False)  # the collator needs `row`; the model never sees it
    ta.setdefault("label_names", ["labels"])
    # Every trainable parameter takes part in every forward pass; searching for unused ones costs a graph walk a step.
    ta.setdefault("ddp_find_unused_parameters", False)
    import torch

    if not torch.cuda.is_available():
        ta.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator; without one it only warns
    if has_eval:
        if "eval_strategy" not in ta:
            ta["eval_strategy"] = "steps"
            ta.setdefault("eval_steps", ta.get("save_steps") or 500)
    else:
        ta["eval_strategy"] = "no"
    try:
        return TrainingArguments(**ta)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train: {str(e).strip().splitlines()[0]}") from None


def train(
    cfg: Config,
    overwrite: bool = False,
    resume: bool | str | None = None,
    console: Any = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train a PRM as the config says and write the model directory; see the module docstring.

    ``resume`` (True: the last checkpoint; a path: that one) defaults to ``train.resume_from_checkpoint``. A rich
    ``console`` gets the progress display; without one, progress goes to the `prmkit` logger only at the end.
    """
    import torch
    from accelerate import PartialState

    from prmkit.dataset import load_tokenizer, prepare_splits

    cfg = resolve_config(cfg)
    model_config = load_model_config(cfg.model)  # a missing or bidirectional model fails here, before any data work
    if resume is None:
        resume = cfg.training_arguments.get("resume_from_checkpoint") or None
    has_eval = bool(cfg.data.eval)
    args = build_training_arguments(cfg, has_eval)
    _ = args.device  # initialises the distributed state before PartialState is asked for it
    state = PartialState()

    plan: OutputPlan | None = None
    with state.main_process_first():
        if state.is_main_process:
            plan = plan_output_dir(cfg, overwrite=overwrite, resume=resume)
            _prepare_output_dir(plan, cfg)
    if plan is None:  # other ranks: the main process checked and prepared the directory
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(args.output_dir)
        ckpt = (resume if isinstance(resume, str) and resume.lower() not in ("true", "last")
                else get_last_checkpoint(str(out)) if resume else None)
        plan = OutputPlan(out, "resume" if resume else "fresh", ckpt)

    tokenizer = load_tokenizer(cfg.tokenizer_name, cfg.model.trust_remote_code)
    ensure_pad_token(tokenizer)
    with state.main_process_first():
        prepared = prepare_splits(cfg, tokenizer)
    dsd = prepared.load()
    train_ds = dsd["train"]
    eval_ds = dsd["eval"] if has_eval and "eval" in dsd else None
    soft = train_ds.features["labels"].feature.dtype == "float32"

    model = load_model_for_training(cfg.model, tokenizer, seed=args.seed, config=model_config)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    lora_info = None
    if cfg.train.lora is not None:
        model = apply_lora(model, cfg.train.lora)
        pc = model.peft_config["default"]
        lora_info = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout,
                     "target_modules": sorted(pc.target_modules) if isinstance(pc.target_modules, (set, list)) else pc.target_modules,
                     "modules_to_save": _present_modules(model, pc.modules_to_save), "merged": bool(cfg.train.lora_merge)}
        if state.is_main_process:
            trainable, total = model.get_nb_trainable_parameters()
            log.info(f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    batching = resolve_batching(cfg.train.batching, model)
    if batching == "packed" and not (torch.cuda.is_available() and str(getattr(model.config, "_attn_implementation", "")).startswith("flash")):
        log.info("packed batching without flash-attention: correct, but attention runs over a dense mask of the whole pack")
    if eval_ds is not None and batching != "packed":
        import numpy as np

        # Less padding; the metrics do not depend on the order.
        eval_ds = eval_ds.select(np.argsort(np.asarray(eval_ds["num_tokens"]), kind="stable"))
    if len(train_ds) == 0:
        raise UsageError(f"{cfg.data.train}: no training rows left after preparation")

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
        compute_loss_func=_loss_func,
        compute_metrics=make_compute_metrics(cfg.eval.threshold) if eval_ds is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if eval_ds is not None else None,
        callbacks=all_callbacks,
        batching=batching,
        lengths=train_ds["num_tokens"] if batching == "grouped" else None,
        meter=meter,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout, which is for results only

    if plan.action == "resume":
        log.info(f"resuming from {plan.checkpoint}")
    started = time.perf_counter()
    interrupt.install()
    try:
        output = trainer.train(resume_from_checkpoint=plan.checkpoint if plan.action == "resume" else None)
    finally:
        interrupt.uninstall()
        _write_debug_rows(meter, state.process_index)
    seconds = time.perf_counter() - started
    tokens_tensor = torch.tensor([meter.value()], dtype=torch.long, device=args.device)
    tokens = int(trainer.accelerator.reduce(tokens_tensor, reduction="sum").item()) if state.num_processes > 1 else meter.value()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
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
        train_loss=float(output.training_loss) if output.training_loss is not None and not math.isnan(output.training_loss) else None,
        final_loss=float(losses[-1]) if losses else None,
        batching=batching,
        lora=lora_info,
        world_size=state.num_processes,
        resumed_from=plan.checkpoint if plan.action == "resume" else None,
    )
    if interrupt.stopped:
        from transformers.trainer_utils import get_last_checkpoint

        result.interrupted = True
        result.checkpoint = get_last_checkpoint(str(plan.output_dir))
        return result

    if eval_ds is not None:
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is None or last_eval.get("step") != trainer.state.global_step:
            last_eval = trainer.evaluate()
        result.eval_metrics = {k[5:]: v for k, v in last_eval.items()
                               if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")}

    _save_final(trainer, cfg, tokenizer, prepared, plan.output_dir, state, result, lora_info, batching)
    result.model_dir = str(plan.output_dir)
    from transformers.trainer_utils import get_last_checkpoint

    result.checkpoint = get_last_checkpoint(str(plan.output_dir))

    push_flag = cfg.training_arguments.get("push_to_hub")
    if push_flag and state.is_main_process:
        result.pushed = _push(cfg, plan.output_dir, lora_info)
    state.wait_for_everyone()
    return result


def _present_modules(model: Any, names: Any) -> list[str]:
    # peft adds its generic head names ("classifier", "score") to modules_to_save; report the ones that exist.
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return sorted({n for n in names or [] if n in present})


def _write_debug_rows(meter: TokenMeter, rank: int) -> None:
    directory = os.environ.get(ENV_DEBUG_ROWS)
    if not directory or meter.rows is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"rows-rank{rank}.json").write_text(json.dumps(meter.rows), encoding="utf-8")


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
        "seconds": result.seconds,
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


def _push(cfg: Config, output_dir: Path, lora_info: dict | None) -> dict[str, Any] | None:
    import prmkit.hub as hub

    repo_id = cfg.push.repo_id or cfg.training_arguments.get("hub_model_id")
    if not repo_id:
        raise UsageError("train.push_to_hub is set but there is no repo id: set push.repo_id (or train.hub_model_id)")
    pushed = hub.push_model(
        output_dir, repo_id, private=cfg.push.private or bool(cfg.training_arguments.get("hub_private_repo")),
        revision=cfg.push.revision, commit_message=cfg.push.commit_message or f"prmkit {__version__}: train",
        create_pr=cfg.push.create_pr, adapter=cfg.push.adapter, eval_report=cfg.push.eval_report,
        overwrite_card=cfg.push.overwrite_card, allow_pickle=cfg.push.allow_pickle, license=cfg.push.license,
    )
    return pushed.to_dict() if hasattr(pushed, "to_dict") else {"repo_id": repo_id}
