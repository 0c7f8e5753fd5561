"""A model, tokenizer or dataset name that is neither a local path nor on the Hub is said at once, naming both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import HubServer
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.core.locate import locate, looks_like_path
from prmkit.errors import UsageError

runner = CliRunner()
ROWS = '{"prompt": "p", "completions": ["a", "b"], "labels": [true, false]}\n'


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once, as an unreachable Hub's would be slowly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch):
    from huggingface_hub import constants

    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return url


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = HubServer(token="hf_locate_test").start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setenv("HF_TOKEN", "hf_locate_test")
    yield server
    server.stop()


def test_what_can_only_be_a_path():
    for name in ("./runs/prm", "../prm", "/abs/prm", "~/prm", "runs/a/b", "runs\\prm", "runs/", "bad--name", ""):
        assert looks_like_path(name), name
    for name in ("runs/prm", "Qwen/Qwen2-0.5B", "gpt2", "my.model"):
        assert not looks_like_path(name), name


def test_existing_paths_are_taken_as_they_are(tmp_path, monkeypatch, unreachable_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "prm").mkdir(parents=True)
    assert locate("runs/prm", "model") == "runs/prm"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert locate("~/runs/prm", "model") == str(tmp_path / "runs" / "prm")


def test_a_missing_path_is_refused_without_asking_the_hub(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        locate("./runs/nothere", "model")
    assert err.value.message == f"model './runs/nothere': no such file or directory ({tmp_path / 'runs' / 'nothere'})"
    assert hub.requests == []


def test_a_name_in_neither_place_names_both(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    hub.add_repo("alice/prm")
    assert locate("alice/prm", "model") == "alice/prm"
    with pytest.raises(UsageError) as err:
        locate("runs/nothere", "tokenizer")
    assert "tried both a local path and the Hub" in err.value.message
    assert str(tmp_path / "runs" / "nothere") in err.value.message
    assert f"{hub.url} has no model repository 'runs/nothere'" in err.value.message
    assert "./runs/nothere" in err.value.hint


def test_an_unreachable_hub_is_asked_once_and_said(tmp_path, monkeypatch, unreachable_hub):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(UsageError) as err:
        locate("runs/nothere", "model")
    assert time.perf_counter() - started < 20  # one refused connection, not a minute of retries
    assert f"no {tmp_path / 'runs' / 'nothere'}, and {unreachable_hub} could not be reached" in err.value.message


def test_offline_the_hub_cache_decides(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--alice--prm" / "snapshots").mkdir(parents=True)
    assert locate("alice/prm", "model") == "alice/prm"
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set and the Hub cache has no copy of runs/prm"):
        locate("runs/prm", "model")
    assert locate("nobody/data", "dataset", repo_type="dataset") == "nobody/data"  # datasets has its own cache


@pytest.mark.parametrize(
    "what,args",
    [
        ("tokenizer", ["prepare", "-o", "out", "--train", "rows.jsonl", "--tokenizer", "runs/tok"]),
        ("dataset", ["prepare", "-o", "out", "--train", "runs/data", "--tokenizer", "TOKENIZER"]),
        ("model", ["train", "--model", "runs/base", "--train", "rows.jsonl", "-o", "out"]),
        ("tokenizer", ["train", "--tiny", "qwen2", "--tokenizer", "runs/tok", "--train", "rows.jsonl", "-o", "out"]),
        ("model", ["eval", "TOKENIZER", "runs/prm", "--data", "rows.jsonl", "-o", "out", "--no-plots"]),
        ("model", ["score", "runs/prm", "rows.jsonl", "-o", "out.jsonl"]),
    ],
)
def test_every_command_says_so_in_one_line(tmp_path, monkeypatch, unreachable_hub, tiny_tokenizer_dir, what, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(ROWS)
    args = [str(tiny_tokenizer_dir) if a == "TOKENIZER" else a for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    name = next(a for a in args if a.startswith("runs/"))
    assert f"{what} {name!r}: tried both a local path and the Hub: no {tmp_path / name}" in res.stderr
    assert "could not be reached" in res.stderr and "Traceback" not in res.output


def test_score_with_a_mistyped_path_returns_at_once_in_a_real_process(tmp_path):
    (tmp_path / "in.jsonl").write_text(ROWS)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", "runs/nothere", "in.jsonl", "-o", "out.jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert "tried both a local path and the Hub" in proc.stderr and "could not be reached" in proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr
    # Before, the Hub was retried for about 80 s; now one refused connection. Generous for a loaded machine.
    assert elapsed < 40, f"took {elapsed:.0f} s"
    assert not Path(tmp_path / "out.jsonl").exists()
