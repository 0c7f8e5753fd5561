"""Distributed training on two CPU processes (gloo): DDP and FSDP2 train the same model as one process, resume from
sharded checkpoints after kill -9, and say which strategy ran.

How the runs are launched (each launch costs two interpreter start-ups, so launches are few and shared):

- DDP: `prmkit train --num-processes 2` (accelerate launch --multi_gpu, ACCELERATE_USE_CPU=true).
- FSDP2: `accelerate launch --config_file examples/accelerate/fsdp-cpu.yaml` (distributed_type FSDP, as a user would
  run it) starting tests/dist_driver.py, which calls prmkit's train() once per run in the same two processes: FSDP
  (sharded checkpoints), LoRA under FSDP (asked for through train.fsdp / train.fsdp_config, transformers' own
  fields), the lm-tag kind, and a run killed with SIGKILL after its first checkpoint.
- Resume: `prmkit train -c OUT/prmkit_config.yaml --resume --num-processes 2 --accelerate-config fsdp-cpu.yaml`.
- One process: prmkit's train() in the test process.

All in float32, padded batches (random order: one process with batch 4 sees the same rows per step as two with
batch 2; grouped batches group per process), so one process, DDP and FSDP take the same optimizer steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_train_rows

FSDP_CPU_CONFIG = ROOT / "examples" / "accelerate" / "fsdp-cpu.yaml"
LOSS_TOL, SCORE_TOL = 1e-3, 1e-4
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
FSDP_SETTINGS = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
    "state_dict_type": "FULL_STATE_DICT",
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HOME": str(tmp / "hf-home"),  # no stray accelerate default_config.yaml
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    env.pop("PRMKIT_LAUNCHED", None)
    return env


def _flags(data: dict, out: Path, processes: int, **extra) -> dict:
    """One run's settings; the batch per process is 4 / processes, so every run steps on the same 4 rows."""
    flags = {
        "model.name_or_path": str(data["model"]),
        "model.init_from_config": True,
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "train.output_dir": str(out),
        "train.batching": "padded",
        "train.per_device_train_batch_size": 4 // processes,
        "train.per_device_eval_batch_size": 4,
        "train.max_steps": 4,
        "train.logging_steps": 1,
        "train.save_steps": 2,
        "train.learning_rate": 1e-3,
        "train.seed": 0,
    }
    flags.update({k.replace("__", "."): v for k, v in extra.items()})
    return flags


def _summary(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout[-2000:]  # printed once, by rank 0
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_qwen2_config_dir):
    tmp = tmp_path_factory.mktemp("dist-data")
    return {
        "model": tiny_qwen2_config_dir,
        "tmp": tmp,
        "train": write_train_rows(tmp / "train.jsonl", n=16, seed=5, soft=True),  # soft and hard labels
        "eval": write_train_rows(tmp / "eval.jsonl", n=7, seed=6),  # ranks get different numbers of steps
        "heldout": write_train_rows(tmp / "heldout.jsonl", n=6, seed=7),
    }


@pytest.fixture(scope="module")
def one_process(data):
    """The reference runs, in this process: token classification, LoRA (merged), lm-tag."""
    from prmkit.config.load import load_config
    from prmkit.training.recipe import train

    tmp = data["tmp"] / "one"
    runs = {"plain": {}, "lora": {"train.lora": LORA}, "lmtag": {"train.kind": "lm-tag", "train.learning_rate": 3e-3}}
    return {
        name: (train(load_config(None, None, _flags(data, tmp / name, 1, **keys))).to_dict(), tmp / name)
        for name, keys in runs.items()
    }


@pytest.fixture(scope="module")
def ddp(data):
    out, rows_dir = data["tmp"] / "ddp", data["tmp"] / "rows"
    flags = _flags(data, out, 2)
    cmd = [sys.executable, "-m", "prmkit", "train", "--num-processes", "2", "--json"]
    for key, value in flags.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=_env(data["tmp"], PRMKIT_DEBUG_ROWS_DIR=str(rows_dir))
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _summary(proc.stdout), out, rows_dir


