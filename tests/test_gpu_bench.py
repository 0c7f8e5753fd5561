"""bench/gpu_train.py's CPU-safe parts: arguments, the dry run's memory plan for the H200, the run commands and the
verdict arithmetic. The GPU runs themselves happen on the GPU machine (BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_shared

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_help_lists_the_modes():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--dry-run", "--tiny", "--runs", "--cap-gib", "--budget", "--timeout", "--out"):
        assert option in proc.stdout, option
    bad = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "prmkit-fastest"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown run 'prmkit-fastest'" in bad.stderr


@pytest.mark.slow
@requires_shared
def test_dry_run_plans_the_h200_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--rows", "96"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["rows"] == 96 and plan["params"] == 494_034_562  # the Qwen2-0.5B shape
    assert plan["runs"][:3] == ["prmkit-warmup", "prmkit-default", "trl-default"]
    plans = plan["plans"]
    # Unconstrained on 139 GiB: no checkpointing. Capped at 16 GiB: checkpointing, and then it fits.
    assert plans["prmkit-default"]["checkpointing"] is False and plans["prmkit-default"]["fits"] is True
    assert plans["prmkit-capped"]["checkpointing"] is True and plans["prmkit-capped"]["fits"] is True
    assert plans["prmkit-capped"]["estimated_peak_gib"] < 16 * 0.92 < plans["prmkit-default"]["estimated_peak_gib"]
    assert plans["prmkit-ckpt"]["reason"] == "train.gradient_checkpointing: true"
    assert "prmkit-capped: memory: estimated peak" in proc.stderr


def test_run_commands():
    gt = _bench()
    model, data, out = Path("m"), Path("d.jsonl"), Path("o")

    def sets(name, tiny=False, ref=32):
        argv = gt.prmkit_argv(name, model, data, out, tiny, ref, 4, 16.0)
        assert argv[:6] == ["--model", "m", "--train", "d.jsonl", "-o", "o"] and "--json" in argv
        return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]

    default = sets("prmkit-default")
    assert "train.bf16=true" in default and f"train.per_device_train_batch_size={gt.BATCH_SIZE}" in default
    assert not any(s.startswith(("train.gradient_checkpointing", "train.batching", "train.max_steps")) for s in default)
    assert "train.gradient_checkpointing=true" in sets("prmkit-ckpt")
    assert "train.max_steps=4" in sets("prmkit-warmup")
    ref = sets("prmkit-fp32-ref")
    assert "train.bf16=true" not in ref and {
        "train.batching=grouped",
        "model.attn_implementation=sdpa",
        "train.max_steps=32",
        "train.tf32=false",
    } <= set(ref)
    assert not any(s.startswith("train.max_steps") for s in sets("prmkit-fp32-ref", ref=None))
    # On the CPU the cap becomes a budget the tiny model cannot fit, so auto's decision is exercised; on the GPU the
    # cap is the process's memory fraction, set by the child before training.
    assert "train.memory_budget_gb=0.001" in sets("prmkit-capped", tiny=True)
    assert not any("memory_budget" in s for s in sets("prmkit-capped"))
    assert "train.use_liger_kernel=true" in sets("prmkit-liger") and "train.torch_compile=true" in sets(
        "prmkit-compile"
    )


def test_verdicts_and_loss_gap():
    gt = _bench()
    curve = [[4, 0.70], [8, 0.60], [12, 0.50]]
    assert gt.loss_gap(curve, [[4, 0.71], [8, 0.58], [16, 0.1]]) == {"steps": 2, "mean_abs": 0.015, "max_abs": 0.02}
    assert gt.loss_gap(curve, None) is None
    runs = {
        "trl-default": {"status": "ok", "trainer_seconds": 54.0, "peak_reserved_gib": 11.4},
        "prmkit-default": {"status": "ok", "trainer_seconds": 18.0, "mfu": 0.21, "loss_history": curve},
        "prmkit-capped": {"status": "ok", "trainer_seconds": 30.0},
        "prmkit-ckpt": {"status": "ok", "trainer_seconds": 36.0, "peak_reserved_gib": 9.0},
        "prmkit-fp32-ref": {"status": "ok", "loss_history": curve},
    }
    v = gt.verdicts(runs)
    assert v["unconstrained_speedup"] == 3.0 and v["capped_speedup"] == 1.8 and v["ckpt_speedup"] == 1.5
    assert v["ckpt_peak_vs_trl"] == round(9.0 / 11.4, 2) and v["capped_completed"] is True
    assert v["loss_gap_prmkit-default_vs_fp32_ref"] == {"steps": 3, "mean_abs": 0.0, "max_abs": 0.0}
    assert gt.verdicts({"trl-default": runs["trl-default"]})["capped_completed"] is False


def test_summary_figures():
    gt = _bench()
    raw = {
        "status": "ok",
        "wall_seconds": 40.0,
        "seconds": 20.0,
        "tokens": 1_000_000,
        "peak_memory_gib": 30.123,
        "memory": {"estimate": {"total_gib": 33.4}, "reason": "auto: fits", "budget_source": "free"},
        "batching": "packed",
        "attn_implementation": "flex_attention",
        "loss_history": [[4, 0.5]],
    }
    s = gt.summarise("prmkit-default", raw, 357_899_906)
    assert s["tokens_per_second"] == 50_000.0
    assert s["mfu"] == round(6 * 357_899_906 * 50_000 / 989e12, 4)
    assert s["peak_reserved_gib"] == 30.12 and s["estimated_peak_gib"] == 33.4 and s["batching"] == "packed"
    failed = gt.summarise("prmkit-capped", {"status": "exit 1", "wall_seconds": 3.0, "stderr_tail": "OOM"}, 1)
    assert failed == {"status": "exit 1", "wall_seconds": 3.0, "stderr_tail": "OOM"}
