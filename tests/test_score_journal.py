"""`prmkit score` keeps the work of an interrupted window: finished batches go to a journal and are replayed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from test_score_cli import make_rows, write_jsonl

from prmkit.scoring import StepScorer, output_paths, score_file
from prmkit.scoring.resume import BatchJournal, journal_path


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("score-resume") / "prm", train_tokenizer_dir, seed=11)


@pytest.fixture(scope="module")
def small_batches(prm_dir) -> StepScorer:
    # A small budget gives many batches per window, as a big model on a CPU does with the default one.
    return StepScorer.from_pretrained(prm_dir, batch_tokens=96)


def stopped_run(
    monkeypatch, n: int, scorer: StepScorer, src: Path, out: Path, window: list[int] | None = None, **kwargs
) -> None:
    """Score until the journal's n-th record (of ``window``, if given), then stop: a kill between two batches."""
    original = BatchJournal.record
    seen = []

    def record(self, index, targets, scores):
        original(self, index, targets, scores)
        if window is None or self.header["window"] == window:
            seen.append(index)
            if len(seen) == n:
                raise Crash

    with monkeypatch.context() as m:
        m.setattr(BatchJournal, "record", record)
        with pytest.raises(Crash):
            score_file(scorer, str(src), str(out), **kwargs)


@pytest.mark.slow
def test_a_run_stopped_mid_window_reuses_its_batches_and_ends_byte_identical(tmp_path, small_batches, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(24, seed=21))
    ref = tmp_path / "ref.jsonl"
    ref_batches: list[int] = []
    score_file(small_batches, str(src), str(ref), on_steps=ref_batches.append)
    assert len(ref_batches) >= 8, "too few batches to interrupt in the middle"

    out = tmp_path / "out.jsonl"
    paths = output_paths(out)
    stopped_run(monkeypatch, 5, small_batches, src, out)
    state = json.loads(paths["state"].read_text())
    # One window holds the whole input: no output line is committed yet, the five batches are in the journal.
    assert state["status"] == "running" and state["progress"]["input_line"] == 0
    journal = journal_path(paths, 0).read_text().splitlines()
    assert len(journal) == 1 + 5 and json.loads(journal[0])["window"] == [1, 24]
    # What kill -9 in the middle of the sixth record leaves behind.
    with open(journal_path(paths, 0), "a") as fh:
        fh.write('{"batch": 5, "targets": "ab')

    run_batches: list[int] = []
    summary = score_file(small_batches, str(src), str(out), on_steps=run_batches.append)
    assert summary.batches_reused == 5
    assert len(run_batches) == len(ref_batches) - 5
    assert out.read_bytes() == ref.read_bytes()
    assert not journal_path(paths, 0).exists() and not paths["partial"].exists()


@pytest.mark.slow
def test_a_journal_left_without_its_state_is_not_replayed(tmp_path, tiny_prm_pair, small_batches, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(20, seed=25))
    out = tmp_path / "out.jsonl"
    paths = output_paths(out)
    stopped_run(monkeypatch, 4, small_batches, src, out)
    paths["state"].unlink()
    paths["partial"].unlink()
    # Another model with the same tokenizer and separator plans the very same batches; its scores must be its own.
    other = StepScorer.from_pretrained(tiny_prm_pair[0], batch_tokens=96)
    summary = score_file(other, str(src), str(out))
    assert summary.batches_reused == 0
    ref = tmp_path / "ref.jsonl"
    score_file(other, str(src), str(ref))
    assert out.read_bytes() == ref.read_bytes()


def test_stderr_says_where_the_partial_output_is(tmp_path, prm_dir):
    from typer.testing import CliRunner

    from prmkit.cli.app import app

    src = write_jsonl(tmp_path / "in.jsonl", make_rows(3, seed=26))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["score", str(prm_dir), str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    said = res.stderr.replace("\n", "")
    assert f"writing {out}.partial, renamed to out.jsonl when complete" in said
    assert "run the same command again to resume" in said


def test_a_batch_whose_targets_differ_is_run_again(tmp_path):
    journal = BatchJournal(tmp_path / "j", {"window": [1, 2]})
    journal.record(0, [(0, 0, 5), (0, 1, 9)], [0.25, 0.75])
    journal.close()
    again = BatchJournal(tmp_path / "j", {"window": [1, 2]})
    assert again.replay(0, [(0, 0, 5), (0, 1, 9)]) == [0.25, 0.75]
    assert again.replay(0, [(0, 0, 5), (0, 1, 10)]) is None
    assert again.replay(1, [(1, 0, 3)]) is None
    assert BatchJournal(tmp_path / "j", {"window": [3, 4]}).done == {}


def test_windows_already_committed_and_the_journal_combine(tmp_path, small_batches, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(24, seed=23))
    ref = tmp_path / "ref.jsonl"
    score_file(small_batches, str(src), str(ref), sort_window=10)
    out = tmp_path / "out.jsonl"
    stopped_run(monkeypatch, 2, small_batches, src, out, window=[11, 20], sort_window=10)
    state = json.loads(output_paths(out)["state"].read_text())
    assert state["progress"]["input_line"] == 10  # the first window is committed, the second is in the journal
    summary = score_file(small_batches, str(src), str(out), sort_window=10)
    assert summary.resumed_at_line == 10 and summary.batches_reused == 2
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_kill_9_in_the_first_window_loses_at_most_a_batch(tmp_path, prm_dir):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(160, seed=24))
    args = ["score", str(prm_dir), str(src), "--batch-tokens", "96"]
    ref = tmp_path / "ref.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "prmkit", *args, "-o", str(ref)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "prmkit", *args, "-o", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    journal = journal_path(output_paths(out), 0)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal.exists() and journal.read_bytes().count(b"\n") >= 6, "killed too late to test"
    assert f"writing {out}.partial" in log.read_text().replace("\n", "")

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "batches reused from the interrupted run" in rerun.stderr
    assert out.read_bytes() == ref.read_bytes()
