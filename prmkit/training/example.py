"""Small models for offline runs: the bundled example (`train --example`: data in the package, a tokenizer trained
from it, a tiny random Qwen2) and a tiny model of any architecture for your own tokenizer and data (`train --tiny`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmkit.config.schema import Config, _did_you_mean
from prmkit.core.atomic import (
    TEMP_SUFFIX,
    check_manifest,
    make_temp_dir,
    manifest,
    read_json,
    remove_leftovers,
    remove_path,
    temp_prefix,
)
from prmkit.core.jsonio import dumps
from prmkit.errors import ConfigError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger("prmkit")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TRAIN = EXAMPLES_DIR / "prm800k_samples.jsonl"
EXAMPLE_EVAL = EXAMPLES_DIR / "processbench_gsm8k_sample.json"
EXAMPLE_OUTPUT_DIR = "runs/example"
MANIFEST_FILE = "prmkit_files.json"  # sizes and checksums of a cached model directory's files (example, tiny)
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
EXAMPLE_MODEL: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
}
EXAMPLE_VOCAB_SIZE = 4096
EXAMPLE_RECIPE_VERSION = 2  # bump when the example tokenizer or model changes, so the cached one is rebuilt


# ---------------------------------------------------------------------------------------------------------------------
# The bundled example: data in the package, a tokenizer trained from it, a tiny random Qwen2


def example_texts() -> list[str]:
    """Every prompt and step of the bundled example data, in file order (what the example tokenizer learns from)."""
    from prmkit.data.formats import PRM800K, PROCESSBENCH, Options
    from prmkit.data.sources import read_step_rows

    texts: list[str] = []
    sources = [(EXAMPLE_TRAIN, PRM800K, False)]  # the formats of the bundled files
    if EXAMPLE_EVAL.is_file():
        sources.append((EXAMPLE_EVAL, PROCESSBENCH, True))
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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(example_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def example_base_dir(cache_dir: str | None = None) -> Path:
    """A directory with the example tokenizer and a tiny Qwen2 config (no weights), built once and cached."""
    from prmkit.data.prepare import cache_root

    h = hashlib.sha256(f"recipe={EXAMPLE_RECIPE_VERSION};{json.dumps(EXAMPLE_MODEL, sort_keys=True)}".encode())
    for path in (EXAMPLE_TRAIN, EXAMPLE_EVAL):
        if path.is_file():
            h.update(path.read_bytes())
    target = cache_root(cache_dir) / "example-model" / h.hexdigest()[:16]

    def build() -> tuple[Any, ...]:
        from transformers import Qwen2Config

        tokenizer = build_example_tokenizer()
        # num_labels goes to PreTrainedConfig's **kwargs, which the signature transformers generates leaves out.
        config = Qwen2Config(  # type: ignore[call-arg]
            **EXAMPLE_MODEL,
            vocab_size=len(tokenizer),
            num_labels=2,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config.architectures = ["Qwen2ForTokenClassification"]
        return tokenizer, config

    return _cached_dir(target, build)


def _cached_dir(target: Path, build: Callable[[], tuple[Any, ...]]) -> Path:
    """``target`` when it holds a complete build whose manifest checks; else built now: each of ``build()``'s objects
    saved (``save_pretrained``) with a manifest beside ``target``, then renamed into place."""
    remove_leftovers(target.parent, target.name)
    if (target / "config.json").is_file():
        try:
            damage = check_manifest(target, read_json(target / MANIFEST_FILE))
        except (OSError, UsageError):
            damage = f"{MANIFEST_FILE} is missing or damaged"
        if damage is None:
            return target
        log.warning(f"{target}: {damage}; rebuilding it")
        try:  # renamed first, so a process building it at the same time never sees it half-deleted
            stale = target.with_name(f"{temp_prefix(target.name)}stale{TEMP_SUFFIX}")
            target.rename(stale)
            remove_path(stale)
        except OSError:
            pass
    objects = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        (tmp / MANIFEST_FILE).write_text(dumps(manifest(tmp), indent=2), encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:  # another process (rank) built the same directory first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def example_settings(cfg: Config) -> dict[str, Any]:
    """What ``train --example`` fills in, by dotted key: only keys the user has not chosen. Builds nothing (the
    model directory is built by :func:`apply_example`), so `config show` can print it at once."""
    out: dict[str, Any] = {}
    if not cfg.data.train:
        out["data.train"] = str(EXAMPLE_TRAIN)
        # a held-out share (data.eval_fraction) is eval data too
        if not cfg.is_set("data.eval") and cfg.data.eval_fraction is None and EXAMPLE_EVAL.is_file():
            out["data.eval"] = str(EXAMPLE_EVAL)
    if not cfg.model.name_or_path:
        out["model.init_from_config"] = True
    if not cfg.is_set("data.max_length"):
        out["data.max_length"] = EXAMPLE_MAX_LENGTH
    if not cfg.is_set("train.output_dir"):
        out["train.output_dir"] = EXAMPLE_OUTPUT_DIR
    for key, value in EXAMPLE_TRAINING.items():
        if not cfg.is_set(f"train.{key}"):
            out[f"train.{key}"] = value
    return out


def put(cfg: Config, dotted: str, value: Any) -> None:
    """Set a key the way a command derives it: not marked as the user's choice (``Config.explicit``)."""
    section, _, key = dotted.partition(".")
    if section == "train" and not hasattr(cfg.train, key):
        cfg.training_arguments[key] = value
    else:
        setattr(getattr(cfg, section), key, value)


