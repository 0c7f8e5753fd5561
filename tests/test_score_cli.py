"""`prmkit score`: JSONL in, JSONL out; resumable, refuses what it must, streams, and splits across processes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT, make_tiny_prm, prm_twins
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.metrics import aggregate, first_error_index
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.scoring import StepScorer, output_paths, score_file
from prmkit.tokenization import TokenizationParams

runner = CliRunner()

WORDS = [
    "apples",
    "pears",
    "plus",
    "minus",
    "equals",
    "twice",
    "half",
    "total",
    "left",
    "each",
    "so",
    "then",
    "we",
    "have",
    "the",
    "answer",
    "is",
]


def make_rows(n: int, seed: int = 0, short: bool = False) -> list[dict]:
    """Distinct stepwise rows with fields before and after the scored ones; some without labels.

    ``short`` rows (about 30 tokens) keep the tests that need many lines fast.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if short:
            steps = [f"{rng.randint(0, 99)} {rng.choice(WORDS)}" for _ in range(rng.randint(1, 3))]
            prompt = f"Q{i}?"
        else:
            steps = [
                f"Step {k + 1}: {rng.randint(0, 99)} " + " ".join(rng.choices(WORDS, k=rng.randint(2, 9))) + "."
                for k in range(rng.randint(1, 6))
            ]
            prompt = f"Question {i}: what is {i} + {2 * i}?"
        row = {"id": i, "meta": {"source": "test", "n": i % 3}, "prompt": prompt, "completions": steps}
        if i % 2 == 0:
            row["labels"] = [True] * len(steps)
        row["z"] = [i]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def score_cli(*args):
    return runner.invoke(app, ["score", *map(str, args)])


def summary_of(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("score-cli") / "prm", train_tokenizer_dir, seed=7)


@pytest.fixture(scope="module")
def scorer(prm_dir) -> StepScorer:
    return StepScorer.from_pretrained(prm_dir)


@pytest.mark.slow
def test_each_line_gets_scores_aggregates_and_first_error(tmp_path, prm_dir, scorer):
    rows = make_rows(12)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    expected = [scorer.score(r["prompt"], r["completions"]) for r in rows]
    flat = sorted(s for scores in expected for s in scores)
    threshold = flat[len(flat) // 2]  # a threshold that splits this random model's scores
    config = tmp_path / "prmkit.yaml"
    config.write_text(f"score:\n  threshold: {threshold}\n  sort_window: 5\n", encoding="utf-8")
    res = score_cli(prm_dir, src, "-o", tmp_path / "out.jsonl", "--config", config, "--json")
    assert res.exit_code == 0, res.output
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(rows)
    for row, line, want in zip(rows, out, expected):
        # Every input field, unchanged and in its order, then prmkit's.
        assert list(line) == [*row, "step_scores", "aggregates", "first_error"]
        assert {k: line[k] for k in row} == row
        assert line["step_scores"] == pytest.approx(want, abs=1e-6)
        assert line["aggregates"] == pytest.approx(aggregate(line["step_scores"]))
        assert line["first_error"] == first_error_index(line["step_scores"], threshold)
    assert {line["first_error"] for line in out} - {-1}, "the threshold should make some first errors"
    assert -1 in {line["first_error"] for line in out} or threshold < min(flat) + 1e-9
    summary = summary_of(res)
    assert summary["lines_in"] == summary["lines_scored"] == summary["rows_out"] == 12
    assert summary["steps"] == sum(len(r["completions"]) for r in rows)
    assert summary["lines_rejected"] == 0 and summary["rejects"] is None
    state = json.loads(output_paths(tmp_path / "out.jsonl")["state"].read_text())
    assert state["status"] == "complete" and state["settings"]["threshold"] == threshold
    assert not output_paths(tmp_path / "out.jsonl")["partial"].exists()

    # The same command again: already complete, nothing rewritten.
    before = (tmp_path / "out.jsonl").read_bytes()
    again = score_cli(prm_dir, src, "-o", tmp_path / "out.jsonl", "--config", config, "--json")
    assert again.exit_code == 0, again.output
    assert summary_of(again)["already_complete"] and (tmp_path / "out.jsonl").read_bytes() == before


def test_truncated_steps_are_null_and_the_line_says_so(tmp_path, train_tokenizer_dir):
    from transformers import AutoTokenizer

    from prmkit.tokenization import encode_solutions

    rows = [
        {"prompt": "So the answer is 42.", "completions": ["We check: 6 * 7 = 42."]},
        {"prompt": "Which number is larger, 9.8 or 9.11?", "completions": ["11 is greater than 8."] * 12},
    ]
    model = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=8)
    encoded = encode_solutions(
        AutoTokenizer.from_pretrained(model),
        [r["prompt"] for r in rows],
        [r["completions"] for r in rows],
        TokenizationParams(),
    )
    room = encoded[1].step_positions[2] + 1  # the long row keeps three steps
    assert encoded[0].step_positions[-1] < room
    write_metadata(model, build_metadata(TokenizationParams(max_length=room), base_model=None))
    res = score_cli(model, write_jsonl(tmp_path / "in.jsonl", rows), "-o", tmp_path / "out.jsonl", "--json")
    assert res.exit_code == 0, res.output
    short, long = read_jsonl(tmp_path / "out.jsonl")
    assert "truncated" not in short and None not in short["step_scores"]
    assert long["truncated"] is True
    assert None not in long["step_scores"][:3] and long["step_scores"][3:] == [None] * 9
    assert long["aggregates"] == pytest.approx(aggregate(long["step_scores"]))  # over the scored steps only
    summary = summary_of(res)
    assert summary["rows_truncated"] == 1 and summary["steps_truncated"] == long["step_scores"].count(None)
    assert "max_length" in res.stderr