@pytest.fixture(scope="module")
def fsdp(data):
    """One launch, FSDP2 on two CPU processes, four runs (see the module docstring)."""
    tmp = data["tmp"] / "fsdp"
    tmp.mkdir()
    runs = [
        {"name": "plain", "flags": _flags(data, tmp / "plain", 2)},
        {
            "name": "lora",
            "flags": _flags(
                data, tmp / "lora", 2, train__lora=LORA, train__fsdp=True, train__fsdp_config=FSDP_SETTINGS
            ),
        },
        {"name": "adapter", "flags": _flags(data, tmp / "adapter", 2, train__lora=LORA, train__lora_merge=False)},
        {"name": "lmtag", "flags": _flags(data, tmp / "lmtag", 2, train__kind="lm-tag", train__learning_rate=3e-3)},
        {"name": "killed", "flags": _flags(data, tmp / "killed", 2), "kill_after_checkpoint": 2},
    ]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp), "runs": runs}))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP_CPU_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_port()),
        str(ROOT / "tests" / "dist_driver.py"),
        str(spec),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=_env(data["tmp"], ACCELERATE_USE_CPU="true")
    )
    # The last run kills every process of the launch with SIGKILL, the launcher included.
    assert proc.returncode == -9, proc.stderr[-4000:]
    summaries = {r["name"]: json.loads((tmp / f"{r['name']}.json").read_text()) for r in runs[:-1]}
    return summaries, tmp, proc.stderr


def _losses(summary: dict) -> list[float]:
    return [loss for _, loss in summary["loss_history"]]


def _scores(model_dir: Path, heldout: Path) -> list[float]:
    from prmkit.scoring import StepScorer

    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    scorer = StepScorer.from_pretrained(model_dir, dtype="float32", device="cpu")
    return [s for scores in scorer.score_batch([(r["prompt"], r["completions"]) for r in rows]) for s in scores]


def _close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol


# ---------------------------------------------------------------------------------------------------------------------
# DDP