def apply_example(cfg: Config) -> None:
    """Fill in the example's data, model and settings wherever the user has not chosen a value.

    A key the user set counts as chosen even when it holds the default (``--set train.save_strategy=steps``), and so
    does a null (``--set data.eval=null`` trains without eval).
    """
    if (
        not cfg.data.train
        and not cfg.is_set("data.eval")
        and cfg.data.eval_fraction is None
        and not EXAMPLE_EVAL.is_file()
    ):
        log.warning(f"{EXAMPLE_EVAL.name} is not installed with this copy of prmkit; training without eval")
    settings = example_settings(cfg)
    if not cfg.model.name_or_path:
        cfg.model.name_or_path = str(example_base_dir(cfg.data.cache_dir))
    for dotted, value in settings.items():
        put(cfg, dotted, value)


# ---------------------------------------------------------------------------------------------------------------------
# `train --tiny ARCH`: a tiny random model of a named architecture, for your tokenizer


TINY_DIR = "tiny-model"
TINY_LEARNING_RATE = EXAMPLE_TRAINING["learning_rate"]


def tiny_architectures() -> list[str]:
    """Architectures `--tiny` can build: transformers model types with a causal-LM and a token-classification class.

    A few encoders are among them (BERT has a causal-LM head); training then refuses them as for any non-causal
    model, unless ``model.allow_bidirectional`` is set.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES))


# Text whose ids tell whether a tokenizer still tokenizes the same way after a reload.
_PROBE_TEXT = "Step 1: 3 + 5 = 8.\n\nSo x = 4.14 (twice)\tthen  two  spaces, ünïcödé, 日本語, <|endoftext|> end"


def tiny_base_dir(arch: str, tokenizer: str, trust_remote_code: bool = False, cache_dir: str | None = None) -> Path:
    """A directory holding ``tokenizer`` beside a tiny config of ``arch`` (no weights), built once and cached.

    The sizes are the example model's (2 layers, hidden size 64), given to the config's constructor, which maps them
    to each architecture's own names (GPT-2's ``n_embd``). The tokenizer is saved beside the config, as in a trained
    model directory, because transformers may then load it with the architecture's tokenizer class: training uses
    it as it will load back for scoring, and it is refused if that changes a single token id.
    """
    from transformers import AutoConfig

    from prmkit.data.prepare import cache_root
    from prmkit.models.loading import load_tokenizer
    from prmkit.tokenization import tokenizer_fingerprint

    known = tiny_architectures()
    if arch not in known:
        raise ConfigError(
            f"model.tiny: {arch!r} is not an architecture prmkit can build{_did_you_mean(arch, known)}",
            hint="a causal transformers model type with a token-classification head, e.g. qwen2, llama, mistral, gpt2",
        )
    tok = load_tokenizer(tokenizer, trust_remote_code)
    sizes = {k: v for k, v in EXAMPLE_MODEL.items() if k != "max_position_embeddings"}
    key = json.dumps(
        {
            "arch": arch,
            "sizes": sizes,
            "tokenizer": tokenizer_fingerprint(tok)["sha256"],
            "vocab": len(tok),
            "specials": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
        },
        sort_keys=True,
    )
    target = cache_root(cache_dir) / TINY_DIR / f"{arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def build() -> tuple[Any, ...]:
        default = AutoConfig.for_model(arch)
        # Given to the constructor, which derives the rest from them (per-layer attention types, for one).
        kwargs = {name: value for name, value in sizes.items() if hasattr(default, name)}
        if getattr(default, "head_dim", None) is not None:  # Gemma and others fix it apart from the hidden size
            kwargs["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
        config = AutoConfig.for_model(
            arch,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
        return tok, config

    _cached_dir(target, build)
    again = load_tokenizer(str(target), trust_remote_code)
    if again(_PROBE_TEXT)["input_ids"] != tok(_PROBE_TEXT)["input_ids"] or len(again) != len(tok):
        raise ConfigError(
            f"model.tiny: beside a {arch} config, transformers loads {tokenizer} as "
            f"{type(again).__name__}, which tokenizes differently",
            hint="choose the architecture this tokenizer was made for (e.g. qwen2 for a Qwen2 tokenizer)",
        )
    return target


def apply_tiny(cfg: Config) -> None:
    """Point the model (and tokenizer) at a tiny ``model.tiny`` built for ``model.tokenizer``, weights initialised."""
    from prmkit.data.prepare import cache_root

    model = cfg.model
    assert model.tiny, "resolve_config applies model.tiny only when it is set"
    tiny_root = cache_root(cfg.data.cache_dir) / TINY_DIR
    if model.name_or_path and Path(model.name_or_path).parent == tiny_root and model.init_from_config:
        return  # already applied (a config saved by a --tiny run)
    if not model.tokenizer:
        raise UsageError(
            f"model.tiny {model.tiny!r} needs a tokenizer: set model.tokenizer",
            hint=f"e.g. prmkit train --tiny {model.tiny} --tokenizer path/to/tokenizer --train rows.jsonl",
        )
    if model.name_or_path:
        raise ConfigError(
            f"model.tiny builds the model, but model.name_or_path is also set ({model.name_or_path!r})",
            hint="drop one of them",
        )
    base = str(tiny_base_dir(model.tiny, model.tokenizer, model.trust_remote_code, cfg.data.cache_dir))
    log.info(f"tiny {model.tiny} model for the tokenizer {model.tokenizer}: {base}")
    model.name_or_path = model.tokenizer = base
    for dotted, value in tiny_settings(cfg).items():
        if dotted == "train.learning_rate":
            log.info(f"tiny model: learning_rate {value} (set train.learning_rate to choose another)")
        put(cfg, dotted, value)


def tiny_settings(cfg: Config) -> dict[str, Any]:
    """What ``model.tiny`` sets besides the model it builds, by dotted key: only keys the user has not chosen."""
    out: dict[str, Any] = {"model.init_from_config": True}
    if not cfg.is_set("train.learning_rate"):
        out["train.learning_rate"] = TINY_LEARNING_RATE  # a random tiny model barely moves at a fine-tuning rate
    return out
