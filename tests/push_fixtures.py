"""Fixtures for the push tests: a tiny trained model directory, the loopback Hub, and the CLI runner.

Every push test refuses connections beyond 127.0.0.1 (``_loopback_only``, autouse where imported).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.evaluation.report import make_report
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.tokenization import TokenizationParams

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN2_TOKENIZER = SHARED / "fixtures" / "qwen2-tokenizer"
TOKEN = "hf_TestToken_5f3c9a1e7d"
REPO = "alice/tiny-prm"
PUSHED = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "prmkit.json",
    "prmkit_config.yaml",
    "README.md",
}
_CONFUSION = {"tp": 8, "fp": 2, "tn": 5, "fn": 1}
FIGURES = {
    "model": "runs/tiny",
    "threshold": 0.5,
    "threshold_source": "default",
    "subsets": {
        "gsm8k": {
            "step": {
                "n": 16,
                "accuracy": 0.8125,
                "correct_f1": 0.85,
                "wrong_f1": 0.7,
                "prm_score": 0.61,
                "auroc": 0.74,
                "confusion": _CONFUSION,
            },
            "by_position": [],
            "first_error": {"error_accuracy": 0.5, "correct_accuracy": 0.75, "f1": 0.6},
        },
        "math": {
            "step": {
                "n": 16,
                "accuracy": 0.7,
                "correct_f1": 0.8,
                "wrong_f1": 0.5,
                "prm_score": 0.55,
                "auroc": 0.66,
                "confusion": _CONFUSION,
            },
            "by_position": [],
            "first_error": {"error_accuracy": 0.4, "correct_accuracy": 0.6, "f1": 0.48},
        },
    },
    "mean_f1": 0.54,
}
REPORT = make_report({"runs/tiny": FIGURES})
TEXT = [
    "What is 2 + 3?\n2 + 3 = 5.\nThe answer is 5.\n",
    "Tom has 3 apples.\nHe buys 2 more.\nSo he has 5.\n",
    "Step one.\nStep two.\nSo x = 4.\n",
] * 40


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Refuse, and fail the test on, any connection to anything but the loopback interface.

    Violations are also recorded, because libraries swallow the refusal (peft's Hub check does).
    """
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    violations: list = []

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                violations.append(address)
                raise ConnectionRefusedError(f"test tried to connect to {address}")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield
    assert not violations, f"connections beyond loopback: {violations}"


def _tiny_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # No pre-tokenizer regex: BPE may then merge across the step boundary ('.\n'), as Qwen2's does.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXT, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)
    return tok


def _save_tiny_model(path: Path, vocab_size: int) -> None:
    import torch
    from transformers import AutoModelForTokenClassification, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        num_labels=2,
    )
    AutoModelForTokenClassification.from_config(cfg).save_pretrained(path)


def _metadata(separator: str = "\n") -> dict:
    """prmkit.json as `prmkit train` writes it (prmkit/training/save.py `save_final`)."""
    params = TokenizationParams(step_separator=separator, max_length=256, max_prompt_length=128)
    data = {
        "format": "auto",
        "formats": {"train": "math-shepherd", "eval": "processbench"},
        "prm800k_neutral": "negative",
        "label_threshold": None,
        "sources": {"train": "trl-lib/math_shepherd:train[:10%]", "eval": "/data/local/processbench.json"},
        "fingerprints": {"train": "ab12", "eval": "cd34"},
        "cache_key": "0123456789abcdef01234567",
        "splits": {"train": {"rows_kept": 1200, "steps": 5400}, "eval": {"rows_kept": 40, "steps": 160}},
    }
    training = {
        "learning_rate": 2e-5,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "seed": 42,
        "report_to": "none",
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "disable_dropout": True,
        "world_size": 1,
        "effective_batch_size": 4,
        "global_step": 300,
        "epochs": 1.0,
        "train_loss": 0.61,
        "final_loss": 0.55,
        "eval": {"loss": 0.5},
        "seconds": 12.5,
    }
    return build_metadata(
        params,
        "Qwen/Qwen2-0.5B",
        data=data,
        tokenizer={"class": "PreTrainedTokenizerFast"},
        extra={
            "training": training,
            "lora": None,
            "batching": "padded",
            "model": {"init_from_config": False, "dtype": "auto", "attn_implementation": None},
        },
    )


@pytest.fixture(scope="module", name="base_model_dir")
def base_model_dir_fixture(tmp_path_factory) -> Path:
    """A model directory as `prmkit train` leaves it, plus the clutter push must leave behind."""
    d = tmp_path_factory.mktemp("trained")
    tok = _tiny_tokenizer(d)
    _save_tiny_model(d, len(tok))
    write_metadata(d, _metadata())
    (d / "prmkit_config.yaml").write_text("model:\n  name_or_path: Qwen/Qwen2-0.5B\npush:\n  repo_id: null\n")
    (d / "report.json").write_text(json.dumps(REPORT))
    (d / "training_args.bin").write_bytes(b"\x80\x04pickled trainer args")
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x04optimizer")
    (d / "rejects.jsonl").write_text("{}\n")
    return d


@pytest.fixture(name="model_dir")
def model_dir_fixture(base_model_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(base_model_dir, d)
    return d


@pytest.fixture(name="hub")
def hub_fixture(monkeypatch, tmp_path):
    """The loopback Hub, with huggingface_hub pointed at it and the user's own login out of reach."""
    from huggingface_hub import constants

    server = HubServer(token=TOKEN, user="alice", orgs=["acme"]).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.delenv("PRMKIT_DEBUG", raising=False)
    yield server
    server.stop()


def push(*args: str):
    result = CliRunner().invoke(app, ["push", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _assert_one_line_error(result, *needles: str, code: int = 1) -> str:
    """Exit code 1 for failures while running (the Hub, the network), 2 for a bad model directory or usage."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
