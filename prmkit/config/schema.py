"""One config schema for every subcommand: defaults < YAML file < command-line flags.

The section and key names are a public contract (see README): rename nothing. The ``train`` section takes every
``transformers.TrainingArguments`` field by its own name plus a few prmkit keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prmkit.data.formats import format_choices
from prmkit.errors import ConfigError, shown
from prmkit.kinds.registry import DEFAULT_KIND, kind_choices, train_kind_choices

log = logging.getLogger("prmkit")


PRM800K_NEUTRAL = ("negative", "positive", "drop")


BATCHING = ("auto", "padded", "grouped", "packed")


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Base model for `train` (a Hub id or a local directory); a trained model directory elsewhere."""
    tokenizer: str | None = None
    """Tokenizer to use; defaults to `name_or_path`. A directory with only tokenizer files works."""
    trust_remote_code: bool = False
    allow_bidirectional: bool = False
    """Allow a non-causal (BERT-like) model: one sequence per solution then lets it see later steps."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16."""
    attn_implementation: str | None = None
    """eager | sdpa | flash_attention_2 | ... ; null lets transformers choose."""
    init_from_config: bool = False
    """Build random weights from `name_or_path`'s config instead of loading weights (smoke runs, benchmarks)."""
    tiny: str | None = None
    """Train a small random model of this architecture (qwen2, llama, mistral, gpt2, ...) sized to model.tokenizer's
    vocabulary, instead of name_or_path: an offline smoke run on your own data."""
    kind: str = "auto"
    """score/eval: auto | token-classification | qwen-prm | lm-tag | chat-plus-minus (README, "PRM kinds")."""
    step_tag: str | None = None
    """lm-tag: the tag after each step (null: Math-Shepherd's "ки"); qwen-prm: the step token (null: "<extra_0>")."""
    reward_tokens: list[str] = field(default_factory=lambda: ["+", "-"])
    """lm-tag, chat-plus-minus: the tokens for "step correct" and "step wrong"."""
    system_prompt: str | None = None
    """qwen-prm: the system turn (null: Qwen2.5-Math-PRM's own)."""
    chat_template: str | None = None
    """qwen-prm, chat-plus-minus: a Jinja chat template instead of the tokenizer's (null: the tokenizer's)."""

    def kind_settings(self) -> dict[str, Any]:
        """The kind keys for :class:`prmkit.kinds.spec.KindSettings` (the others are for loading and training)."""
        return {
            "kind": self.kind,
            "step_tag": self.step_tag,
            "reward_tokens": list(self.reward_tokens),
            "system_prompt": self.system_prompt,
            "chat_template": self.chat_template,
        }


@dataclass
class DataConfig:
    train: str | None = None
    """Hub dataset id, a .jsonl/.json/.parquet/.csv file, a saved dataset, or a `prmkit prepare` output directory;
    split syntax on any of them: org/name:train[:10%], rows.jsonl[:300], rows.json[10%:20%], saved_dir:test."""
    eval: str | None = None
    eval_fraction: float | None = None
    """Hold out this share of data.train's problems (grouped by prompt, seeded by train.data_seed or train.seed) as
    the eval split, like axolotl's val_set_size; excludes data.eval."""
    format: str = "auto"
    """auto | stepwise | math-shepherd | prm800k | processbench."""
    skip_invalid: bool = False
    """Write bad rows to a rejects file and go on, instead of stopping (prepare, train, eval: --skip-invalid)."""
    step_separator: str = "\n"
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    """Keep only the last N prompt tokens (and the BOS); null keeps the whole prompt, as TRL 1.13 does."""
    max_completion_length: int | None = None
    train_on_last_step_only: bool = False
    label_threshold: float | None = None
    """Binarize soft labels at this threshold; null keeps them as soft targets."""
    prm800k_neutral: str = "negative"
    """How PRM800K's neutral (0) ratings count: negative (TRL's converter) | positive (Qwen's PRM) | drop."""
    num_proc: int | None = None
    """Processes that pre-split text while tokenizing (Linux); null: every available core for inputs of 8k+ rows."""
    cache_dir: str | None = None
    """Where prepared datasets are cached; null means $PRMKIT_CACHE or ~/.cache/prmkit."""


