"""bench/gpu_score.py runs on the GPU machine only when one is lent; its tiny CPU mode keeps it from rotting here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_score_benchmark_runs_in_its_tiny_cpu_mode(tmp_path):
    out = tmp_path / "gpu-score-tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_score.py"),
            "--tiny",
            "--rows",
            "6",
            "--recipe-seconds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "tiny-cpu" and result["data"]["rows"] == 6
    assert {k: v["ok"] for k, v in result["stages"].items()} == {
        "environment": True,
        "model": True,
        "recipe": True,
        "prmkit_defaults": True,
        "prmkit_padded": True,
        "prmkit_packed_varlen": True,
        "startup_profile": True,
        "bare_limit": True,
    }
    runs = result["prmkit"]
    assert runs["defaults"]["packing"] is None and runs["packed_varlen"]["packing"] == "prmkit_varlen"
    for run in runs.values():
        assert run["steps"] == result["data"]["steps"] and run["device"] == "cpu"
        assert set(run["timings"]) == {"startup", "model_load", "tokenize", "forward", "write"}
        assert run["outside_forward_and_io_seconds"] > 0
    # The engine's scores are the bare forward passes' (float32), and padded defaults are padded batches.
    agreement = result["agreement_max_abs_diff"]
    assert agreement["defaults_vs_padded"] == 0.0
    assert agreement["defaults_vs_bare_limit"] < 1e-5 and agreement["packed_varlen_vs_bare_limit"] < 1e-5
    assert set(result["bare_limit"]["by_budget"]) == {"1024", "2048"}
    assert result["bare_limit"]["best"]["best_budget"] in (1024, 2048)
    assert "engine_share_of_best_limit" in result["summary"] and "| prmkit defaults |" in proc.stdout
    imports = {name: seconds for name, _, seconds in result["startup_profile"]["top_imports_seconds"]}
    torch_seconds = result["startup_profile"]["torch_import_seconds"]
    assert torch_seconds > 0 and result["startup_profile"]["imports_total_seconds"] >= torch_seconds
    assert imports.get("torch", torch_seconds) == torch_seconds