@pytest.mark.slow
def test_two_processes_train_on_different_shards(data, ddp):
    summary, out, rows_dir = ddp
    assert summary["world_size"] == 2 and summary["global_step"] == 4  # 16 rows / (2 ranks x 2 rows)
    seen = [json.loads((rows_dir / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])  # disjoint shards
    assert sorted(seen[0] + seen[1]) == list(range(1, 17))  # together: every row once (row = line number)

    # Eval gathered every labelled step exactly once, although the ranks held different numbers of them.
    eval_steps = sum(len(json.loads(line)["labels"]) for line in data["eval"].read_text().splitlines())
    assert summary["eval_metrics"]["steps"] == eval_steps
    meta = json.loads((out / "prmkit.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["effective_batch_size"] == 4
    assert (out / "model.safetensors").is_file()
    # Only the main process took the output lock, and released it; the checkpoint was marked complete once both
    # ranks had written their part.
    assert not (out.parent / ".ddp.prmkit-lock").exists()
    listed = json.loads((out / "checkpoint-4" / "prmkit_checkpoint.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= set(listed)


@pytest.mark.slow
def test_ddp_and_fsdp_train_the_model_one_process_trains(data, one_process, ddp, fsdp):
    from transformers import AutoModelForTokenClassification

    one, one_dir = one_process["plain"]
    (ddp_summary, ddp_dir, _), (fsdp_summaries, fsdp_tmp, _) = ddp, fsdp
    fsdp_summary, fsdp_dir = fsdp_summaries["plain"], fsdp_tmp / "plain"
    for other in (ddp_summary, fsdp_summary):
        assert [s for s, _ in other["loss_history"]] == [1, 2, 3, 4]
        assert _close(_losses(other), _losses(one), LOSS_TOL), (_losses(other), _losses(one))
        # The eval metrics come from every labelled step's logits, gathered from both ranks. (The Trainer's eval
        # loss is a mean of batch means, and two ranks batch the eval rows differently.)
        for key in ("log_loss", "auroc", "accuracy", "steps"):
            assert other["eval_metrics"][key] == pytest.approx(one["eval_metrics"][key], abs=SCORE_TOL), key
    reference = _scores(one_dir, data["heldout"])
    for model_dir in (ddp_dir, fsdp_dir):
        AutoModelForTokenClassification.from_pretrained(model_dir)  # plain transformers loads it
        assert _close(_scores(model_dir, data["heldout"]), reference, SCORE_TOL)

    # What ran is recorded, with the proof that FSDP sharded: each rank held half of the parameters.
    assert one["strategy"] == {
        "name": "single",
        "world_size": 1,
        "nodes": 1,
        "wrapper": "Qwen2ForTokenClassification",
        "local_parameter_share": 1.0,
        "description": "one process",
    }
    assert ddp_summary["strategy"]["name"] == "ddp" and ddp_summary["strategy"]["backend"] == "gloo"
    assert ddp_summary["strategy"]["wrapper"] == "DistributedDataParallel"
    ran = fsdp_summary["strategy"]
    assert {
        k: ran[k] for k in ("name", "fsdp_version", "sharding", "state_dict_type", "world_size", "nodes", "backend")
    } == {
        "name": "fsdp",
        "fsdp_version": 2,
        "sharding": "FULL_SHARD",
        "state_dict_type": "SHARDED_STATE_DICT",
        "world_size": 2,
        "nodes": 1,
        "backend": "gloo",
    }
    assert ran["wrapper"].startswith("FSDP") and ran["local_parameter_share"] == pytest.approx(0.5, abs=0.01)
    assert ran["description"] == "FSDP2 (FULL_SHARD, SHARDED_STATE_DICT) on 2 processes"
    assert "replaced" not in ran
    assert json.loads((fsdp_dir / "prmkit.json").read_text())["training"]["strategy"] == ran
    # The final model is gathered whole although checkpoints are sharded: one safetensors file, no shard directory.
    assert (fsdp_dir / "model.safetensors").is_file() and not (fsdp_dir / "pytorch_model_fsdp_0").exists()


@pytest.mark.slow
def test_lora_and_lm_tag_under_fsdp_train_as_one_process(data, one_process, fsdp):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    summaries, tmp, _ = fsdp
    for name in ("lora", "lmtag"):
        one, one_dir = one_process[name]
        assert _close(_losses(summaries[name]), _losses(one), LOSS_TOL), name
        assert _close(_scores(tmp / name, data["heldout"]), _scores(one_dir, data["heldout"]), SCORE_TOL), name
    lora, adapter = summaries["lora"], summaries["adapter"]
    assert lora["strategy"]["name"] == "fsdp" and lora["strategy"]["state_dict_type"] == "FULL_STATE_DICT"
    assert adapter["strategy"]["state_dict_type"] == "SHARDED_STATE_DICT"  # the launcher's FSDP: fsdp-cpu.yaml
    assert lora["lora"]["merged"] is True and adapter["lora"]["merged"] is False
    assert _close(_losses(adapter), _losses(lora), LOSS_TOL)
    # Merged from the gathered shards: plain transformers loads it, and it computes what the one-process model does;
    # so does the adapter on its base (saved from the gathered shards too: the base was random).
    reference = AutoModelForTokenClassification.from_pretrained(one_process["lora"][1]).eval()
    merged = AutoModelForTokenClassification.from_pretrained(tmp / "lora").eval()
    base = AutoModelForTokenClassification.from_pretrained(tmp / "adapter" / "base_model")
    adapted = PeftModel.from_pretrained(base, tmp / "adapter").merge_and_unload().eval()
    ids = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        for model in (merged, adapted):
            assert torch.allclose(model(input_ids=ids).logits, want, atol=SCORE_TOL)
    AutoModelForCausalLM.from_pretrained(tmp / "lmtag")
    assert summaries["lmtag"]["strategy"]["wrapper"].startswith("FSDP")


# ---------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints and resume


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint(data, fsdp):
    summaries, tmp, _ = fsdp
    killed = tmp / "killed"
    assert not (killed / "prmkit.json").exists() and not (killed / "checkpoint-4").exists()
    listed = json.loads((killed / "checkpoint-2" / "prmkit_checkpoint.json").read_text())["files"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one file per rank, and the DCP metadata
        assert {f"{part}/__0_0.distcp", f"{part}/__1_0.distcp", f"{part}/.metadata"} <= set(listed)
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"} <= set(listed)

    cmd = [
        sys.executable,
        "-m",
        "prmkit",
        "train",
        "-c",
        str(killed / "prmkit_config.yaml"),
        "--resume",
        "--num-processes",
        "2",
        "--accelerate-config",
        str(FSDP_CPU_CONFIG),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(data["tmp"]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, plain = _summary(proc.stdout), summaries["plain"]
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert resumed["strategy"]["name"] == "fsdp" and resumed["strategy"]["world_size"] == 2
    # Optimizer moments, learning-rate schedule, RNG and data position all came back: steps 3 and 4 are the
    # uninterrupted run's.
    assert _close(_losses(resumed)[-2:], _losses(plain)[-2:], LOSS_TOL), (_losses(resumed), _losses(plain))
    assert _close(_scores(killed, data["heldout"]), _scores(tmp / "plain", data["heldout"]), SCORE_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed

DS_MISSING = (
    "deepspeed is not installed (it is not in prmkit's test extras: `pip install deepspeed` adds it; its "
    "CPU accelerator also compiles a shared-memory op with the C++ compiler on first use, about a minute)"
)


def _zero(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


@pytest.fixture(scope="module")
def weights_dir(data):
    """The tiny model with saved weights: ZeRO-3 partitions a model as it is built, so a random initialisation
    under it draws other numbers than in one process; loaded weights are the same everywhere."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    path = data["tmp"] / "weights"
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_config(AutoConfig.from_pretrained(data["model"])).save_pretrained(path)
    AutoTokenizer.from_pretrained(data["model"]).save_pretrained(path)
    return path


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_on_cpu_train_the_model_one_process_trains(data, weights_dir):
    """DeepSpeed over two CPU processes: its CPU accelerator and gloo, ZeRO-2 then ZeRO-3 (asked for through
    train.deepspeed) in one launch of the DDP launcher `prmkit train --num-processes 2` uses."""
    pytest.importorskip("deepspeed", reason=DS_MISSING)
    from transformers import AutoModelForTokenClassification

    from prmkit.config.load import load_config
    from prmkit.training.recipe import train

    tmp = data["tmp"] / "ds"
    tmp.mkdir()
    common = {"model.name_or_path": str(weights_dir), "model.init_from_config": False}
    one = train(load_config(None, None, _flags(data, tmp / "one", 1, **common))).to_dict()
    one_lora = train(load_config(None, None, _flags(data, tmp / "one-lora", 1, **common, train__lora=LORA)))
    runs = [
        {"name": f"zero{s}", "flags": _flags(data, tmp / f"zero{s}", 2, **common, train__deepspeed=_zero(s))}
        for s in (2, 3)
    ]
    runs.append(
        {
            "name": "zero3-lora",
            "flags": _flags(data, tmp / "zero3-lora", 2, **common, train__lora=LORA, train__deepspeed=_zero(3)),
        }
    )
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp), "runs": runs}))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_port()),
        str(ROOT / "tests" / "dist_driver.py"),
        str(spec),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=_env(data["tmp"], ACCELERATE_USE_CPU="true")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = _scores(tmp / "one", data["heldout"])
    for stage, share in ((2, 1.0), (3, 0.5)):
        summary = json.loads((tmp / f"zero{stage}.json").read_text())
        ran = summary["strategy"]
        assert (ran["name"], ran["zero_stage"], ran["world_size"], ran["wrapper"]) == (
            "deepspeed",
            stage,
            2,
            "DeepSpeedEngine",
        )
        assert ran["local_parameter_share"] == pytest.approx(share, abs=0.01)  # ZeRO-3 partitions the weights
        assert _close(_losses(summary), _losses(one), LOSS_TOL), (stage, _losses(summary), _losses(one))
        AutoModelForTokenClassification.from_pretrained(tmp / f"zero{stage}")  # gathered whole, plain transformers
        assert _close(_scores(tmp / f"zero{stage}", data["heldout"]), reference, SCORE_TOL), stage
    # LoRA under ZeRO-3: merged from the gathered partitions, as in one process.
    lora = json.loads((tmp / "zero3-lora.json").read_text())
    assert lora["lora"]["merged"] is True and lora["strategy"]["zero_stage"] == 3
    assert _close(_losses(lora), [loss for _, loss in one_lora.loss_history], LOSS_TOL)
    assert _close(_scores(tmp / "zero3-lora", data["heldout"]), _scores(tmp / "one-lora", data["heldout"]), SCORE_TOL)