@dataclass
class TrainConfig:
    """prmkit's own training keys. Every `transformers.TrainingArguments` field is accepted beside these."""

    kind: str = DEFAULT_KIND
    """token-classification (TRL's PRM: a 2-label head at each step's separator) | lm-tag (a causal LM judging a tag
    token after each step through two reward tokens, OpenRLHF's design; model.step_tag, model.reward_tokens)."""
    batching: str = "auto"
    """auto | padded | grouped | packed. auto packs on CUDA with a variable-length attention kernel (flash-attention,
    else FlexAttention) and groups by length elsewhere."""
    gradient_checkpointing: bool | str = "auto"
    """auto | true | false. auto turns it on only when the estimated peak memory would not fit the device."""
    memory_budget_gb: float | None = None
    """Memory (GiB) one training process may use; null: the device's free memory, capped by the per-process fraction."""
    lora: dict | None = None
    """{r, alpha, dropout, target_modules}; null trains every weight."""
    lora_merge: bool = True
    disable_dropout: bool = True
    require_strategy: bool = False
    """Refuse to train when the distributed strategy asked for (train.fsdp, train.deepspeed, the accelerate config or
    launcher) would be replaced by another (e.g. DDP); false: warn, naming both, and train."""
    example: bool = False
    """Train on the bundled example data with a tiny model built from a config (offline smoke run)."""


# TrainingArguments defaults that prmkit changes, following the seed's PRMConfig.
TRAINING_ARGUMENT_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/prm",
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "report_to": "none",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
}


@dataclass
class EvalConfig:
    data: list[str] = field(default_factory=list)
    format: str = "auto"
    threshold: float = 0.5
    tune_threshold: str | None = None
    """Subset whose first-error F1 picks the threshold that is then applied to every subset."""
    output_dir: str = "eval"
    plots: bool | None = None
    """Write PNG plots beside the report: null when matplotlib is installed (else a warning), true requires it."""
    batch_tokens: int | None = None
    """Token budget of one forward batch; null: 2048 on CPU, sized to the free memory on a CUDA GPU."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (auto: model.dtype, which is bf16 on GPU and fp32 on CPU by default)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""


@dataclass
class ScoreConfig:
    threshold: float = 0.5
    batch_tokens: int | None = None
    """Token budget of one forward batch (padded length x rows, or tokens of a pack); null: 2048 on CPU (cache-sized
    batches run fastest there), sized to the free memory and the model on a CUDA GPU (up to 131072)."""
    packing: bool | None = None
    """Pack solutions into one row without padding; null: on CUDA when a varlen attention kernel is at hand
    (flash-attention, torch's own, or FlexAttention), padded batches elsewhere."""
    sort_window: int = 2048
    """Rows read ahead and sorted by length before batching; memory stays bounded by it."""
    dtype: str = "auto"
    device: str = "auto"
    format: str = "auto"
    skip_invalid: bool = False
    group_by: str | None = None
    """Best-of-N: the field naming each line's group (lines of a group must be together); adds rank and group_size."""
    select: str | None = None
    """best: write only each group's best line (needs group_by); null: every line, ranked."""
    aggregate: str = "min"
    """What ranks a group's lines: min | prod | last | mean of their step scores (prmkit.metrics.aggregate)."""


@dataclass
class ServeConfig:
    """`prmkit serve`; the model is loaded and batched with the score section's keys (dtype, device, batch_tokens,
    packing, sort_window, threshold). The API key is never a config key: --api-key or $PRMKIT_API_KEY."""

    host: str = "127.0.0.1"
    """Address to bind; a public one without an API key is warned about."""
    port: int = 8000
    max_wait_ms: float = 10.0
    """How long a batch may wait for more requests to join it, while requests are still arriving."""
    max_queue: int = 4096
    """Solutions waiting to be scored; past it a request gets 503 with Retry-After."""
    max_request_tokens: int = 32768
    """Tokens one solution may hold as the model reads it; more is a 413."""
    max_body_mb: float = 32.0
    """Largest request body; more is a 413."""
    aggregate: str = "min"
    """The reward of a solution: min | last | prod | mean of its step scores."""
    truncated: str = "lowest"
    """A solution cut by max_length: lowest (reward 0.0) | read (aggregate the steps read) | error (a 422)."""
    drain_s: float = 30.0
    """On SIGTERM: seconds for the requests in flight to finish (new ones get 503) before the process exits 0."""
    step_separator: str | None = None
    """Where a response is cut into steps (/get_reward, "response" requests, adapters); null: the model's separator
    (token-classification), its step tag (lm-tag), or a blank line (qwen-prm, chat-plus-minus)."""


@dataclass
class PushConfig:
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    adapter: bool = False
    eval_report: str | None = None
    overwrite_card: bool = False
    allow_pickle: bool = False
    license: str | None = None


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "score": ScoreConfig,
    "serve": ServeConfig,
    "push": PushConfig,
}


