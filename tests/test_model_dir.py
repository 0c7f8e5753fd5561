"""A broken model directory is one line naming the file and the problem, in score, eval and train; never a
traceback, a hang, or scores from a tokenizer that is not the model's."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.errors import UsageError
from tests.conftest import make_tiny_prm

runner = CliRunner()
ROWS = [{"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "So the answer is 5."], "labels": [True, True]}]


@pytest.fixture(scope="module")
def prm(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("model-dir") / "prm", train_tokenizer_dir, seed=4)


def _config(**change):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **change}))

    return edit


def _weights(edit_bytes):
    def edit(d: Path) -> None:
        p = d / "model.safetensors"
        p.write_bytes(edit_bytes(p.read_bytes()))

    return edit


def _huge_shape(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**12, 10**12]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _tokenizer_json(value):
    def edit(d: Path) -> None:
        tj = json.loads((d / "tokenizer.json").read_text())
        (d / "tokenizer.json").write_text(json.dumps(value(tj)))

    return edit


def _no_tokenizer(d: Path) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    ):
        (d / name).unlink(missing_ok=True)


BROKEN = {
    # was: SafetensorError tracebacks
    "truncated weights": (
        _weights(lambda b: b[: len(b) // 2]),
        r"model.safetensors: truncated or corrupt \(\d+ bytes, the header describes \d+\)",
    ),
    "huge header length": (
        _weights(lambda b: struct.pack("<Q", 2**62) + b[8:]),
        r"model.safetensors: not a safetensors file \(bad header length 4611686018427387904\)",
    ),
    "huge shapes": (_weights(_huge_shape), r"shape \[1000000000000, 1000000000000\] of F32 does not fill its"),
    # was: RuntimeError or AssertionError tracebacks from inside transformers and torch
    "hidden size differs": (
        _config(hidden_size=128),
        r"config.json: hidden_size is 128, but the weights' embedding table is [\d,]+ x 64",
    ),
    "vocab size differs": (_config(vocab_size=100), r"config.json: vocab_size is 100, but the weights' embedding"),
    "intermediate size differs": (_config(intermediate_size=100), "could not be loaded: "),
    # was: a validation traceback; 10**6 layers of an architecture without that validation are built for hours
    "a million layers": (
        _config(num_hidden_layers=10**6),
        "config.json: num_hidden_layers is 1,000,000, but the weights hold 2 layers",
    ),
    "layers as a float": (
        _config(num_hidden_layers=1e6),
        "config.json: num_hidden_layers: expected a positive "
        r"integer up to 2,147,483,647, got 1000000.0",
    ),
    "negative vocabulary": (_config(vocab_size=-5), "config.json: vocab_size: expected a positive integer"),
    # was: AttributeError, TypeError or a bare Exception from the tokenizer's loader
    "tokenizer.json model is a number": (_tokenizer_json(lambda tj: {**tj, "model": 5}), "could not be loaded: "),
    "tokenizer.json is a list": (_tokenizer_json(lambda tj: [1, 2, 3]), "could not be loaded: "),
    "tokenizer.json normalizer unknown": (
        _tokenizer_json(lambda tj: {**tj, "normalizer": {"type": "Nope"}}),
        "could not be loaded: ",
    ),
    # was: rc 0, every step_scores null, "truncated": true, first_error -1 (transformers' one-token fallback)
    "no tokenizer files": (_no_tokenizer, r"the tokenizer loaded there has 1 tokens for the model's [\d,]+ embeddings"),
}


def _broken(tmp_path: Path, prm: Path, case: str) -> tuple[Path, str]:
    edit, expected = BROKEN[case]
    d = Path(shutil.copytree(prm, tmp_path / "broken"))
    edit(d)
    return d, expected


def _assert_one_line(res, expected: str) -> None:
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.output
    assert re.search(expected, errors[0]), errors[0]


@pytest.mark.parametrize("case", list(BROKEN))
def test_score_refuses_a_broken_model_directory_in_one_line(tmp_path, prm, case):
    d, expected = _broken(tmp_path, prm, case)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = runner.invoke(app, ["score", str(d), str(src), "-o", str(tmp_path / "out.jsonl")])
    _assert_one_line(res, expected)
    assert str(d) in res.output
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("case", ["truncated weights", "a million layers", "no tokenizer files"])
def test_eval_refuses_a_broken_model_directory_in_one_line(tmp_path, prm, case):
    from tests.eval_fixtures import processbench_records

    d, expected = _broken(tmp_path, prm, case)
    data = tmp_path / "gsm8k.json"
    data.write_text(json.dumps(processbench_records(4, seed=1)))
    _assert_one_line(runner.invoke(app, ["eval", str(d), "--data", str(data), "-o", str(tmp_path / "ev")]), expected)


@pytest.mark.parametrize(
    "case", ["huge shapes", "layers as a float", "no tokenizer files", "tokenizer.json model is a number"]
)
def test_train_refuses_a_broken_base_model_in_one_line(tmp_path, prm, case):
    from tests.conftest import write_train_rows

    d, expected = _broken(tmp_path, prm, case)
    rows = write_train_rows(tmp_path / "rows.jsonl", n=8)
    res = runner.invoke(
        app, ["train", "--model", str(d), "--train", str(rows), "-o", str(tmp_path / "run"), "--max-steps", "1"]
    )
    _assert_one_line(res, expected)


def test_a_tokenizer_that_cannot_encode_the_separator_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prmkit.models.files import check_tokenizer_fits

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    check_tokenizer_fits(tok, 4, "m", "a")
    for separator, ids in (("\n", r"\[\]"), ("§", r"\[0\]")):  # dropped as whitespace; unknown
        with pytest.raises(
            UsageError,
            match=rf"^m: the tokenizer loaded there cannot encode the step separator "
            rf"{re.escape(json.dumps(separator))} \(got {ids}\)",
        ):
            check_tokenizer_fits(tok, 4, "m", separator)
    with pytest.raises(UsageError, match="has 3 tokens for the model's 7 embeddings"):
        check_tokenizer_fits(tok, 7, "m")
