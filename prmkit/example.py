"""The bundled example: data in the package, a tokenizer trained from it, a tiny random Qwen2 (`train --example`)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prmkit.atomic import TEMP_SUFFIX, check_manifest, manifest, read_json, remove_leftovers, remove_path, temp_prefix
from prmkit.config import Config
from prmkit.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger("prmkit")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLE_TRAIN = EXAMPLES_DIR / "prm800k_samples.jsonl"
EXAMPLE_EVAL = EXAMPLES_DIR / "processbench_gsm8k_sample.json"
EXAMPLE_OUTPUT_DIR = "runs/example"
MANIFEST_FILE = "prmkit_files.json"  # sizes and checksums of the cached example model's files
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
    from transformers import Qwen2Config

    tokenizer = build_example_tokenizer()
    config = Qwen2Config(**EXAMPLE_MODEL, vocab_size=len(tokenizer), num_labels=2, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Qwen2ForTokenClassification"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest(tmp), indent=2), encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:  # another process (rank) built the same directory first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def apply_example(cfg: Config) -> None:
    """Fill in the example's data, model and settings wherever the user has not chosen a value.

    A key the user set counts as chosen even when it holds the default (``--set train.save_strategy=steps``), and so
    does a null (``--set data.eval=null`` trains without eval).
    """
    if not cfg.data.train:
        cfg.data.train = str(EXAMPLE_TRAIN)
        if not cfg.is_set("data.eval"):
            if EXAMPLE_EVAL.is_file():
                cfg.data.eval = str(EXAMPLE_EVAL)
            else:
                log.warning(f"{EXAMPLE_EVAL.name} is not installed with this copy of prmkit; training without eval")
    if not cfg.model.name_or_path:
        cfg.model.name_or_path = str(example_base_dir(cfg.data.cache_dir))
        cfg.model.init_from_config = True
    if not cfg.is_set("data.max_length"):
        cfg.data.max_length = EXAMPLE_MAX_LENGTH
    ta = cfg.training_arguments
    if not cfg.is_set("train.output_dir"):
        ta["output_dir"] = EXAMPLE_OUTPUT_DIR
    for key, value in EXAMPLE_TRAINING.items():
        if not cfg.is_set(f"train.{key}"):
            ta[key] = value
