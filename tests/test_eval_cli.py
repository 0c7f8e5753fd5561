"""`prmkit eval` on the command line: options, config, exit codes, output directory rules, one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prm_twins
from eval_fixtures import processbench_first_error, processbench_records, read_records, write_json
from typer.testing import CliRunner

from prmkit.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval-cli-data")
    bad = processbench_records(5, seed=3)
    bad[2]["label"] = 99
    return {
        "a": write_json(d / "a.json", processbench_records(16, seed=1)),
        "b": write_json(d / "b.json", processbench_records(7, seed=2)),
        "bad": write_json(d / "bad.json", bad),
    }


@pytest.fixture(scope="module")
def reference(tiny_prm_pair, data):
    from prmkit.scoring import StepScorer

    scorer = StepScorer.from_pretrained(tiny_prm_pair[0])
    return {
        name: scorer.score_batch([(r["problem"], r["steps"]) for r in read_records(data[name])]) for name in ("a", "b")
    }


def run(*args: str):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_json_result_equals_report_json(tiny_prm_pair, data, reference, tmp_path):
    model = tiny_prm_pair[0]
    out = tmp_path / "out"
    res = run(model, "--data", data["a"], "--data", data["b"], "--threshold", "0.5", "-o", out, "--json", "--no-plots")
    assert res.exit_code == 0, res.stderr
    printed = json.loads(res.stdout)  # one JSON object, nothing else on stdout
    written = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert printed.pop("output_dir") == str(out)
    assert printed.pop("files") == [str(out / "report.json"), str(out / "report.md")]
    assert printed == written
    assert written["threshold_source"] == "given"
    for name in ("a", "b"):
        expected = processbench_first_error(reference[name], [r["label"] for r in read_records(data[name])], 0.5)
        assert written["subsets"][name]["first_error"]["f1"] == pytest.approx(expected["f1"], abs=1e-12)
    assert written["mean_f1"] == pytest.approx(
        (written["subsets"]["a"]["first_error"]["f1"] + written["subsets"]["b"]["first_error"]["f1"]) / 2
    )
    # The hint for `push` goes to stderr.
    assert f"prmkit push {model} --eval-report {out / 'report.json'}" in res.stderr.replace("\n", "")


def test_tables_on_stdout_logs_on_stderr(tiny_prm_pair, data, tmp_path):
    res = run(tiny_prm_pair[0], "--data", data["a"], "-o", tmp_path / "out", "--no-plots")
    assert res.exit_code == 0, res.stderr
    assert "First error (ProcessBench)" in res.stdout
    assert "threshold 0.5 (chosen by: default)" in res.stdout
    assert "loading" in res.stderr and "loading" not in res.stdout


@pytest.mark.slow
def test_config_eval_section(tiny_prm_pair, data, tmp_path):
    cfg = tmp_path / "prmkit.yaml"
    out = tmp_path / "from-config"
    cfg.write_text(
        f"model:\n  name_or_path: {tiny_prm_pair[0]}\n"
        f"eval:\n  data: [{data['a']}, {data['b']}]\n  threshold: 0.5\n  tune_threshold: a\n"
        f"  output_dir: {out}\n  plots: false\n",
        encoding="utf-8",
    )
    res = run("--config", cfg)
    assert res.exit_code == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    # Tuning beats the config's threshold (the `config init` template spells out threshold: 0.5).
    assert rep["threshold_source"].startswith("tuned on a (f1=")
    assert rep["model"] == str(tiny_prm_pair[0])
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]

    # --threshold on the command line beats the config's tuning; --set counts as given too.
    res = run("--config", cfg, "--threshold", "0.3", "--json")
    assert res.exit_code == 0, res.stderr
    assert (json.loads(res.stdout)["threshold"], json.loads(res.stdout)["threshold_source"]) == (0.3, "given")
    res = run("--config", cfg, "--set", "eval.tune_threshold=null", "--set", "eval.threshold=0.25", "--json")
    assert res.exit_code == 0, res.stderr
    assert (json.loads(res.stdout)["threshold"], json.loads(res.stdout)["threshold_source"]) == (0.25, "given")


def test_usage_errors_exit_2(tiny_prm_pair, data, tmp_path):
    model = tiny_prm_pair[0]
    res = run(model, "--data", data["a"], "--threshold", "0.4", "--tune-threshold", "a", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "exclude each other" in res.stderr
    res = run(model, "--data", data["a"], "--tune-threshold", "nope", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "no such subset" in res.stderr and "subsets: a" in res.stderr
    res = run(model, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "no evaluation data" in res.stderr
    res = run(model, "--data", data["a"], "--threshold", "1.5")
    assert res.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_bad_input_names_the_row_and_exits_2(tiny_prm_pair, data, tmp_path):
    res = run(tiny_prm_pair[0], "--data", data["bad"], "-o", tmp_path / "out")
    assert res.exit_code == 2
    assert f"{data['bad']}: row 3: label: expected -1 or a step index below" in res.stderr.replace("\n", "")
    assert "--skip-invalid" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "out").exists()


def test_skip_invalid(tiny_prm_pair, data, tmp_path):
    out = tmp_path / "out"
    res = run(tiny_prm_pair[0], "--data", data["bad"], "-o", out, "--skip-invalid", "--no-plots", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["subsets"]["bad"]["n_solutions"] == 4 and rep["subsets"]["bad"]["rows_rejected"] == 1
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(3, "label")]
    assert "1 invalid rows skipped" in res.stderr


@pytest.mark.slow
def test_output_dir_refused_unless_overwrite(tiny_prm_pair, data, tmp_path):
    model = tiny_prm_pair[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = run(model, "--data", data["a"], "-o", out, "--no-plots")
    assert res.exit_code == 2 and "not empty" in res.stderr and "--overwrite" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    res = run(model, "--data", data["a"], "-o", out, "--no-plots", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert (out / "notes.txt").read_text() == "keep me" and (out / "report.json").exists()

    # A directory holding only an earlier report is this command's own output: replaced without --overwrite.
    own = tmp_path / "own"
    assert run(model, "--data", data["a"], "-o", own, "--threshold", "0.2", "--no-plots").exit_code == 0
    res = run(model, "--data", data["b"], "-o", own, "--no-plots", "--json")
    assert res.exit_code == 0, res.stderr
    assert "replacing the previous report" in res.stderr
    assert list(json.loads((own / "report.json").read_text())["subsets"]) == ["b"]


def test_missing_matplotlib_is_one_line_error(tiny_prm_pair, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    res = run(tiny_prm_pair[0], "--data", data["a"], "-o", tmp_path / "out", "--plots")  # asked for explicitly
    assert res.exit_code == 1
    assert "plots need matplotlib: pip install 'prmkit[plot]'" in res.stderr
    assert "--no-plots" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # refused before any scoring or writing


def test_without_matplotlib_the_report_is_written_without_plots(tiny_prm_pair, data, tmp_path, monkeypatch):
    # Right after the README's install (no plot extra): a report and one warning with the install command.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = run(tiny_prm_pair[0], "--data", data["a"], "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: no plots: matplotlib is not installed; pip install 'prmkit[plot]' adds them (--no-plots: no warning)"
    ]
    quiet = run(tiny_prm_pair[0], "--data", data["a"], "-o", tmp_path / "quiet", "--no-plots")
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr


@pytest.mark.slow
def test_two_models_positional_and_option(tiny_prm_pair, data, tmp_path):
    a, b = tiny_prm_pair
    out = tmp_path / "cmp"
    res = run(a, "--model", b, "--data", data["a"], "-o", out)
    assert res.exit_code == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["models"]) == [str(a), str(b)]
    assert "Subset: a" in res.stdout  # the side-by-side table
    assert {"score_histogram.png", "reliability.png", "accuracy_by_position.png", "best_of_n.png"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.slow
def test_python_m_prmkit_subprocess(tiny_prm_pair, data, tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "eval",
            str(tiny_prm_pair[0]),
            "--data",
            str(data["b"]),
            "-o",
            str(out),
            "--no-plots",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["subsets"]["b"]["n_solutions"] == 7
    assert (
        printed["subsets"]["b"]["first_error"]
        == json.loads((out / "report.json").read_text())["subsets"]["b"]["first_error"]
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "eval",
            str(tiny_prm_pair[0]),
            "--data",
            str(data["bad"]),
            "-o",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "row 3" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_dtype_and_device_reach_the_scorer(tiny_prm_pair, data, tmp_path, monkeypatch):
    import prmkit.evaluation.evaluate as evaluation

    seen = []
    real = evaluation._default_loader

    def spy(model, **kwargs):
        scorer = real(model, **kwargs)
        seen.append((kwargs["dtype"], kwargs["device"], str(scorer.dtype), scorer.device.type))
        return scorer

    monkeypatch.setattr(evaluation, "_default_loader", spy)
    res = run(
        tiny_prm_pair[0],
        "--data",
        data["a"],
        "-o",
        tmp_path / "o",
        "--no-plots",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    assert seen == [("bfloat16", "cpu", "torch.bfloat16", "cpu")]
    # From the config file too, under the eval section.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  dtype: float32\n  device: cpu\n", encoding="utf-8")
    res = run(tiny_prm_pair[0], "--data", data["a"], "-o", tmp_path / "o2", "--no-plots", "--config", cfg)
    assert res.exit_code == 0, res.stderr
    assert seen[-1] == ("float32", "cpu", "torch.float32", "cpu")


@pytest.mark.slow
def test_overrides_of_recorded_tokenization_are_honoured_with_a_warning_or_refused(train_tokenizer_dir, data, tmp_path):
    prm, twin = prm_twins(tmp_path, train_tokenizer_dir, {"max_prompt_length": 4}, {"max_prompt_length": None})

    def report(model, *args):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        res = run(model, "--data", data["a"], "-o", out, "--no-plots", *args)
        assert res.exit_code == 0, res.stderr
        return json.loads((out / "report.json").read_text()), res.stderr, (out / "report.md").read_text()

    trained, _, _ = report(prm)
    expected, _, _ = report(twin)
    assert trained["subsets"]["a"]["step"] != expected["subsets"]["a"]["step"]
    assert "differs_from_training" not in trained

    got, stderr, markdown = report(prm, "--set", "data.max_prompt_length=null")
    assert got["subsets"]["a"]["step"] == expected["subsets"]["a"]["step"]
    assert got["subsets"]["a"]["first_error"] == expected["subsets"]["a"]["first_error"]
    assert got["tokenization"]["max_prompt_length"] is None
    assert got["differs_from_training"] == {"max_prompt_length": {"trained": 4, "used": None}}
    assert "trained with data.max_prompt_length=4 (prmkit.json); scoring with null as asked" in stderr
    assert "**Not the trained tokenization:** `max_prompt_length` null (trained with 4)." in markdown

    res = run(prm, "--data", data["a"], "-o", tmp_path / "never", "--set", "data.train_on_last_step_only=true")
    assert res.exit_code == 2 and "data.train_on_last_step_only=true cannot apply to scoring" in res.stderr
    assert "Traceback" not in res.stderr


def test_mean_f1_says_it_covers_mixed_only(tiny_prm_pair, tmp_path):
    records = processbench_records(16, seed=1)
    onlycorrect = write_json(tmp_path / "onlycorrect.json", [r for r in records if r["label"] == -1])
    mixed = write_json(tmp_path / "mixed.json", records)
    out = tmp_path / "out"
    res = run(tiny_prm_pair[0], "--data", onlycorrect, "--data", mixed, "-o", out, "--no-plots")
    assert res.exit_code == 0, res.stderr
    written = json.loads((out / "report.json").read_text())
    assert written["subsets"]["onlycorrect"]["first_error"]["f1"] is None
    assert written["mean_f1"] == written["subsets"]["mixed"]["first_error"]["f1"] is not None
    assert (written["mean_f1_subsets"], list(written["mean_f1_left_out"])) == (["mixed"], ["onlycorrect"])
    stderr = " ".join(res.stderr.split())
    assert "mean_f1 covers mixed only; left out: onlycorrect (no erroneous samples (label != -1)" in stderr
    assert "over mixed only; left out: onlycorrect" in " ".join(res.stdout.split())
    assert "over mixed only; left out: onlycorrect" in (out / "report.md").read_text()


@pytest.mark.slow
def test_tuning_the_threshold_reuses_the_one_scoring_pass(tiny_prm_pair, data, tmp_path, monkeypatch):
    # Score once, then sweep: --tune-threshold must run exactly the forward passes of a fixed-threshold eval, score
    # every solution once, and reach the same scores (the figures at the tuned threshold come from them).
    import prmkit.evaluation.evaluate as evaluation

    real = evaluation._default_loader
    counts: list[dict] = []

    def counting(model, **kwargs):
        scorer = real(model, **kwargs)
        seen = {"forward": 0, "solutions": 0}
        counts.append(seen)
        scorer.model.register_forward_hook(lambda *_: seen.__setitem__("forward", seen["forward"] + 1))
        score_batch = scorer.score_batch

        def counted(items):
            seen["solutions"] += len(items)
            return score_batch(items)

        scorer.score_batch = counted
        return scorer

    monkeypatch.setattr(evaluation, "_default_loader", counting)
    fixed = run(
        tiny_prm_pair[0],
        "--data",
        data["a"],
        "--data",
        data["b"],
        "-o",
        tmp_path / "f",
        "--no-plots",
        "--threshold",
        "0.5",
    )
    tuned = run(
        tiny_prm_pair[0],
        "--data",
        data["a"],
        "--data",
        data["b"],
        "-o",
        tmp_path / "t",
        "--no-plots",
        "--tune-threshold",
        "a",
    )
    assert fixed.exit_code == 0 and tuned.exit_code == 0, fixed.stderr + tuned.stderr
    assert len(counts) == 2 and counts[0] == counts[1]
    assert counts[1]["solutions"] == 16 + 7 and counts[1]["forward"] > 0
    fixed_rep = json.loads((tmp_path / "f" / "report.json").read_text())
    tuned_rep = json.loads((tmp_path / "t" / "report.json").read_text())
    assert tuned_rep["threshold_source"].startswith("tuned on a")
    # Threshold-free figures are the same, so the scores were.
    assert tuned_rep["subsets"]["a"]["step"]["auroc"] == fixed_rep["subsets"]["a"]["step"]["auroc"]
    assert tuned_rep["subsets"]["b"]["step"]["log_loss"] == fixed_rep["subsets"]["b"]["step"]["log_loss"]


def test_a_full_disk_leaves_the_previous_report_whole(tiny_prm_pair, data, tmp_path, monkeypatch):
    import errno

    import prmkit.evaluation.plots

    def files(directory: Path) -> dict[str, bytes]:
        return {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
        }

    def full(path, data):  # the disk fills up while the plots are written, after report.json and report.md
        path = Path(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent / f".{path.name}.1@host.ab12cd34.tmp"))

    model = tiny_prm_pair[0]
    out = tmp_path / "out"
    assert run(model, "--data", data["a"], "-o", out, "--threshold", "0.2").exit_code == 0
    before = files(out)
    assert {"report.json", "report.md", "accuracy_by_position.png"} <= set(before)

    # A directory holding only the report is swapped whole; one holding the user's files too gets the new files once
    # every one is written. Either way the previous report stays as it was, and nothing temporary is left.
    for extra in ([], ["--overwrite"]):
        if extra:
            (out / "notes.txt").write_text("keep me")
            before = files(out)
        with monkeypatch.context() as m:
            m.setattr(prmkit.evaluation.plots, "write_atomic", full)
            res = run(model, "--data", data["b"], "-o", out, "--threshold", "0.6", *extra)
        assert res.exit_code == 1, res.output
        assert files(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.glob(".*"))
        assert f"error: {tmp_path if not extra else out}: cannot write here: no space left on device" in res.stderr
        assert "hint: free some space or write somewhere else, then run the same command again\n" in res.stderr

    # With room again, the new set replaces the old one whole: no plot of the previous run is left beside it.
    res = run(model, "--data", data["b"], "-o", out, "--no-plots", "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(files(out)) == ["notes.txt", "report.json", "report.md"]
    assert list(json.loads((out / "report.json").read_text())["subsets"]) == ["b"]
    assert (out / "notes.txt").read_text() == "keep me"