CHOICES: dict[str, tuple[str, ...]] = {
    "score.select": ("best",),
    "score.aggregate": ("min", "prod", "last", "mean"),
    "serve.aggregate": ("min", "last", "prod", "mean"),
    "serve.truncated": ("lowest", "read", "error"),
    "data.prm800k_neutral": PRM800K_NEUTRAL,
    "train.batching": BATCHING,
    "train.gradient_checkpointing": ("auto",),
}
"""Fixed choices; :func:`choices_for` adds the registries' (formats, kinds)."""

# Read from the registries when asked, so a format or kind is declared in one place only.
REGISTRY_CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {
    "data.format": format_choices,
    "eval.format": format_choices,
    "score.format": format_choices,
    "train.kind": train_kind_choices,
    "model.kind": kind_choices,
}


def choices_for(key: str) -> tuple[str, ...] | None:
    """The values a string key admits (None: any)."""
    if key in REGISTRY_CHOICES:
        return REGISTRY_CHOICES[key]()
    return CHOICES.get(key)


@dataclass(frozen=True)
class Range:
    """The values a numeric key admits: ``low``/``high`` bounds (open or closed), plus a few special values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[float, ...] = ()
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "any number"
        text += "".join(f" or {_num(v)}" for v in self.special)
        return text + (f" ({self.note})" if self.note else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


_POSITIVE, _COUNT, _NON_NEGATIVE, _PROBABILITY = Range(0, low_open=True), Range(1), Range(0), Range(0, 1)


_EVERY = Range(0, low_open=True, note="a count of steps, or a fraction of the run when below 1")


_SEED = Range(0, 2**32 - 1)


# Past sys.maxsize the DataLoader's batch sampler fails with a traceback; int32's limit is already far past any batch
# that fits a device (a larger one only means the whole data set in one batch).
_BATCH = Range(1, 2**31 - 1, note="rows per device")


_MAX_TOKENS = 2**31 - 1


# Every numeric key has a range, so a value that cannot work is one line naming the key instead of a traceback (or a
# silently unusable dataset) later. A test keeps this table complete for prmkit's sections and TrainingArguments.
RANGES: dict[str, Range] = {
    # A bound far beyond any sequence: a count past 2^63 overflowed truncation's numpy arithmetic (a traceback).
    "data.max_length": Range(1, _MAX_TOKENS, note="tokens; null for no limit"),
    "data.max_prompt_length": Range(0, _MAX_TOKENS, note="tokens; 0 drops the prompt, null keeps all of it"),
    "data.max_completion_length": Range(1, _MAX_TOKENS, note="tokens; null for no limit"),
    "data.label_threshold": _PROBABILITY,
    "data.num_proc": _COUNT,
    "data.eval_fraction": Range(0, 1, low_open=True, high_open=True, note="a share of data.train's problems"),
    "eval.threshold": _PROBABILITY,
    "eval.batch_tokens": _COUNT,
    "score.threshold": _PROBABILITY,
    "score.batch_tokens": _COUNT,
    "score.sort_window": _COUNT,
    "serve.port": Range(0, 65535, note="0: any free port"),
    "serve.max_wait_ms": Range(0, 60_000),
    "serve.max_queue": _COUNT,
    "serve.max_request_tokens": _COUNT,
    "serve.max_body_mb": _POSITIVE,
    "serve.drain_s": _NON_NEGATIVE,
    "train.memory_budget_gb": Range(0, low_open=True, note="GiB; null: the device's free memory"),
    "train.lora.r": _COUNT,
    "train.lora.alpha": _POSITIVE,
    "train.lora.dropout": Range(0, 1, high_open=True),
    # transformers.TrainingArguments fields
    "train.learning_rate": _POSITIVE,
    "train.num_train_epochs": _POSITIVE,
    "train.max_steps": Range(1, special=(-1,), note="-1: follow num_train_epochs"),
    "train.per_device_train_batch_size": _BATCH,
    "train.per_device_eval_batch_size": _BATCH,
    "train.gradient_accumulation_steps": _COUNT,
    "train.eval_accumulation_steps": _COUNT,
    "train.warmup_steps": Range(0, note="steps, or a fraction of the run when below 1"),
    "train.warmup_ratio": _PROBABILITY,  # transformers 5.0-5.1 only (deprecated for warmup_steps, gone in 5.2)
    "train.weight_decay": _NON_NEGATIVE,
    "train.adam_beta1": Range(0, 1, high_open=True),
    "train.adam_beta2": Range(0, 1, high_open=True),
    "train.adam_epsilon": _NON_NEGATIVE,
    "train.max_grad_norm": _NON_NEGATIVE,
    "train.label_smoothing_factor": Range(0, 1, high_open=True),
    "train.neftune_noise_alpha": _NON_NEGATIVE,
    "train.torch_empty_cache_steps": _COUNT,
    "train.logging_steps": _EVERY,
    "train.eval_steps": _EVERY,
    "train.save_steps": _EVERY,
    "train.eval_delay": _NON_NEGATIVE,
    "train.save_total_limit": Range(1, note="null keeps every checkpoint"),
    "train.seed": _SEED,
    "train.data_seed": _SEED,
    "train.dataloader_num_workers": _NON_NEGATIVE,
    "train.dataloader_prefetch_factor": _COUNT,
    "train.ddp_bucket_cap_mb": _COUNT,
    "train.ddp_timeout": _COUNT,
    "train.local_rank": Range(-1, note="set by the launcher"),
}


def check_range(key: str, value: Any, origin: str, name: str | None = None) -> None:
    """Refuse a number outside ``RANGES[key]`` with one line naming the key (as ``name``, when the file where it was
    found spells it otherwise), the value and the allowed range."""
    allowed = RANGES.get(key)
    if allowed is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value not in allowed:
        raise ConfigError(f"{origin}: {name or key}: {shown(value)} is out of range; expected {allowed.describe()}")


def _check_lora(value: Any, origin: str) -> None:
    if not isinstance(value, dict):
        return
    for name in ("r", "alpha", "dropout"):
        if name not in value:
            continue
        item = value[name]
        integral = name == "r"
        if isinstance(item, bool) or not isinstance(item, (int, float)) or (integral and not float(item).is_integer()):
            raise ConfigError(
                f"{origin}: train.lora.{name}: expected {'an integer' if integral else 'a number'}, "
                f"got {shown(item)} ({type(item).__name__})"
            )
        check_range(f"train.lora.{name}", item, origin)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    push: PushConfig = field(default_factory=PushConfig)
    training_arguments: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_ARGUMENT_DEFAULTS))
    """The `train` section's TrainingArguments fields, kept apart from prmkit's own train keys."""
    source: str = "<defaults>"
    explicit: set[str] = field(default_factory=set)
    """Dotted keys the user set (config file, --set, a command's flags), even to their default value: what a
    command may fill in for the user (``train --example``) never replaces them."""

    @property
    def tokenizer_name(self) -> str | None:
        return self.model.tokenizer or self.model.name_or_path

    def kind_settings(self) -> dict[str, Any]:
        """The PRM-kind keys the user chose (score/eval): unset ones leave what a model's prmkit.json records."""
        return {k: v for k, v in self.model.kind_settings().items() if self.is_set(f"model.{k}")}

    def is_set(self, dotted: str) -> bool:
        """Whether the user chose this key: set explicitly, or (from Python) changed from its default."""
        if dotted in self.explicit:
            return True
        section, _, key = dotted.partition(".")
        if section == "train" and key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            if key not in self.training_arguments:
                return False
            return (
                key not in TRAINING_ARGUMENT_DEFAULTS or self.training_arguments[key] != TRAINING_ARGUMENT_DEFAULTS[key]
            )
        return getattr(getattr(self, section), key) != getattr(SECTIONS[section](), key)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["train"] = {**self.training_arguments, **out["train"]}
        return out


def training_argument_fields():
    # Read from transformers' source, not imported: importing it costs seconds of torch, and config checks need none.
    from prmkit.config.training_args import training_argument_fields as fields

    return fields()


"""What a config may hold once its aliases are expanded: a few hundred bytes of nested aliases (an "alias bomb")
stand for billions of values, which every walk over the config (secrets, checks, messages, saving it) would visit."""


def _did_you_mean(word: str, candidates) -> str:
    if len(word) > 100:  # no key is this long, and difflib's time grows with the length
        return ""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def eval_schedule(training_arguments: dict[str, Any], has_eval: bool) -> dict[str, Any]:
    """The evaluation keys train derives: with eval data and no eval_strategy, evaluate every save_steps steps;
    without eval data, never."""
    if not has_eval:
        return {"eval_strategy": "no"}
    if "eval_strategy" in training_arguments:
        return {}
    out: dict[str, Any] = {"eval_strategy": "steps"}
    if "eval_steps" not in training_arguments:
        out["eval_steps"] = training_arguments.get("save_steps") or 500
    return out
