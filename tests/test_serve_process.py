"""`prmkit serve` as a real process (uvicorn): /health 503 while the model loads then 200, and SIGTERM drains (the
request in flight finishes, a new one gets 503, the process exits 0 within serve.drain_s). Also the one-line error
for a missing serve extra."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_tiny_prm

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-prmkit-process-test-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int | None, dict | str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return None, ""


@pytest.mark.slow
def test_a_served_process_is_unhealthy_while_loading_and_drains_on_sigterm(tmp_path, train_tokenizer_dir):
    prm = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=2)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # One torch thread: on a machine shared with other work, OpenMP threads waiting on each other slow a tiny model's
    # forward passes a hundredfold, and the timings here would depend on the neighbours.
    env = {**os.environ, "PRMKIT_API_KEY": KEY, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    drain_s = 20
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prmkit",
            "serve",
            str(prm),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--set",
            f"serve.drain_s={drain_s}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen = []
        deadline = time.monotonic() + 120
        while not seen or seen[-1] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else seen
            status, _ = _call(base + "/health", timeout=5)
            if status is not None:
                seen.append(status)
            time.sleep(0.02)
        assert 503 in seen, seen  # answering before the model (and torch) are loaded

        # A request long enough to be in flight when SIGTERM comes.
        steps = ["The first equation is 3p + e = 124, and the second equation is 5p + e = 182."] * 3
        big = {"items": [{"prompt": f"Problem {i}: what is {i} + {i}?", "steps": steps} for i in range(4000)]}
        answer: dict = {}
        worker = threading.Thread(
            target=lambda: answer.update(zip(("status", "body"), _call(base + "/v1/score", big), strict=True))
        )
        worker.start()
        while True:
            _, metrics = _call(base + "/metrics")
            busy = [line for line in metrics.splitlines() if line.startswith("prmkit_requests_in_flight ")]
            if busy and float(busy[0].split()[1]) >= 2:  # the big one and this one
                break
            assert worker.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        time.sleep(0.2)
        status, body = _call(base + "/v1/score", {"items": [{"prompt": "a", "steps": ["b"]}]})
        assert worker.is_alive(), "the request in flight ended before the drain could be seen"
        assert status == 503 and "shutting down" in body["error"]["message"]
        assert _call(base + "/health")[0] == 503
        worker.join(60)
        assert answer["status"] == 200 and len(answer["body"]["items"]) == 4000
        assert proc.wait(timeout=drain_s + 5) == 0
        assert time.monotonic() - stopped < drain_s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.stdout.read(), proc.stderr.read()
    assert KEY not in out + err
    assert "draining" in err and "listening on http://127.0.0.1" in err and "Traceback" not in err


def test_a_missing_serve_extra_is_one_line_naming_the_install_command(tmp_path):
    probe = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from prmkit.cli.app import main\nsys.argv = ['prmkit', 'serve', 'some-model']\nmain()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'prmkit[serve]'" in lines[0] and "fastapi" in lines[0], proc.stderr


def test_a_public_address_without_a_key_is_warned_and_a_taken_port_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prmkit.cli.app import app

    monkeypatch.delenv("PRMKIT_API_KEY", raising=False)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tmp_path), "--host", "0.0.0.0", "--port", str(port)])
    assert result.exit_code == 2
    assert "without an API key" in result.output and f"cannot listen on 0.0.0.0:{port}" in result.output
