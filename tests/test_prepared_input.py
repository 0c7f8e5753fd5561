"""The same data options everywhere: train and eval take prepare's --format, --step-separator and --skip-invalid,
and a `prmkit prepare` output is data for train and eval, checked against the tokenizer and settings that read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from conftest import make_tiny_prm, write_train_rows
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config
from prmkit.data.prepare import prepare_splits
from prmkit.errors import DataError
from prmkit.models.loading import load_tokenizer

runner = CliRunner()


class Seen(dict):
    pass


@pytest.mark.slow
def test_train_and_eval_take_the_data_options_prepare_takes(tmp_path, monkeypatch):
    import prmkit.evaluation.evaluate
    import prmkit.training.recipe
    from prmkit.cli.train_cmd import _child_args

    seen = Seen()

    def fake_train(cfg, **kwargs):
        seen["train"] = cfg
        raise typer.Exit(0)

    def fake_evaluate(models, data, **kwargs):
        seen["eval"] = kwargs
        raise typer.Exit(0)

    monkeypatch.setattr(prmkit.training.recipe, "train", fake_train)
    monkeypatch.setattr(prmkit.evaluation.evaluate, "evaluate", fake_evaluate)
    flags = ["--format", "math-shepherd", "--step-separator", r"\n\n", "--skip-invalid"]
    res = runner.invoke(app, ["train", "--model", "m", "--train", "rows.jsonl", "-o", str(tmp_path / "run"), *flags])
    assert res.exit_code == 0, res.output
    data = seen["train"].data
    assert (data.format, data.step_separator, data.skip_invalid) == ("math-shepherd", "\n\n", True)
    # A relaunch through accelerate passes them on as typed.
    child = _child_args(
        None,
        None,
        None,
        "m",
        "rows.jsonl",
        None,
        None,
        False,
        False,
        False,
        False,
        data_flags={"--format": "math-shepherd", "--step-separator": r"\n\n", "--skip-invalid": True},
    )
    assert child[-5:] == ["--format", "math-shepherd", "--step-separator", r"\n\n", "--skip-invalid"]

    res = runner.invoke(app, ["eval", "m", "--data", "rows.jsonl", "-o", str(tmp_path / "ev"), "--no-plots", *flags])
    assert res.exit_code == 0, res.output
    kwargs = seen["eval"]
    assert kwargs["fmt"] == "math-shepherd" and kwargs["skip_invalid"] is True
    assert kwargs["tokenization"]["step_separator"] == "\n\n"  # data.step_separator, as score reads it

    # A config written for prepare and train (data.format) serves eval too.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  format: processbench\n  skip_invalid: true\n", encoding="utf-8")
    res = runner.invoke(
        app, ["eval", "m", "--data", "rows.jsonl", "-o", str(tmp_path / "ev"), "--no-plots", "-c", str(cfg)]
    )
    assert res.exit_code == 0, res.output
    assert seen["eval"]["fmt"] == "processbench" and seen["eval"]["skip_invalid"] is True


@pytest.fixture
def prepared(tmp_path, train_tokenizer_dir) -> tuple[Path, Path, Path]:
    """(prepared directory with train and eval splits, the train rows, the eval rows) for the example tokenizer."""
    train = write_train_rows(tmp_path / "train.jsonl", n=16, seed=1)
    held = write_train_rows(tmp_path / "eval.jsonl", n=8, seed=2)
    res = runner.invoke(
        app,
        [
            "prepare",
            "--tokenizer",
            str(train_tokenizer_dir),
            "--train",
            str(train),
            "--eval",
            str(held),
            "-o",
            str(tmp_path / "prep"),
        ],
    )
    assert res.exit_code == 0, res.output
    return tmp_path / "prep", train, held


def test_a_prepared_directory_is_training_data_checked_against_the_run(
    tmp_path, prepared, train_tokenizer_dir, tiny_bos_tokenizer_dir
):
    import datasets

    from prmkit.training.recipe import resolve_config

    prep, _train, held = prepared
    tok = load_tokenizer(str(train_tokenizer_dir))

    def cfg(*overrides, **data):
        flags = {
            "model.name_or_path": "m",
            "model.tokenizer": str(train_tokenizer_dir),
            "data.train": str(prep),
            **{f"data.{k}": v for k, v in data.items()},
        }
        return resolve_config(load_config(None, list(overrides), flags))

    # Taken as it is: its eval split becomes data.eval (as load_from_disk(dir)["eval"] would be used); nothing copied.
    whole = cfg()
    assert whole.data.eval == str(prep)
    got = prepare_splits(whole, tok)
    assert got.path == prep and got.cache_hit
    assert got.load()["train"]["input_ids"] == datasets.load_from_disk(str(prep))["train"]["input_ids"]

    # Mixed with a text source: the prepared split is used as it is beside the one tokenized now.
    mixed = prepare_splits(cfg(eval=str(held)), tok)
    assert mixed.path != prep
    assert mixed.load()["train"]["input_ids"] == got.load()["train"]["input_ids"]
    assert mixed.load()["eval"]["input_ids"] == got.load()["eval"]["input_ids"]

    with pytest.raises(DataError, match=r"prepared with data.max_length=1024, but this run uses 64") as e:
        prepare_splits(cfg(max_length=64), tok)
    assert "data.max_length=1024" in e.value.hint
    with pytest.raises(DataError, match=r"prepared with data.step_separator='\\n', but this run uses '\\n\\n'"):
        prepare_splits(cfg(step_separator="\n\n"), tok)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        prepare_splits(cfg(), load_tokenizer(str(tiny_bos_tokenizer_dir)))
    with pytest.raises(DataError, match="prepared for token-classification, but this run trains or scores kind lm-tag"):
        prepare_splits(cfg("train.kind=lm-tag"), load_tokenizer(str(train_tokenizer_dir)))


@pytest.mark.slow
def test_eval_scores_a_prepared_directory_as_it_scores_the_text(tmp_path, prepared, train_tokenizer_dir):
    from prmkit.evaluation.evaluate import evaluate
    from prmkit.models.model_dir import build_metadata, write_metadata
    from prmkit.tokenization import TokenizationParams, tokenizer_fingerprint

    prep, _, held = prepared
    prm = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=4)
    # Loaded from the model directory, the tokenizer is another class (same ids, another fingerprint).
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        evaluate([str(prm)], [f"prep={prep}"])
    # prmkit.json names the tokenizer the model was trained with, as `prmkit train` writes it: that one is accepted.
    write_metadata(
        prm,
        build_metadata(
            TokenizationParams(),
            base_model=None,
            tokenizer=tokenizer_fingerprint(load_tokenizer(str(train_tokenizer_dir))),
        ),
    )
    from_text = evaluate([str(prm)], [f"text={held}"]).report["subsets"]["text"]
    from_prep = evaluate([str(prm)], [f"prep={prep}"]).report["subsets"]["prep"]
    assert from_prep["step"] == from_text["step"]  # the same token ids, scored at the same positions
    assert from_prep["first_error"] == from_text["first_error"]
    assert from_prep["n_steps_labelled"] == from_text["n_steps_labelled"]
    assert from_prep["outcome"] is None and from_prep["best_of_n"] is None

    res = runner.invoke(
        app,
        [
            "eval",
            str(prm),
            "--data",
            str(prep),
            "-o",
            str(tmp_path / "ev"),
            "--no-plots",
            "--set",
            "data.max_length=64",
        ],
    )
    assert res.exit_code == 2
    assert f"error: {prep}: prepared with data.max_length=1024, but model {prm} uses 64" in res.stderr


@pytest.mark.slow
def test_train_on_a_prepared_directory_and_on_a_held_out_fraction(
    tmp_path, prepared, tiny_qwen2_config_dir, train_tokenizer_dir
):
    prep, train, _ = prepared
    base = [
        "train",
        "--model",
        str(tiny_qwen2_config_dir),
        "--tokenizer",
        str(train_tokenizer_dir),
        "--set",
        "model.init_from_config=true",
        "--max-steps",
        "2",
        "--json",
    ]
    res = runner.invoke(app, [*base, "--train", str(prep), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["eval_metrics"]["steps"] > 0  # the prepared eval split
    meta = json.loads((tmp_path / "a" / "prmkit.json").read_text())
    assert meta["data"]["sources"] == {"train": str(train), "eval": str(prepared[2])}

    res = runner.invoke(
        app, [*base, "--train", str(train), "--set", "data.eval_fraction=0.25", "-o", str(tmp_path / "b")]
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "b" / "prmkit.json").read_text())
    assert meta["data"]["eval_split"] == {
        "fraction": 0.25,
        "seed": 42,
        "grouped_by": "prompt",
        "train_rows": 12,
        "eval_rows": 4,
        "train_problems": 12,
        "eval_problems": 4,
    }
    assert meta["training"]["eval"]["steps"] > 0
