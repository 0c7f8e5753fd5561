"""Shared fixtures: offline tokenizers and paths. No test touches the network."""

from __future__ import annotations

import contextlib
import logging
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
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
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


@pytest.fixture(autouse=True)
def _prmkit_logger_propagates():
    # An in-process CLI test leaves the `prmkit` logger non-propagating (attach_logging). caplog sees the records of
    # a non-propagating logger only from pytest 9.2 on, so on pytest 8.0-9.1 a later caplog test saw nothing.
    logging.getLogger("prmkit").propagate = True


@contextlib.contextmanager
def prmkit_log():
    """Records of the `prmkit` logger, whatever an earlier CLI test did to its propagation."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("prmkit")
    handler = Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# --- every report.json a test leaves behind follows prmkit/schemas/report.schema.json ------------------------------

_CHECKED_REPORTS: set[Path] = set()


def validate_report(report) -> None:
    """Raise jsonschema.ValidationError unless ``report`` (a report.json's content) follows the packaged schema."""
    import jsonschema

    from prmkit.evaluation.report import report_schema

    jsonschema.Draft202012Validator(report_schema()).validate(report)


def _check_reports_under(root: Path) -> None:
    import json

    for path in sorted(root.rglob("report.json")):
        if path in _CHECKED_REPORTS:
            continue
        _CHECKED_REPORTS.add(path)
        try:
            validate_report(json.loads(path.read_text(encoding="utf-8")))
        except Exception as e:
            raise AssertionError(f"{path} does not follow prmkit/schemas/report.schema.json: {e}") from None


@pytest.fixture(autouse=True)
def _reports_follow_the_schema(tmp_path):
    # After the test, so reports written by subprocesses and by the CLI are checked as much as the library's.
    yield
    _check_reports_under(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def _session_reports_follow_the_schema(tmp_path_factory):
    # Reports in module- and session-scoped directories, which no single test's tmp_path holds.
    yield
    _check_reports_under(tmp_path_factory.getbasetemp())


def make_tiny_prm(path: Path, tokenizer_dir: Path, seed: int = 0, step_separator: str = "\n") -> Path:
    """A random tiny Qwen2 token-classification PRM directory (weights, tokenizer, prmkit.json).

    Its scores mean nothing, but they vary from step to step and are deterministic for a seed, which is all the
    evaluation tests need.
    """
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer, Qwen2Config

    from prmkit.models.model_dir import build_metadata, write_metadata
    from prmkit.tokenization import TokenizationParams

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tok),
        num_labels=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_metadata(path, build_metadata(TokenizationParams(step_separator=step_separator), base_model=None))
    # transformers picks a model directory's tokenizer class from its config: a Qwen2 config reloads the tokenizer
    # as Qwen2Tokenizer, so only a tokenizer with Qwen2's pipeline comes back unchanged. Scoring must see the same ids.
    probe = "Hence, 9.11 > 9.8.  Step 2: 3 + 5 = 8 (twice)"
    assert AutoTokenizer.from_pretrained(path)(probe)["input_ids"] == tok(probe)["input_ids"], (
        "tokenizer changed on reload"
    )
    return path


def prm_twins(root: Path, tokenizer_dir: Path, trained: dict, other: dict) -> tuple[Path, Path]:
    """One tiny PRM's weights in two directories whose prmkit.json records different tokenization parameters.

    Scoring the second one as it is gives the reference for scoring the first with ``other`` set by hand.
    """
    import shutil

    from prmkit.models.model_dir import build_metadata, write_metadata
    from prmkit.tokenization import TokenizationParams

    first = make_tiny_prm(root / "trained", tokenizer_dir, seed=3)
    second = Path(shutil.copytree(first, root / "other"))
    write_metadata(first, build_metadata(TokenizationParams(**trained), base_model=None))
    write_metadata(second, build_metadata(TokenizationParams(**{**trained, **other}), base_model=None))
    return first, second


@pytest.fixture(scope="session")
def tiny_prm_pair(tmp_path_factory, train_tokenizer_dir) -> tuple[Path, Path]:
    """Two tiny PRMs: seed 0 with separator "\\n", seed 1 with separator "\\n\\n" (in its prmkit.json)."""
    root = tmp_path_factory.mktemp("tiny-prms")
    return (
        make_tiny_prm(root / "prm_a", train_tokenizer_dir, seed=0, step_separator="\n"),
        make_tiny_prm(root / "prm_b", train_tokenizer_dir, seed=1, step_separator="\n\n"),
    )


# --- training fixtures (tests/test_training.py, test_train_cli.py, test_distributed.py) -----------------------------

TRAIN_TINY_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
_TRAIN_WORDS = [
    "add",
    "subtract",
    "multiply",
    "the",
    "total",
    "apples",
    "pencils",
    "costs",
    "each",
    "week",
    "hours",
    "minutes",
    "so",
    "we",
    "get",
    "then",
    "therefore",
    "answer",
    "price",
    "eraser",
    "equation",
    "solve",
    "both",
    "sides",
    "divide",
    "by",
]


def write_train_rows(path: Path, n: int = 24, seed: int = 0, soft: bool = False) -> Path:
    """Stepwise JSONL rows of varied length (1-6 steps); with ``soft`` every third row has soft labels."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            prompt = f"Problem {i}: what is {a} + {b}? " + " ".join(rng.choices(_TRAIN_WORDS, k=rng.randint(3, 25)))
            steps, labels, ok = [], [], True
            for k in range(rng.randint(1, 6)):
                good = rng.random() > 0.25
                ok = ok and good
                steps.append(
                    f"Step {k + 1}: {a} + {b + (0 if good else 1)} = {a + b + (0 if good else 1)} "
                    + " ".join(rng.choices(_TRAIN_WORDS, k=rng.randint(2, 12)))
                )
                labels.append(ok)
            if soft and i % 3 == 0:
                labels = [round(rng.uniform(0.05, 0.95), 3) for _ in labels]
            fh.write(json.dumps({"prompt": prompt, "completions": steps, "labels": labels}) + "\n")
    return path


@pytest.fixture(scope="session")
def train_tokenizer_dir(tmp_path_factory) -> Path:
    """prmkit's example tokenizer (Qwen2's pre-tokenizer, so it loads back identically beside a Qwen2 config)."""
    from prmkit.training.example import build_example_tokenizer

    path = tmp_path_factory.mktemp("train-tok")
    build_example_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_config_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    """A tiny Qwen2 config (no weights) beside the tokenizer: train it with model.init_from_config: true."""
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2Config(
        **TRAIN_TINY_MODEL,
        vocab_size=len(tok),
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fake_checkpoint(path: Path, step: int = 1, marker: bool = True) -> Path:
    """A small checkpoint directory laid out as transformers writes one; ``marker`` makes prmkit call it complete."""
    import json

    import torch
    from safetensors.torch import save_file

    from prmkit.core.checkpoints import mark_complete

    path.mkdir(parents=True)
    save_file({"score.weight": torch.arange(8, dtype=torch.float32).reshape(2, 4)}, str(path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if marker:
        mark_complete(path)
    return path