def test_processbench_records_are_scored_whole(tmp_path, prm_dir, scorer):
    records = json.loads((EXAMPLES / "processbench_gsm8k_sample.json").read_text())[:3]
    array = tmp_path / "gsm8k.json"  # ProcessBench's own layout: one JSON array
    array.write_text(json.dumps(records, indent=1), encoding="utf-8")
    res = score_cli(prm_dir, array, "-o", tmp_path / "pb.jsonl", "--json")
    assert res.exit_code == 0, res.output
    out = read_jsonl(tmp_path / "pb.jsonl")
    assert summary_of(res)["format"] == "processbench"
    for record, line in zip(records, out):
        assert {k: line[k] for k in record} == record
        assert line["step_scores"] == pytest.approx(scorer.score(record["problem"], record["steps"]), abs=1e-6)
    # The same records as JSONL, without labels: scoring does not need them.
    unlabelled = [{"problem": r["problem"], "steps": r["steps"]} for r in records]
    res = score_cli(prm_dir, write_jsonl(tmp_path / "pb.jsonl.in.jsonl", unlabelled), "-o", tmp_path / "pb2.jsonl")
    assert res.exit_code == 0, res.output
    for line, want in zip(read_jsonl(tmp_path / "pb2.jsonl"), out):
        assert list(line) == [
            "problem",
            "steps",
            "step_scores",
            "aggregates",
            "first_error",
            *("truncated",) * ("truncated" in want),
        ]
        assert line["step_scores"] == pytest.approx(want["step_scores"], abs=1e-6)


def test_bad_line_stops_with_its_number_and_skip_invalid_rejects_it(tmp_path, prm_dir):
    good = make_rows(6)
    text = (
        "".join(json.dumps(r) + "\n" for r in good[:2])
        + '{"prompt": "x", "completions": [\n'
        + json.dumps(good[2])
        + "\n"
        + json.dumps({"prompt": "y", "completions": ["ok", ""]})
        + "\n"
        + "".join(json.dumps(r) + "\n" for r in good[3:])
    )
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8")
    res = score_cli(prm_dir, src, "-o", tmp_path / "out.jsonl")
    assert res.exit_code == 2
    assert "line 3" in res.stderr and "malformed JSON" in res.stderr and "--skip-invalid" in res.stderr
    assert "Traceback" not in res.output

    res = score_cli(prm_dir, src, "-o", tmp_path / "out2.jsonl", "--skip-invalid", "--json")
    assert res.exit_code == 0, res.output
    summary = summary_of(res)
    assert summary["lines_in"] == 8 and summary["lines_rejected"] == 2 and summary["lines_scored"] == 6
    assert summary["lines_in"] == summary["lines_scored"] + summary["lines_rejected"]
    assert [line["id"] for line in read_jsonl(tmp_path / "out2.jsonl")] == [r["id"] for r in good]
    rejects = read_jsonl(Path(summary["rejects"]))
    assert [(r["line"], r["field"]) for r in rejects] == [(3, "row"), (5, "completions[1]")]
    assert rejects[1]["reason"] == "empty step" and rejects[1]["record"]["prompt"] == "y"


