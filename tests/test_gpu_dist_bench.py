"""bench/gpu_dist.py's CPU-safe parts: arguments, the accelerate configs it writes, and the dry run's per-rank memory
plans for H200s. The GPU runs themselves happen on a lent GPU machine (BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import requires_shared

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_dist.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("gpu_dist", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_and_commands(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    gd = _bench()
    for name, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(gd.accelerate_config(name, 8)))
        loaded = load_config_from_file(str(path))
        assert loaded.distributed_type.value == kind and loaded.num_processes == 8
    assert gd.accelerate_config("fsdp", 8)["fsdp_config"]["fsdp_version"] == 2
    assert gd.accelerate_config("zero3", 8)["deepspeed_config"]["zero_stage"] == 3
    argv = gd.prmkit_argv(Path("m"), Path("d.jsonl"), Path("o"), Path("fsdp.yaml"), 8, 40)
    assert argv[:2] == ["train", "--model"] and argv[argv.index("--num-processes") + 1] == "8"
    assert argv[argv.index("--accelerate-config") + 1] == "fsdp.yaml"
    # A replaced strategy must fail the run, not be measured as the one asked for.
    assert "train.require_strategy=true" in argv and "train.bf16=true" in argv


@pytest.mark.slow
def test_help_and_unknown_runs():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--dry-run", "--runs", "--gpus", "--max-steps", "--budget", "--timeout", "--out"):
        assert option in proc.stdout, option
    bad = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "zero4"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bad.returncode == 2 and "unknown run 'zero4'" in bad.stderr


@requires_shared
def test_dry_run_plans_memory_per_rank():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--rows", "64", "--gpus", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    params = plan["params"]
    assert plan["gpus"] == 8 and params == 494_034_562 and set(plan["runs"]) == {"ddp", "fsdp", "zero3"}
    ddp, fsdp, zero3 = (plan["runs"][k]["estimate"]["bytes"] for k in ("ddp", "fsdp", "zero3"))
    # fp32 weights (4 B), gradients (4 B), AdamW states (8 B): whole under DDP, an eighth under FSDP and ZeRO-3.
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (params * 4, params * 4, params * 8)
    assert (fsdp["weights"], fsdp["optimizer"]) == (math.ceil(params * 4 / 8), math.ceil(params * 8 / 8))
    assert fsdp == zero3 and fsdp["gathered"] > 0 == ddp["gathered"]
    assert fsdp["activations"] == ddp["activations"]  # per rank, never divided
    assert "per process under FSDP2 (FULL_SHARD, FULL_STATE_DICT) on 8 processes" in plan["runs"]["fsdp"]["preflight"]
    assert "per process under DeepSpeed ZeRO-3 on 8 processes" in proc.stderr
