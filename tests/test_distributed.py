"""Two CPU processes (gloo) through `prmkit train --num-processes 2`: each rank trains on its own shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_train_rows


@pytest.mark.slow
def test_two_processes_train_on_different_shards(tmp_path, tiny_qwen2_config_dir):
    train_file = write_train_rows(tmp_path / "train.jsonl", n=16, seed=5)
    eval_file = write_train_rows(tmp_path / "eval.jsonl", n=7, seed=6)  # ranks get different numbers of steps
    rows_dir = tmp_path / "rows"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),  # no stray accelerate default_config.yaml
        "PRMKIT_DEBUG_ROWS_DIR": str(rows_dir),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PRMKIT_LAUNCHED", None)
    cmd = [sys.executable, "-m", "prmkit", "train", "--model", str(tiny_qwen2_config_dir), "--train", str(train_file),
           "--eval", str(eval_file), "-o", str(out), "--num-processes", "2", "--json",
           "--set", "model.init_from_config=true", "--set", "train.per_device_train_batch_size=2",
           "--set", "train.per_device_eval_batch_size=2", "--set", "train.learning_rate=1e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert len(proc.stdout.strip().splitlines()) == 1
    assert summary["world_size"] == 2 and summary["global_step"] == 4  # 16 rows / (2 ranks x 2 rows)

    seen = [json.loads((rows_dir / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])  # disjoint shards
    assert sorted(seen[0] + seen[1]) == list(range(1, 17))  # together: every row once (row = line number)

    # Eval gathered every labelled step exactly once, although the ranks held different numbers of them.
    eval_steps = sum(len(json.loads(line)["labels"]) for line in eval_file.read_text().splitlines())
    assert summary["eval_metrics"]["steps"] == eval_steps
    meta = json.loads((out / "prmkit.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["effective_batch_size"] == 4
    assert (out / "model.safetensors").is_file()
    # Only the main process took the output lock, and released it; the checkpoint was marked complete once both
    # ranks had written their part.
    assert not (tmp_path / ".run.prmkit-lock").exists()
    listed = json.loads((out / "checkpoint-4" / "prmkit_checkpoint.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= set(listed)
