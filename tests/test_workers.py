"""Tokenizing workers end with their parent, however it ends (issue #24).

`prepare` (and train's tokenization) splits text in forked worker processes from 8,192 rows on. A parent stopped by
SIGTERM, SIGHUP or kill -9 used to leave them reparented to PID 1, blocked forever on their task queue; Ctrl-C left
the parent waiting for their tasks. Here the workers' tasks are made to take minutes, so each signal arrives while
they are busy, and every worker must be gone within seconds of the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_train_rows

# The real CLI, with each worker's task made slow (a function of __main__, which the forked workers share).
SLOW_WORKERS = """
import sys, time
import prmkit.tokenization as tokenization
real_split = tokenization._worker_split
def slow_split(texts):
    time.sleep(300)
    return real_split(texts)
tokenization._worker_split = slow_split
from prmkit.cli.app import main
sys.argv = ["prmkit", *sys.argv[1:]]
main()
"""


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state, ppid = _stat(int(entry))
            if ppid == pid and state not in (None, "Z"):
                found.append(int(entry))
    return found


def _stat(pid: int) -> tuple[str | None, int | None]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None, None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    return _stat(pid)[0] not in (None, "Z")


def _default_signals() -> None:
    # Under nohup (SIGHUP ignored) or as a shell's background job (SIGINT ignored) the child would inherit the
    # ignoring, and the signal under test would do nothing: a user's terminal delivers them.
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGHUP else signal.default_int_handler)


def _start(tmp_path: Path, command: list[str]) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRMKIT_CACHE": str(tmp_path / "cache")}
    # A session of its own: the signal goes to the parent alone, as a scheduler's or `kill PID` does.
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKERS, *command],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_default_signals,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = children(proc.pid)
        if len(workers) >= 2:
            time.sleep(0.5)  # the tasks are submitted and the workers busy with them
            return proc, children(proc.pid)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no worker processes appeared: {proc.communicate()[1].decode()[-2000:]}")


def _check_workers_end_with_parent(proc: subprocess.Popen, workers: list[int], sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the parent did not end within 30 s of signal {sig}") from None
        assert code == (-sig if sig != signal.SIGINT else 130), proc.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.05)
        survivors = [pid for pid in workers if alive(pid)]
        assert not survivors, f"workers {survivors} outlived their parent (signal {sig})"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_train_rows(tmp_path_factory.mktemp("workers") / "rows.jsonl", n=8_400)  # the pool's threshold: 8,192


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"],
)
def test_prepare_workers_end_with_their_parent(tmp_path, rows, train_tokenizer_dir, sig):
    proc, workers = _start(
        tmp_path,
        ["prepare", "--train", str(rows), "--tokenizer", str(train_tokenizer_dir), "-o", str(tmp_path / "out")],
    )
    assert len(workers) >= 2
    _check_workers_end_with_parent(proc, workers, sig)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_tokenizing_workers_end_with_their_parent(tmp_path, rows, tiny_qwen2_config_dir):
    proc, workers = _start(
        tmp_path,
        [
            "train",
            "--model",
            str(tiny_qwen2_config_dir),
            "--set",
            "model.init_from_config=true",
            "--train",
            str(rows),
            "-o",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
        ],
    )
    _check_workers_end_with_parent(proc, workers, signal.SIGTERM)


def test_a_worker_ends_soon_after_its_parent_even_without_the_kernel_telling_it(tmp_path):
    """The portable half: the watchdog alone (no PR_SET_PDEATHSIG) ends a worker whose parent died."""
    code = (
        "import os, sys, time\n"
        "from prmkit.core.workers import die_with_parent\n"
        "parent = os.getpid()\n"
        "if os.fork() == 0:\n"
        "    die_with_parent(parent, pdeathsig=False)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "os._exit(0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True
    )
    deadline = time.monotonic() + 10
    worker = None
    while worker is None and time.monotonic() < deadline:
        found = children(proc.pid)
        worker = found[0] if found else None
    proc.wait(timeout=10)
    try:
        assert worker is not None
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(worker)
    finally:
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)