def test_existing_output_of_another_input_or_model_is_refused_and_overwrite_starts_over(
    tmp_path, prm_dir, train_tokenizer_dir
):
    a = write_jsonl(tmp_path / "a.jsonl", make_rows(4, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_rows(5, seed=2))
    out = tmp_path / "out.jsonl"
    assert score_cli(prm_dir, a, "-o", out).exit_code == 0
    first = out.read_bytes()

    res = score_cli(prm_dir, b, "-o", out)
    assert res.exit_code == 2 and "another input" in res.stderr and "--overwrite" in res.stderr
    other_model = make_tiny_prm(tmp_path / "other", train_tokenizer_dir, seed=9)
    res = score_cli(other_model, a, "-o", out)
    assert res.exit_code == 2 and "another model" in res.stderr
    res = score_cli(prm_dir, a, "-o", out, "--threshold", "0.9")
    assert res.exit_code == 2 and "threshold" in res.stderr
    assert out.read_bytes() == first

    assert score_cli(prm_dir, b, "-o", out, "--overwrite").exit_code == 0
    assert [line["id"] for line in read_jsonl(out)] == list(range(5))
    assert score_cli(prm_dir, b, "-o", tmp_path / "fresh.jsonl").exit_code == 0
    assert out.read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()

    # A file prmkit did not write is never replaced without --overwrite.
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    res = score_cli(prm_dir, a, "-o", mine)
    assert res.exit_code == 2 and mine.read_text() == "precious\n"


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_crash_with_a_half_written_line_is_byte_identical(tmp_path, prm_dir, scorer):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(20, seed=3))
    ref = tmp_path / "ref.jsonl"
    assert score_cli(prm_dir, src, "-o", ref, "--set", "score.sort_window=3").exit_code == 0

    out = tmp_path / "out.jsonl"
    windows = []

    def crash_after_two_windows(info):
        windows.append(info)
        if len(windows) == 2:
            raise Crash

    with pytest.raises(Crash):
        score_file(scorer, str(src), str(out), sort_window=3, on_progress=crash_after_two_windows)
    paths = output_paths(out)
    state = json.loads(paths["state"].read_text())
    assert state["status"] == "running" and state["progress"]["input_line"] == 6 and not out.exists()
    # What kill -9 in the middle of the next window leaves: lines past the commit, the last one cut short.
    with open(paths["partial"], "ab") as fh:
        fh.write(ref.read_bytes().splitlines(keepends=True)[6] + b'{"id": 7, "meta": {"sou')

    res = score_cli(prm_dir, src, "-o", out, "--set", "score.sort_window=3", "--json")
    assert res.exit_code == 0, res.output
    assert summary_of(res)["resumed_at_line"] == 6 and summary_of(res)["rows_out"] == 20
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, prm_dir):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(1000, seed=4, short=True))
    ref = tmp_path / "ref.jsonl"
    args = ["score", str(prm_dir), str(src), "--set", "score.sort_window=4"]
    assert runner.invoke(app, [*args, "-o", str(ref)]).exit_code == 0

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "prmkit", *args, "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = output_paths(out)["state"]
    deadline = time.time() + 60
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(state_file.read_text())["progress"]["input_line"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 40:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(state_file.read_text())
    assert state["status"] == "running" and 0 < state["progress"]["input_line"] < 1000, "killed too late to test"

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed after line" in rerun.stderr
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_subprocess_stdin_to_stdout(tmp_path, prm_dir):
    rows = make_rows(7, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert score_cli(prm_dir, src, "-o", tmp_path / "file.jsonl").exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), "-", "-o", "-"],
        input=src.read_text(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "file.jsonl").read_text()
    assert "scored 7 of 7 lines" in proc.stderr

    res = score_cli(prm_dir, src, "-o", "-", "--json")
    assert res.exit_code == 2 and "--json" in res.stderr


@pytest.mark.slow
def test_memory_does_not_grow_with_input_size(tmp_path, scorer):
    # Python-side peak while scoring 100 vs 1000 lines through a window of 8: the same, give or take.
    peaks = {}
    for n in (100, 1000):
        src = write_jsonl(tmp_path / f"in{n}.jsonl", make_rows(n, seed=6, short=True))
        tracemalloc.start()
        score_file(scorer, str(src), str(tmp_path / f"out{n}.jsonl"), sort_window=8)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(read_jsonl(tmp_path / f"out{n}.jsonl")) == n
    assert peaks[1000] < 1.5 * peaks[100], peaks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_in_input_order(tmp_path, prm_dir):
    rows = make_rows(40, seed=7)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert score_cli(prm_dir, src, "-o", tmp_path / "one.jsonl", "--set", "score.sort_window=16").exit_code == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "prmkit",
        "score",
        str(prm_dir),
        str(src),
        "-o",
        str(tmp_path / "two.jsonl"),
        "--set",
        "score.sort_window=16",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # one summary: process 0 speaks for both
    assert proc.stdout.count('"lines_in"') == 1 and summary["lines_in"] == 40
    assert not (tmp_path / ".two.jsonl.prmkit-lock").exists()  # taken by process 0 alone, and released
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [line["id"] for line in two] == [r["id"] for r in rows]
    for a, b in zip(one, two):
        assert b["step_scores"] == pytest.approx(a["step_scores"], abs=1e-6)


