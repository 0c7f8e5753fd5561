"""`prmkit train --tiny ARCH --tokenizer TOK --train FILE`: a small model on your own data, offline, one command."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_train_rows
from transformers import AutoTokenizer
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.training.example import tiny_architectures, tiny_base_dir

runner = CliRunner()


@pytest.mark.slow
def test_tiny_trains_on_your_own_file_and_the_result_scores(tmp_path, train_tokenizer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = write_train_rows(tmp_path / "my.jsonl", n=16, seed=5)
    out = tmp_path / "runs" / "tiny"
    res = runner.invoke(
        app,
        [
            "train",
            "--tiny",
            "qwen2",
            "--tokenizer",
            str(train_tokenizer_dir),
            "--train",
            str(rows),
            "-o",
            str(out),
            "--max-steps",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    vocab = len(AutoTokenizer.from_pretrained(train_tokenizer_dir))
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "qwen2",
        2,
        64,
        vocab,
    )
    saved = yaml.safe_load((out / "prmkit_config.yaml").read_text())
    assert saved["model"]["tiny"] == "qwen2" and saved["model"]["init_from_config"] is True
    assert saved["train"]["learning_rate"] == 2e-3
    # The tokenizer is trained with as it loads back beside the model's config, and tokenizes as the one given.
    assert saved["model"]["tokenizer"] == saved["model"]["name_or_path"]
    probe = "Step 1: 3 + 5 = 8.\n\nSo x = 4."
    given = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    assert AutoTokenizer.from_pretrained(out)(probe)["input_ids"] == given(probe)["input_ids"]
    assert saved["data"]["train"] == str(rows)

    scored = tmp_path / "scored.jsonl"
    res = runner.invoke(app, ["score", str(out), str(rows), "-o", str(scored)])
    assert res.exit_code == 0, res.output
    assert "differs from the one recorded" not in res.stderr  # the tokenizer came back as trained
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(lines) == 16 and all(0 < s < 1 for line in lines for s in line["step_scores"])


@pytest.mark.parametrize(
    "arch,sizes",
    [
        ("llama", {"hidden_size": 64, "num_hidden_layers": 2, "num_key_value_heads": 2, "intermediate_size": 128}),
        ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
        ("gemma", {"hidden_size": 64, "head_dim": 16}),
    ],
)
def test_each_architecture_gets_its_own_size_keys(tmp_path, tiny_tokenizer_dir, arch, sizes):
    first = tiny_base_dir(arch, str(tiny_tokenizer_dir), cache_dir=str(tmp_path))
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == arch and config["vocab_size"] == len(
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    )
    assert {k: config[k] for k in sizes} == sizes
    assert tiny_base_dir(arch, str(tiny_tokenizer_dir), cache_dir=str(tmp_path)) == first  # built once


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tiny", "qwen2"], "model.tiny 'qwen2' needs a tokenizer: set model.tokenizer"),
        (
            ["--tiny", "qwen", "--tokenizer", "TOK"],
            "'qwen' is not an architecture prmkit can build (did you mean 'qwen",
        ),
        (["--tiny", "t5", "--tokenizer", "TOK"], "'t5' is not an architecture prmkit can build"),
        (["--tiny", "bert", "--tokenizer", "TOK"], "(bert) is not a causal (decoder-only) model"),
        (["--tiny", "qwen2", "--tokenizer", "TOK", "--model", "Qwen/Qwen2-0.5B"], "model.name_or_path is also set"),
    ],
)
def test_tiny_refusals_are_one_line(tmp_path, tiny_tokenizer_dir, args, message):
    rows = write_train_rows(tmp_path / "my.jsonl", n=4)
    args = [str(tiny_tokenizer_dir) if a == "TOK" else a for a in args]
    res = runner.invoke(app, ["train", *args, "--train", str(rows), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_buildable_architectures_are_causal_with_a_token_classification_head():
    archs = tiny_architectures()
    assert {"qwen2", "llama", "mistral", "gpt2"} <= set(archs) and "t5" not in archs
