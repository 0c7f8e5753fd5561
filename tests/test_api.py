"""The Python API (prmkit/api.py): each function from Python gives what its command gives for the same input, loads
lazily, and neither prints nor exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_prm, write_train_rows
from eval_fixtures import processbench_records, write_json
from push_fixtures import (  # noqa: F401 - fixtures register by being imported
    REPO,
    _loopback_only,
    base_model_dir_fixture,
    hub_fixture,
    model_dir_fixture,
    push,
)
from typer.testing import CliRunner

import prmkit
from prmkit.cli.app import app
from prmkit.errors import UsageError

runner = CliRunner()

# What differs between two runs of the same work: the clock, and the paths named.
VARYING = {
    "seconds",
    "lines_per_s",
    "steps_per_s",
    "timings",
    "output",
    "output_dir",
    "model_dir",
    "checkpoint",
    "tokens_per_second",
    "resumed_from",
    "peak_memory_gib",
}


def cli(*args) -> dict:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def steady(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VARYING}


@pytest.fixture(scope="module")
def prm(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("api") / "prm", train_tokenizer_dir, seed=5)


def test_import_prmkit_loads_no_torch_and_the_api_on_first_use():
    code = """
import json, sys
import prmkit
before = sorted(m for m in ("torch", "transformers", "prmkit.api") if m in sys.modules)
names = {n: getattr(prmkit, n) for n in ("evaluate", "score_file", "push_model", "load_config", "Config")}
import prmkit.api
same = {n: names[n] is getattr(prmkit.api, n) for n in ("evaluate", "score_file", "push_model")}
train = prmkit.train
import prmkit.training.recipe  # the package is prmkit.training: prmkit.train stays the function
print(json.dumps({"before": before, "same": same, "callable": [callable(train), callable(prmkit.train)],
                  "package": prmkit.training.recipe.__name__, "from": __import__("prmkit").train is train,
                  "after": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["before"] == []  # `import prmkit` alone: no torch, and the API not yet loaded
    assert got["same"] == {"evaluate": True, "score_file": True, "push_model": True}
    assert got["callable"] == [True, True] and got["from"] is True
    assert got["package"] == "prmkit.training.recipe"
    assert got["after"] == []  # resolving the API loads no torch either: the first model does


def test_train_called_through_the_package_name_reaches_the_recipe(monkeypatch):
    import prmkit.training.recipe

    seen = []
    monkeypatch.setattr(prmkit.training.recipe, "train", lambda cfg, **kw: seen.append((cfg, kw)) or "result")
    cfg = prmkit.Config()
    assert prmkit.train(cfg, overwrite=True) == "result"
    from prmkit import train

    assert train(cfg) == "result"
    assert seen[0] == (
        cfg,
        {"overwrite": True, "resume": None, "console": None, "callbacks": None, "accept_changes": False},
    )


def test_score_file_equals_the_cli(tmp_path, prm, capsys):
    rows = [
        {
            "id": i,
            "prompt": f"Q{i}: what is {i} + 2?",
            "completions": [f"{i} + 2 = {i + 2}.", "So it is done."],
            "pid": i // 2,
        }
        for i in range(6)
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sets = ["score.threshold=0.45", "score.group_by=pid", "score.sort_window=3"]
    expected = cli("score", prm, src, "-o", tmp_path / "cli.jsonl", "--json", *[a for s in sets for a in ("--set", s)])
    capsys.readouterr()

    cfg = prmkit.load_config(overrides=sets)
    summary = prmkit.score_file(cfg, src, tmp_path / "api.jsonl", model=prm)
    assert (tmp_path / "api.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    assert steady(summary.to_dict()) == steady(expected)
    assert summary.group_by["groups_written"] == 3 and summary.counts.rows_out == 6

    # A scorer loaded once serves several files; model.name_or_path is the default model.
    scorer = prmkit.StepScorer.from_pretrained(prm)
    prmkit.score_file(cfg, src, tmp_path / "again.jsonl", model=scorer)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    named = prmkit.load_config(overrides=[*sets, f"model.name_or_path={prm}"])
    prmkit.score_file(named, src, tmp_path / "named.jsonl")
    assert (tmp_path / "named.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    assert capsys.readouterr().out == ""  # a library function prints nothing (progress goes to `prmkit`'s logger)

    with pytest.raises(UsageError, match="--select needs --group-by"):
        prmkit.score_file(prmkit.load_config(overrides=["score.select=best"]), src, tmp_path / "x.jsonl", model=prm)
    with pytest.raises(UsageError, match="no model to score with"):
        prmkit.score_file(prmkit.load_config(), src, tmp_path / "x.jsonl")


def test_evaluate_equals_the_cli(tmp_path, prm):
    data = write_json(tmp_path / "gsm.json", processbench_records(10, seed=4))
    out = tmp_path / "cli"
    printed = cli("eval", prm, "--data", data, "-o", out, "--no-plots", "--json", "--set", "eval.tune_threshold=gsm")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))

    cfg = prmkit.load_config(overrides=["eval.tune_threshold=gsm"])
    result = prmkit.evaluate(cfg, models=[prm], data=[data])
    assert result.report == report
    assert {k: v for k, v in printed.items() if k not in ("output_dir", "files")} == report
    assert report["threshold_source"].startswith("tuned on gsm")
    assert len(result.scores[str(prm)]["gsm"]) == 10
    with pytest.raises(UsageError, match="no evaluation data"):
        prmkit.evaluate(prmkit.load_config(), models=[prm])


@pytest.mark.slow
def test_a_threshold_given_to_evaluate_beats_tuning_as_on_the_command_line(tmp_path, prm):
    data = write_json(tmp_path / "gsm.json", processbench_records(10, seed=4))
    cfg = prmkit.load_config(overrides=["eval.tune_threshold=gsm"])
    given = cli(
        "eval",
        prm,
        "--data",
        data,
        "-o",
        tmp_path / "t",
        "--no-plots",
        "--json",
        "--threshold",
        "0.4",
        "--set",
        "eval.tune_threshold=gsm",
    )
    assert prmkit.evaluate(cfg, models=[prm], data=[data], threshold=0.4).report == {
        k: v for k, v in given.items() if k not in ("output_dir", "files")
    }
    assert given["threshold_source"] == "given"


@pytest.mark.slow
def test_train_equals_the_cli(tmp_path, tiny_qwen2_config_dir):
    rows = write_train_rows(tmp_path / "rows.jsonl", n=8)
    sets = [
        f"model.name_or_path={tiny_qwen2_config_dir}",
        f"data.train={rows}",
        "model.init_from_config=true",
        "train.max_steps=2",
        "train.save_strategy=no",
    ]
    expected = cli("train", "-o", tmp_path / "cli", "--json", *[a for s in sets for a in ("--set", s)])

    cfg = prmkit.load_config(overrides=[*sets, f"train.output_dir={tmp_path / 'api'}"])
    result = prmkit.train(cfg)
    assert result.model_dir == str(tmp_path / "api") and not result.interrupted
    assert steady(result.to_dict()) == steady(expected)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_push_model_equals_the_cli(hub, model_dir, capsys):
    cfg = prmkit.load_config(overrides=["push.license=apache-2.0"])
    planned = prmkit.push_model(cfg, model_dir=model_dir, repo_id=REPO, dry_run=True)
    dry = push(str(model_dir), "--repo-id", REPO, "--license", "apache-2.0", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert planned.to_dict() == json.loads(dry.stdout)
    assert hub.commits == []

    result = prmkit.push_model(cfg, model_dir=str(model_dir), repo_id=REPO)
    assert len(hub.commits) == 1 and result.commit_oid and not result.no_op
    capsys.readouterr()
    # The command finds the Hub already holding exactly what it would upload.
    again = push(str(model_dir), "--repo-id", REPO, "--license", "apache-2.0", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["no_op"] is True and len(hub.commits) == 1

    with pytest.raises(UsageError, match="no repo id"):
        prmkit.push_model(prmkit.load_config(), model_dir=model_dir)
    assert capsys.readouterr().out == ""