def test_formats_that_need_conversion_are_written_as_stepwise_rows(tmp_path, prm_dir):
    from prmkit.data.formats import Options, convert

    lines = (EXAMPLES / "prm800k_samples.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    src = tmp_path / "prm800k.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = [
        (n, row)
        for n, line in enumerate(lines, start=1)
        for row in convert("prm800k", json.loads(line), Options(is_eval=True))
    ]
    res = score_cli(prm_dir, src, "-o", tmp_path / "out.jsonl", "--json")
    assert res.exit_code == 0, res.output
    out = read_jsonl(tmp_path / "out.jsonl")
    summary = summary_of(res)
    assert summary["format"] == "prm800k" and summary["lines_in"] == 2 and summary["rows_out"] == len(expected)
    for (n, row), line in zip(expected, out):
        assert list(line)[:4] == ["prompt", "completions", "labels", "line"]
        assert line["line"] == n and line["completions"] == row["completions"] and line["labels"] == row["labels"]
        assert len(line["step_scores"]) == len(row["completions"])


def test_batch_budget_defaults_to_a_cpu_sized_one_and_does_not_change_scores(tmp_path, prm_dir):
    rows = make_rows(10, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    default = score_cli(prm_dir, src, "-o", tmp_path / "a.jsonl", "--json")
    assert default.exit_code == 0, default.output
    assert (summary_of(default)["batch_tokens"], summary_of(default)["device"]) == (2048, "cpu")
    small = score_cli(prm_dir, src, "-o", tmp_path / "b.jsonl", "--json", "--batch-tokens", "64")
    assert small.exit_code == 0, small.output
    assert summary_of(small)["batch_tokens"] == 64 and summary_of(small)["dtype"] == "float32"
    for a, b in zip(read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")):
        assert b["step_scores"] == pytest.approx(a["step_scores"], abs=1e-5)


@pytest.mark.slow
def test_overrides_of_recorded_tokenization_are_honoured_with_a_warning_or_refused(tmp_path, train_tokenizer_dir):
    # The model recorded max_prompt_length 4 at training; the twin records null. `--set data.max_prompt_length=null`
    # must score as the twin does, and say that it differs from training.
    prm, twin = prm_twins(tmp_path, train_tokenizer_dir, {"max_prompt_length": 4}, {"max_prompt_length": None})
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(6, seed=11))
    assert score_cli(prm, src, "-o", tmp_path / "trained.jsonl").exit_code == 0
    assert score_cli(twin, src, "-o", tmp_path / "twin.jsonl").exit_code == 0
    trained = [r["step_scores"] for r in read_jsonl(tmp_path / "trained.jsonl")]
    expected = [r["step_scores"] for r in read_jsonl(tmp_path / "twin.jsonl")]
    assert trained != expected  # the prompt limit matters for these rows

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "score",
            str(prm),
            str(src),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--set",
            "data.max_prompt_length=null",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["step_scores"] for r in read_jsonl(tmp_path / "o.jsonl")] == expected
    assert "trained with data.max_prompt_length=4 (prmkit.json); scoring with null as asked" in proc.stderr

    # The recorded value, set again, is no difference and draws no warning.
    res = score_cli(prm, src, "-o", tmp_path / "same.jsonl", "--set", "data.max_prompt_length=4")
    assert res.exit_code == 0 and "trained with" not in res.stderr
    assert [r["step_scores"] for r in read_jsonl(tmp_path / "same.jsonl")] == trained

    # max_length from a config file is honoured too: steps past 12 tokens get no score.
    cfg = tmp_path / "prmkit.yaml"
    cfg.write_text("data:\n  max_length: 12\n", encoding="utf-8")
    res = score_cli(prm, src, "-o", tmp_path / "short.jsonl", "-c", cfg)
    assert res.exit_code == 0, res.stderr
    assert "trained with data.max_length=1024 (prmkit.json); scoring with 12 as asked" in res.stderr
    assert all(r["truncated"] for r in read_jsonl(tmp_path / "short.jsonl"))

    # A key that cannot apply to scoring is refused in one line, before anything is written.
    res = score_cli(prm, src, "-o", tmp_path / "never.jsonl", "--set", "data.train_on_last_step_only=true")
    assert res.exit_code == 2 and "data.train_on_last_step_only=true cannot apply to scoring" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "never.jsonl").exists()
