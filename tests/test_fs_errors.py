"""File-system failures (read-only output, full disk, damaged JSON) are one line and a hint, never a traceback.

Tests run as root on CI, where a chmod'ed directory stays writable, so a read-only directory and a full disk are
simulated at the system-call boundary (os.mkdir, os.open, open) for paths inside one directory.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_prm, write_train_rows
from typer.testing import CliRunner

from prmkit.cli.app import app

runner = CliRunner()

ROWS = [
    {
        "prompt": "Which number is larger, 9.8 or 9.11?",
        "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
        "labels": [True, False],
    },
    {"prompt": "So the answer is 42.", "completions": ["We check: 6 * 7 = 42."], "labels": [True]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def refuse_writes_under(monkeypatch, root: Path, code: int) -> None:
    """Make creating or writing anything inside ``root`` fail with ``code``, as a read-only or full disk would."""
    root = os.path.abspath(root)
    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open

    def inside(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(root + os.sep)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path, *args, **kwargs):
        if inside(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def assert_one_line(result, *expected: str) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "code, what, hint",
    [
        (errno.EACCES, "permission denied", "check the permissions"),
        (errno.EROFS, "read-only file system", "write somewhere else"),
        (errno.ENOSPC, "no space left on device", "free some space"),
        (errno.EDQUOT, "disk quota exceeded", "free some space"),
    ],
)
def test_os_errors_are_described_with_path_and_hint(code, what, hint):
    from prmkit.cli._errors import describe_os_error

    message, given = describe_os_error(OSError(code, os.strerror(code), "/data/out.jsonl"))
    assert message == f"/data/out.jsonl: {what}" and hint in given
    # prmkit's hidden temporary names are replaced by the directory they were going into.
    message, _ = describe_os_error(OSError(code, os.strerror(code), "/data/.out.123@host.ab12.tmp"))
    assert message == f"/data: cannot write here: {what}"
    message, _ = describe_os_error(OSError(code, os.strerror(code), "./.out.123@host.ab12.tmp"))
    assert message == f"{os.getcwd()}: cannot write here: {what}"
    # A failed write() names no file.
    assert describe_os_error(OSError(code, os.strerror(code)))[0] == what


@pytest.mark.parametrize(
    "command, again",
    [
        ("prepare", ""),
        ("evaluate", ""),
        ("push", ""),
        ("score", "; it resumes where it stopped"),
        ("train", " with --resume in place of any --overwrite, to continue from the last complete checkpoint"),
    ],
)
def test_a_full_disk_hint_says_what_running_again_does_for_that_command(command, again):
    from prmkit.cli._errors import describe_os_error

    for code in (errno.ENOSPC, errno.EDQUOT):
        _, hint = describe_os_error(OSError(code, os.strerror(code), "/data/out"), command)
        assert hint == "free some space or write somewhere else, then run the same command again" + again
    # A file in a directory a whole output is built in is named by where that output goes.
    message, _ = describe_os_error(OSError(errno.ENOSPC, "", "/data/.eval.7@host.ab12cd34.tmp/.report.md.7@host.x.tmp"))
    assert message == "/data: cannot write here: no space left on device"


@pytest.mark.parametrize(
    "command", [["prepare"], ["train"], ["eval"], ["score"], ["push"], ["config", "init"], ["config", "show"]]
)
def test_debug_is_accepted_after_every_subcommand(tmp_path, monkeypatch, command):
    from prmkit.errors import ConfigError

    monkeypatch.setenv("PRMKIT_DEBUG", "")  # restored after the test: --debug sets it for the rest of the process
    res = runner.invoke(app, [*command, "--debug", "--help"])
    assert res.exit_code == 0, res.output
    if command == ["config", "show"]:  # and it does what it does before the subcommand: the traceback is shown
        missing = ["config", "show", "-c", str(tmp_path / "missing.yaml")]
        res = runner.invoke(app, missing)
        assert res.exit_code == 2 and "config file not found" in res.stderr and "Traceback" not in res.output
        res = runner.invoke(app, [*missing, "--debug"])
        assert isinstance(res.exception, ConfigError)


def test_prepare_into_a_read_only_directory(tmp_path, monkeypatch, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_writes_under(monkeypatch, ro, errno.EROFS)
    res = runner.invoke(
        app, ["prepare", "--train", str(src), "--tokenizer", str(tiny_tokenizer_dir), "-o", str(ro / "out")]
    )
    assert_one_line(res, f"{ro}: cannot write here: read-only file system")
    assert "detected format" not in res.stderr  # refused before any row was read or tokenized
    monkeypatch.undo()
    assert list(ro.iterdir()) == []


def test_prepare_on_a_full_disk_keeps_the_old_output_and_leaves_nothing(tmp_path, monkeypatch, tiny_tokenizer_dir):
    import datasets

    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    args = ["prepare", "--train", str(src), "--tokenizer", str(tiny_tokenizer_dir), "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def full(self, path, *a, **k):
        Path(path, "partial.arrow").mkdir(parents=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", full)
    res = runner.invoke(app, [*args, "--set", "data.max_length=512"])
    assert_one_line(res, "error: no space left on device", "hint: free some space or write somewhere else")
    assert "resume" not in res.stderr  # prepare starts over; only score resumes
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # old output intact, no temp dir
    assert datasets.load_from_disk(str(out))["train"].num_rows == 2


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("fs-errors") / "prm", train_tokenizer_dir, seed=3)


def test_score_into_a_read_only_directory(tmp_path, monkeypatch, prm_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_writes_under(monkeypatch, ro, errno.EACCES)
    res = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(ro / "scored.jsonl")])
    assert_one_line(res, f"error: {ro}", "permission denied", "hint: check the permissions there")


def test_score_on_a_full_disk_then_resumes_to_the_same_bytes(tmp_path, monkeypatch, prm_dir):
    import prmkit.scoring.resumable as resumable  # the module that opens the partial output

    rows = [{"prompt": f"Q{i}: {r['prompt']}", "completions": r["completions"]} for i, r in enumerate(ROWS * 6)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    whole = tmp_path / "whole.jsonl"
    assert (
        runner.invoke(
            app, ["score", str(prm_dir), str(src), "-o", str(whole), "--set", "score.sort_window=4"]
        ).exit_code
        == 0
    )

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".partial") and "b" in mode:
            budget = [1500]
            write = fh.write

            def limited(data):
                budget[0] -= len(data)
                if budget[0] < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return write(data)

            fh.write = limited
        return fh

    out = tmp_path / "scored.jsonl"
    monkeypatch.setattr(resumable, "open", open_, raising=False)
    res = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out), "--set", "score.sort_window=4"])
    assert_one_line(res, "error: no space left on device", "run the same command again")
    assert not out.exists() and out.with_name(out.name + ".partial").exists()
    monkeypatch.undo()
    again = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(out), "--set", "score.sort_window=4"])
    assert again.exit_code == 0, again.output
    assert "resuming" in again.stderr
    assert out.read_bytes() == whole.read_bytes()


def test_train_into_a_read_only_directory(tmp_path, monkeypatch, tiny_qwen2_config_dir):
    rows = write_train_rows(tmp_path / "rows.jsonl", n=6)
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_writes_under(monkeypatch, ro, errno.EROFS)
    res = runner.invoke(
        app,
        [
            "train",
            "-m",
            str(tiny_qwen2_config_dir),
            "--train",
            str(rows),
            "-o",
            str(ro / "run"),
            "--set",
            "model.init_from_config=true",
            "--max-steps",
            "1",
        ],
    )
    assert_one_line(res, f"error: {ro}", "read-only file system", "hint: write somewhere else")


def test_damaged_prmkit_json_names_the_file(tmp_path, prm_dir):
    import shutil

    model = tmp_path / "prm"
    shutil.copytree(prm_dir, model)
    (model / "prmkit.json").write_text('{"tokenization": {"step_separator": "\\n",', encoding="utf-8")
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    res = runner.invoke(app, ["score", str(model), str(src), "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 2, res.output
    assert (
        f"{model / 'prmkit.json'}: malformed JSON (Expecting property name enclosed in double quotes at line 1"
        in res.stderr
    )
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_subprocess_real_not_a_directory_and_debug_traceback(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "afile").write_text("not a directory")
    cmd = [
        sys.executable,
        "-m",
        "prmkit",
        "prepare",
        "--train",
        str(src),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "-o",
        str(tmp_path / "afile" / "out"),
    ]
    env = {**os.environ, "PRMKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"error: {tmp_path / 'afile'}: already exists" in proc.stderr and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [cmd[0], "-m", "prmkit", "--debug", *cmd[3:]], capture_output=True, text=True, timeout=120, env=env
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FileExistsError" in debug.stderr


@pytest.mark.slow
def test_score_to_a_closed_pipe_is_one_line(tmp_path, prm_dir):
    rows = [{"prompt": f"Q{i}: {r['prompt']}", "completions": r["completions"]} for i, r in enumerate(ROWS * 40)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), str(src), "-o", "-", "--set", "score.sort_window=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    _, err = proc.communicate(timeout=300)
    assert json.loads(first)["step_scores"]
    err = err.decode()
    assert proc.returncode == 1, err
    assert "error: the output pipe was closed before everything was written" in err
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ({"max_length": -5}, "tokenization.max_length: -5 is out of range; expected in [1, 2147483647]"),
        # was: an OverflowError traceback from numpy while truncating
        (
            {"max_length": 10**30},
            "tokenization.max_length: 1000000000000000000000000000000 is out of range; expected in",
        ),
        ({"max_prompt_length": "lots"}, "tokenization.max_prompt_length: expected an integer or null, got 'lots'"),
    ],
)
def test_limits_recorded_in_prmkit_json_are_range_checked(tmp_path, prm_dir, recorded, expected):
    import shutil

    model = tmp_path / "prm"
    shutil.copytree(prm_dir, model)
    meta = json.loads((model / "prmkit.json").read_text())
    meta["tokenization"].update(recorded)
    (model / "prmkit.json").write_text(json.dumps(meta))
    res = runner.invoke(
        app, ["score", str(model), str(write_jsonl(tmp_path / "in.jsonl", ROWS)), "-o", str(tmp_path / "o.jsonl")]
    )
    assert res.exit_code == 2, res.output
    assert f"{model / 'prmkit.json'}: {expected}" in res.stderr and "Traceback" not in res.output
