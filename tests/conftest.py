"""Shared fixtures: offline tokenizers and paths. No test touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QWEN2_TOKENIZER = SHARED / "fixtures" / "qwen2-tokenizer"
EXAMPLES = ROOT / "prmkit" / "examples"

requires_shared = pytest.mark.skipif(
    not QWEN2_TOKENIZER.exists(), reason="needs ../shared (sample data and the Qwen2 tokenizer), absent from this clone"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CORPUS = [
    "Which number is larger, 9.8 or 9.11?",
    "11 is greater than 8.",
    "Hence, 9.11 > 9.8.",
    "Step 1: Janet spends 3 hours + 5 hours = 8 hours per week on music lessons.",
    "The first equation is 3p + e = 124, and the second equation is 5p + e = 182.",
    "Let's call the price of a pencil p and the price of a jumbo eraser e.",
    "So the answer is 42.\n\nWe check: 6 * 7 = 42.",
]


def make_tiny_tokenizer(path: Path, bos: bool = False) -> Path:
    """Train a small byte-level BPE offline and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    kwargs = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="session")
def tiny_bos_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok-bos"), bos=True)


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    if not QWEN2_TOKENIZER.exists():
        pytest.skip("needs ../shared/fixtures/qwen2-tokenizer, absent from this clone")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Every test gets its own prepared-data cache so cache hits are only the ones a test makes.
    monkeypatch.setenv("PRMKIT_CACHE", str(tmp_path / "prmkit-cache"))
