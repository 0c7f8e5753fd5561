"""`prmkit score` after an interruption: leftovers are cleaned up, and a resume batches as the first run did.

The interruptions are real: a child process kills itself with SIGKILL while it writes its state file (after the
temporary file is written, before it is renamed), which leaves exactly what a kill -9 at that moment leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.scoring import output_paths

runner = CliRunner()

KILL_AT_STATE_WRITE = """
import os, signal, sys
at, seen = int(os.environ["KILL_AT_STATE_WRITE"]), [0]
real = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".prmkit-state.json"):
        seen[0] += 1
        if seen[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from prmkit.cli.app import main
sys.argv[0] = "prmkit"
main()
"""


def rows(n: int) -> list[dict]:
    return [
        {
            "id": i,
            "prompt": f"Q{i}: what is {i} + {i}?",
            "completions": [f"{i} + {i} = {2 * i}.", "So the answer is " + str(2 * i) + "."][: 1 + i % 2],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def killed_run(args: list[str], at: int, stdin: str | None = None) -> None:
    env = {**os.environ, "KILL_AT_STATE_WRITE": str(at)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_STATE_WRITE, "score", *args],
        input=stdin,
        text=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == -9, proc.stderr


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("score-resume") / "prm", train_tokenizer_dir, seed=5)


@pytest.mark.slow
def test_resume_refuses_other_batch_settings_and_cleans_state_temp_files(tmp_path, prm_dir):
    src = write_jsonl(tmp_path / "in.jsonl", rows(24))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    settings = ["--batch-tokens", "64", "--set", "score.sort_window=4"]
    assert runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(ref), *settings]).exit_code == 0

    killed_run([str(prm_dir), str(src), "-o", str(out), *settings], at=3)
    state_file = output_paths(out)["state"]
    assert json.loads(state_file.read_text())["progress"]["input_line"] == 4  # one window committed
    assert len(temp_files(tmp_path)) == 1 and temp_files(tmp_path)[0].startswith(f".{state_file.name}.")

    for other, changed in (
        (["--batch-tokens", "128", "--set", "score.sort_window=4"], "batch_tokens: 64, now 128"),
        (["--batch-tokens", "64", "--set", "score.sort_window=8"], "sort_window: 4, now 8"),
    ):
        res = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out), *other])
        assert res.exit_code == 2, res.output
        assert f"{out}: refusing to continue it: it was written with other settings ({changed})" in res.stderr
        assert "hint: run with the settings it was started with" in res.stderr
        assert temp_files(tmp_path) == []  # the killed run's temporary state file went on the next run

    res = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out), *settings])
    assert res.exit_code == 0, res.output
    assert "resumed after line 4" in res.stderr
    assert out.read_bytes() == ref.read_bytes()
    state = json.loads(state_file.read_text())
    assert {k: state["settings"][k] for k in ("batch_tokens", "sort_window", "processes", "device", "packing")} == {
        "batch_tokens": 64,
        "sort_window": 4,
        "processes": 1,
        "device": "cpu",
        "packing": False,
    }


@pytest.mark.slow
def test_an_interrupted_stdin_run_does_not_block_the_next(tmp_path, prm_dir):
    lines = "".join(json.dumps(r) + "\n" for r in rows(12))
    out = tmp_path / "out.jsonl"
    paths = output_paths(out)
    killed_run([str(prm_dir), "-", "-o", str(out), "--set", "score.sort_window=4"], at=3, stdin=lines)
    assert paths["partial"].exists() and paths["state"].exists() and temp_files(tmp_path)

    res = runner.invoke(app, ["score", str(prm_dir), "-", "-o", str(out), "--set", "score.sort_window=4"], input=lines)
    assert res.exit_code == 0, res.output
    assert (
        f"{out}: an earlier run read stdin and was interrupted; it cannot be continued; removed "
        f"{paths['partial'].name}, {paths['state'].name}"
    ) in res.stderr
    assert "removed 1 temporary file left beside" in res.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(12))
    assert temp_files(tmp_path) == [] and not paths["partial"].exists()


def test_a_failed_stdin_run_leaves_nothing_behind(tmp_path, prm_dir):
    good = "".join(json.dumps(r) + "\n" for r in rows(9))
    out = tmp_path / "out.jsonl"
    paths = output_paths(out)
    res = runner.invoke(
        app, ["score", str(prm_dir), "-", "-o", str(out), "--set", "score.sort_window=4"], input=good + "{not json\n"
    )
    assert res.exit_code == 2, res.output
    assert "<stdin>: line 10: row: malformed JSON" in res.stderr
    assert "scoring stdin cannot be resumed" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    again = runner.invoke(app, ["score", str(prm_dir), "-", "-o", str(out), "--set", "score.sort_window=4"], input=good)
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 9 and json.loads(paths["state"].read_text())["status"] == "complete"


def test_every_atomic_write_removes_what_a_killed_writer_of_that_file_left(tmp_path):
    from prmkit.core.atomic import _HOST, TEMP_SUFFIX, write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".summary.json.{pid}@{_HOST}.x1y2{TEMP_SUFFIX}"
    other = tmp_path / f".report.md.{pid}@{_HOST}.x1y2{TEMP_SUFFIX}"
    live = tmp_path / f".summary.json.{os.getpid()}@{_HOST}.z3{TEMP_SUFFIX}"
    for p in (stale, other, live):
        p.write_text("half")
    write_atomic(tmp_path / "summary.json", "{}")
    assert (tmp_path / "summary.json").read_text() == "{}"
    assert not stale.exists() and other.exists() and live.exists()  # only this file's, only dead writers'
