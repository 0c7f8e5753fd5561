"""prmkit.models.memory and what training does with it: the allocator default, the estimate, the checkpointing plan, the
pre-flight line, and an out-of-memory error turned into one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_train_rows
from typer.testing import CliRunner

from prmkit.models.memory import (
    ALLOC_DEFAULT,
    GIB,
    Budget,
    MicroBatch,
    ModelShape,
    allocator_setting,
    device_budget,
    estimate_memory,
    largest_micro_batch,
    model_shape,
    oom_hint,
    plan_memory,
    use_expandable_segments,
)

ROOT = Path(__file__).resolve().parents[1]
# The issue's GPU setting: the Qwen2-0.5B shape, Qwen2's vocabulary.
QWEN2_05B = ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)


# ---------------------------------------------------------------------------------------------------------------------
# The allocator


def test_expandable_segments_unless_the_user_chose():
    env: dict[str, str] = {}
    assert use_expandable_segments(env) is True
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == ALLOC_DEFAULT == "expandable_segments:True"
    assert allocator_setting(env) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (prmkit's default)"
    # A launched child inherits both variables and still knows the setting is prmkit's.
    child = dict(env)
    assert use_expandable_segments(child) is True and child == env

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        mine = {name: "max_split_size_mb:128"}
        assert use_expandable_segments(mine) is False
        assert mine == {name: "max_split_size_mb:128"}, name  # untouched: PYTORCH_CUDA_ALLOC_CONF would override it
        assert allocator_setting(mine) == f"{name}=max_split_size_mb:128 (yours)"
    # The user's own expandable_segments is theirs, not prmkit's.
    assert allocator_setting({"PYTORCH_CUDA_ALLOC_CONF": ALLOC_DEFAULT}).endswith("(yours)")


_TORCH_IMPORT_PROBE = r"""
import os, sys, json
seen, out = {}, sys.argv[1]
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "env" not in seen:
            seen["env"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
            with open(out, "w") as fh:
                json.dump(seen, fh)
        return None
sys.meta_path.insert(0, Probe())
sys.argv = ["prmkit", *sys.argv[2:]]
import runpy
runpy.run_module("prmkit", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.slow
def test_cli_sets_the_allocator_before_torch_is_imported(tmp_path):
    """`python -m prmkit train` (also what `accelerate launch -m prmkit train` runs in each process): the variable is
    in the environment at the moment torch is first imported, so before CUDA can initialise."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PRMKIT_ALLOC_CONF_DEFAULT")
    }
    seen = tmp_path / "seen.json"
    # A model that does not exist: train fails right after importing transformers (and torch), which is enough.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _TORCH_IMPORT_PROBE,
            str(seen),
            "train",
            "--model",
            str(tmp_path / "none"),
            "--train",
            str(tmp_path / "rows.jsonl"),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert json.loads(seen.read_text()) == {"env": "expandable_segments:True"}

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _TORCH_IMPORT_PROBE,
            str(seen),
            "train",
            "--model",
            str(tmp_path / "none"),
            "--train",
            str(tmp_path / "rows.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"},
    )
    assert json.loads(seen.read_text()) == {"env": "garbage_collection_threshold:0.6"}


@pytest.mark.slow
def test_num_processes_launches_children_with_the_allocator_setting(tmp_path, monkeypatch):
    import prmkit.cli.train_cmd as train_cmd
    from prmkit.cli.app import app

    for name in (
        "PYTORCH_CUDA_ALLOC_CONF",
        "PYTORCH_ALLOC_CONF",
        "PYTORCH_HIP_ALLOC_CONF",
        "PRMKIT_ALLOC_CONF_DEFAULT",
        "PRMKIT_LAUNCHED",
    ):
        monkeypatch.delenv(name, raising=False)
    launched = {}

    def fake_call(cmd, env):
        launched.update(env)
        return 0

    monkeypatch.setattr(train_cmd.subprocess, "call", fake_call)
    try:
        result = CliRunner().invoke(app, ["train", "--example", "-o", str(tmp_path / "run"), "--num-processes", "2"])
    finally:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        os.environ.pop("PRMKIT_ALLOC_CONF_DEFAULT", None)
    assert result.exit_code == 0, result.output
    assert launched["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert launched["PRMKIT_ALLOC_CONF_DEFAULT"] == "1" and launched["PRMKIT_LAUNCHED"] == "1"


# ---------------------------------------------------------------------------------------------------------------------
# The estimate


def test_largest_micro_batch():
    lengths = [100, 900, 300, 50, 700, 20]
    assert largest_micro_batch(lengths, 3, "grouped") == MicroBatch(rows=3, width=900, sequences=3)
    assert largest_micro_batch(lengths, 3, "padded").positions == 2700
    packed = largest_micro_batch(lengths, 3, "packed")
    assert packed == MicroBatch(rows=1, width=1900, sequences=3) and packed.positions == 1900
    assert largest_micro_batch(lengths, 50, "grouped") == MicroBatch(rows=6, width=900, sequences=6)
    assert largest_micro_batch([], 4, "packed").positions == 0


def test_estimate_of_the_issue_setting_brackets_the_h200_measurements():
    """bf16 autocast over fp32 weights, batch 16, rows up to 1,085 tokens, AdamW: the issue measured (NVML, peak
    reserved) 32.6 GiB without checkpointing and 9.8 GiB with it for prmkit's grouped batches."""
    batch = largest_micro_batch([140, 526, 1085] * 300, 16, "grouped")
    assert batch == MicroBatch(rows=16, width=1085, sequences=16)
    off = estimate_memory(QWEN2_05B, batch, param_bytes=4, mixed=True)
    on = estimate_memory(QWEN2_05B, batch, param_bytes=4, mixed=True, checkpointing=True)
    params = QWEN2_05B.total_params
    assert 490e6 < params < 500e6 and 355e6 < QWEN2_05B.non_embedding_params < 360e6  # Qwen2-0.5B: 494 M
    assert off.weights == on.weights == params * 4 and off.gradients == params * 4
    assert off.optimizer == params * 8  # AdamW: two fp32 moments
    assert off.weight_copies == 2 * 24 * QWEN2_05B.layer_params  # bf16 copies under autocast
    assert 32.6 <= off.total / GIB <= 32.6 * 1.15
    assert 9.8 <= on.total / GIB <= 9.8 * 1.25
    assert on.activations < off.activations / 10
    # Packed: no padding, so at most the 16 longest rows end to end, never more than the padded batch.
    packed = estimate_memory(
        QWEN2_05B, largest_micro_batch([140, 526, 1085] * 300, 16, "packed"), param_bytes=4, mixed=True
    )
    assert packed.total <= off.total
    # bf16 weights halve weights, gradients and the optimizer; no autocast copies.
    half = estimate_memory(QWEN2_05B, batch, param_bytes=2)
    assert half.weights == params * 2 and half.optimizer == params * 4 and half.weight_copies == 0
    # LoRA: only the trained parameters have gradients and optimizer states.
    lora = ModelShape(**{**QWEN2_05B.__dict__, "params": params, "trainable": 5_000_000})
    est = estimate_memory(lora, batch, param_bytes=4, mixed=True)
    assert est.gradients == 20_000_000 and est.optimizer == 40_000_000
    # ZeRO-3 / FSDP across 4 processes shards the weights, gradients and states, not the activations.
    sharded = estimate_memory(QWEN2_05B, batch, param_bytes=4, mixed=True, shards=4)
    assert sharded.weights == params and sharded.activations == off.activations


def test_an_lm_head_adds_vocabulary_logits():
    """lm-tag trains a causal LM: its logits (and their gradient) are positions x vocabulary, not x 2."""
    batch = MicroBatch(rows=16, width=1085, sequences=16)
    head = estimate_memory(QWEN2_05B, batch, param_bytes=2)
    lm = ModelShape(**{**QWEN2_05B.__dict__, "head_outputs": QWEN2_05B.vocab})
    assert lm.outputs == 151936 and QWEN2_05B.outputs == 2
    with_lm = estimate_memory(lm, batch, param_bytes=2)
    logits = 16 * 1085 * 151936 * 2
    assert with_lm.activations - head.activations == logits and with_lm.workspace - head.workspace == logits


def test_eager_attention_adds_the_score_matrix():
    batch = MicroBatch(rows=4, width=1000, sequences=4)
    sdpa = estimate_memory(QWEN2_05B, batch)
    eager = estimate_memory(QWEN2_05B, batch, attention="eager")
    scores = 14 * 4 * 1000 * 1000 * (4 + 4)
    assert eager.activations - sdpa.activations == 24 * scores


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast", "checkpointing"])
def test_estimate_matches_the_tensors_autograd_saves(mode):
    """The coefficients are measurements: re-measure on a small model of another shape, within 10%."""
    from transformers import AutoModelForTokenClassification, Qwen2Config

    config = Qwen2Config(
        hidden_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=640,
        vocab_size=300,
        num_labels=2,
        use_cache=False,
    )
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config, dtype=dtype, attn_implementation="sdpa").train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if mode == "checkpointing":
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch = MicroBatch(rows=3, width=160, sequences=3)
    ids = torch.randint(0, 300, (batch.rows, batch.width))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"),
    ):
        model(input_ids=ids).logits.sum().backward()
    measured = sum(saved.values())
    shape = model_shape(config, model)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    est = estimate_memory(
        shape,
        batch,
        param_bytes=2 if mode == "bf16" else 4,
        mixed=mode == "autocast",
        checkpointing=mode == "checkpointing",
    )
    expected = est.activations + est.weight_copies  # the recompute's tensors go through checkpoint's own hooks
    assert abs(measured - expected) / measured < 0.10, (measured, expected)


# ---------------------------------------------------------------------------------------------------------------------
# The plan


LENGTHS = [140, 526, 1085] * 300
MIXED = {"param_bytes": 4, "mixed": True}


def test_auto_turns_checkpointing_on_only_when_it_would_not_fit():
    roomy = plan_memory(
        "auto", QWEN2_05B, LENGTHS, 16, "grouped", Budget(int(139 * GIB), "free memory of H200"), **MIXED
    )
    assert roomy.checkpointing is False and roomy.fits is True and roomy.advice == []
    assert roomy.reason.startswith("auto: fits without it")

    capped = plan_memory(
        "auto", QWEN2_05B, LENGTHS, 16, "grouped", Budget(16 * GIB, "per-process memory fraction"), **MIXED
    )
    assert capped.checkpointing is True and capped.fits is True
    assert "exceeds the usable 14.7 GiB" in capped.reason
    assert capped.estimate is capped.estimate_with and capped.usable_bytes == int(16 * GIB * 0.92)
    line = capped.preflight()
    assert "fits" in line and "16 rows x 1,085 tokens" in line and "gradient checkpointing on" in line

    tight = plan_memory(
        "auto", QWEN2_05B, LENGTHS, 16, "grouped", Budget(9 * GIB, "train.memory_budget_gb = 9"), **MIXED
    )
    assert tight.checkpointing is True and tight.fits is False
    assert "does NOT fit" in tight.preflight() and "8.3 GiB usable of 9.0 GiB" in tight.preflight()
    assert any(
        t.startswith("train.per_device_train_batch_size: ") and "gradient_accumulation_steps" in t for t in tight.advice
    )
    assert any(t.startswith("train.lora") for t in tight.advice)
    # Each tip is itself an estimate under the same budget.
    size = int(next(t for t in tight.advice if "per_device" in t).split(": ")[1].split()[0])
    fitting = estimate_memory(QWEN2_05B, largest_micro_batch(LENGTHS, size, "grouped"), checkpointing=True, **MIXED)
    assert fitting.total <= 9 * GIB * 0.92
    bigger = estimate_memory(QWEN2_05B, largest_micro_batch(LENGTHS, size + 1, "grouped"), checkpointing=True, **MIXED)
    assert bigger.total > 9 * GIB * 0.92


def test_explicit_setting_is_obeyed_and_no_budget_means_off():
    forced_off = plan_memory(False, QWEN2_05B, LENGTHS, 16, "grouped", Budget(16 * GIB, "x"), **MIXED)
    assert forced_off.checkpointing is False and forced_off.fits is False
    assert forced_off.reason == "train.gradient_checkpointing: false"
    assert forced_off.advice[0].startswith("train.gradient_checkpointing: true")
    forced_on = plan_memory(True, QWEN2_05B, LENGTHS, 16, "grouped", Budget(139 * GIB, "x"), **MIXED)
    assert forced_on.checkpointing is True and forced_on.fits is True
    cpu = plan_memory("auto", QWEN2_05B, LENGTHS, 16, "grouped", Budget(None, "no CUDA device"), **MIXED)
    assert cpu.checkpointing is False and cpu.fits is None and "no CUDA device" in cpu.reason
    as_dict = json.loads(json.dumps(capped_dict := forced_on.to_dict()))
    assert as_dict == capped_dict and capped_dict["estimate"]["checkpointing"] is True


def test_device_budget_reads_the_per_process_fraction(monkeypatch):
    assert device_budget(12.5) == Budget(int(12.5 * GIB), "train.memory_budget_gb = 12.5")
    fraction = {"value": 1.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (int(130 * GIB), int(139.8 * GIB)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index=None: fraction["value"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: int(1 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    free = device_budget(None, "cuda:0")
    assert free.bytes == int(130 * GIB) and free.source.startswith("free memory of NVIDIA H200")
    fraction["value"] = 16 / 139.8
    capped = device_budget(None, "cuda:0")
    assert abs(capped.bytes - 15 * GIB) <= 1  # 16 GiB, less what this process has already reserved
    assert "per-process memory fraction 0.114" in capped.source
    assert device_budget(20, "cuda:0").bytes == 20 * GIB  # the explicit key wins over the device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_budget(None) == Budget(None, "no CUDA device")


def test_oom_hint_names_the_fixes():
    hint = oom_hint(None, "runs/x/checkpoint-20")
    for fix in (
        "gradient_checkpointing: true",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "batching: packed",
        "lora",
        "runs/x/checkpoint-20",
        "--resume",
    ):
        assert fix in hint, fix
    on = plan_memory(True, QWEN2_05B, LENGTHS, 16, "grouped", Budget(None, "x"), **MIXED)
    assert "gradient_checkpointing" not in oom_hint(on, None) and "No checkpoint was saved yet" in oom_hint(on, None)


# ---------------------------------------------------------------------------------------------------------------------
# In training


def _cfg(tmp_path: Path, model_dir: Path, **keys):
    from prmkit.config.load import load_config

    flags = {
        "model.name_or_path": str(model_dir),
        "model.init_from_config": True,
        "data.train": str(write_train_rows(tmp_path / "rows.jsonl", n=12)),
        "train.output_dir": str(tmp_path / "out"),
        "train.per_device_train_batch_size": 4,
        "train.max_steps": 2,
        "train.logging_steps": 1,
        "train.save_strategy": "no",
        "train.seed": 0,
    }
    flags.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, None, flags)


@pytest.mark.slow
@pytest.mark.slow
def test_auto_checkpointing_follows_the_budget_and_is_recorded(tmp_path, tiny_qwen2_config_dir, caplog):
    from transformers import TrainerCallback

    from prmkit.training.recipe import train

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
            self.seen = bool(layers) and all(m.gradient_checkpointing for m in layers)

    spy = Spy()
    caplog.set_level("INFO", logger="prmkit")
    # A budget smaller than the run: auto turns checkpointing on, and the model really trains with it.
    result = train(_cfg(tmp_path, tiny_qwen2_config_dir, train__memory_budget_gb=0.0003), callbacks=[spy])
    assert result.gradient_checkpointing is True and spy.seen is True
    assert result.memory["checkpointing"] is True and result.memory["reason"].startswith("auto: ")
    assert result.memory["budget_source"] == "train.memory_budget_gb = 0.0003"
    meta = json.loads((tmp_path / "out" / "prmkit.json").read_text())
    assert meta["training"]["gradient_checkpointing"] is True
    assert meta["training"]["gradient_checkpointing_reason"] == result.memory["reason"]
    assert meta["training"]["memory"]["estimate"]["total_bytes"] == result.memory["estimate"]["total_bytes"] > 0
    assert any(r.getMessage().startswith("memory: estimated peak") for r in caplog.records)
    assert [step for step, _ in result.loss_history] == [1, 2]

    # Explicit false is obeyed, and the pre-flight says it will not fit and what would (checkpointing, here).
    between = (
        (result.memory["estimate_with"]["total_bytes"] + result.memory["estimate_without"]["total_bytes"])
        / 2
        / 0.92
        / GIB
    )
    caplog.clear()
    spy = Spy()
    result = train(
        _cfg(
            tmp_path,
            tiny_qwen2_config_dir,
            train__output_dir=str(tmp_path / "off"),
            train__memory_budget_gb=between,
            train__gradient_checkpointing=False,
        ),
        callbacks=[spy],
    )
    assert result.gradient_checkpointing is False and spy.seen is False
    assert result.memory["fits"] is False
    warning = next(
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "may not fit" in r.getMessage()
    )
    assert "train.gradient_checkpointing: true" in warning

    # No budget on CPU: auto leaves it off.
    result = train(_cfg(tmp_path, tiny_qwen2_config_dir, train__output_dir=str(tmp_path / "cpu")))
    assert result.gradient_checkpointing is False and result.memory["reason"] == "auto: no CUDA device, nothing to fit"


@pytest.mark.slow
def test_out_of_memory_is_one_message_and_keeps_the_last_checkpoint(tmp_path, tiny_qwen2_config_dir, monkeypatch):
    from transformers import Trainer

    from prmkit.cli.app import app

    real_step = Trainer.training_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    monkeypatch.delenv("PRMKIT_DEBUG", raising=False)
    out = tmp_path / "run"
    rows = write_train_rows(tmp_path / "rows.jsonl", n=16)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_qwen2_config_dir),
            "--train",
            str(rows),
            "-o",
            str(out),
            "--max-steps",
            "4",
            "--set",
            "model.init_from_config=true",
            "--set",
            "train.per_device_train_batch_size=4",
            "--set",
            "train.save_steps=2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "OutOfMemoryError" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "out of memory at step 3" in errors[0], result.stderr
    for fix in (
        "gradient_checkpointing: true",
        "per_device_train_batch_size",
        "batching: packed",
        "lora",
        str(out / "checkpoint-2"),
        "--resume",
    ):
        assert fix in result.stderr, fix
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / "prmkit.json").exists()  # not a finished model


def _train_with_evaluation_out_of_memory(tmp_path: Path, config_dir: Path, monkeypatch, *args: str):
    """`prmkit train` with evaluation data, every evaluation running out of memory; the CLI result and the output."""
    from transformers import Trainer

    from prmkit.cli.app import app

    def evaluate(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.delenv("PRMKIT_DEBUG", raising=False)
    out = tmp_path / "run"
    rows = write_train_rows(tmp_path / "rows.jsonl", n=16)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(config_dir),
            "--train",
            str(rows),
            "--eval",
            str(rows),
            "-o",
            str(out),
            "--set",
            "model.init_from_config=true",
            "--set",
            "train.per_device_train_batch_size=4",
            *args,
        ],
    )
    return result, out


@pytest.mark.slow
def test_out_of_memory_while_evaluating_during_training_names_the_eval_batch(
    tmp_path, tiny_qwen2_config_dir, monkeypatch
):
    result, out = _train_with_evaluation_out_of_memory(
        tmp_path,
        tiny_qwen2_config_dir,
        monkeypatch,
        "--max-steps",
        "4",
        "--set",
        "train.eval_strategy=steps",
        "--set",
        "train.eval_steps=3",
        "--set",
        "train.save_steps=2",
        "--set",
        "train.per_device_eval_batch_size=8",
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "OutOfMemoryError" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: out of memory evaluating at step 3 (eval batches of 8 rows)"], result.stderr
    for fix in (
        "train.per_device_eval_batch_size",
        "train.eval_strategy: no",
        "prmkit eval",
        str(out / "checkpoint-2"),
        "--resume",
    ):
        assert fix in result.stderr, fix
    assert "gradient_checkpointing" not in result.stderr.split("hint:", 1)[1]


@pytest.mark.slow
def test_out_of_memory_in_the_final_evaluation_keeps_the_trained_model(tmp_path, tiny_qwen2_config_dir, monkeypatch):
    result, out = _train_with_evaluation_out_of_memory(
        tmp_path, tiny_qwen2_config_dir, monkeypatch, "--max-steps", "2", "--json", "--set", "train.eval_strategy=no"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["eval_metrics"] == {} and summary["global_step"] == 2
    assert (
        summary["eval_error"]
        == "out of memory during the final evaluation (CUDA out of memory. Tried to allocate 8.00 GiB)"
    )
    assert "per_device_eval_batch_size" in result.stderr and "Traceback" not in result.output
    # The model is saved and says why it has no eval figures.
    assert (out / "model.safetensors").is_file()
    metadata = json.loads((out / "prmkit.json").read_text())
    assert metadata["training"]["eval"] == {} and metadata["training"]["eval_error"] == summary["eval_error"]


def test_transformers_newer_name_counts_as_explicit_and_both_names_are_set(tmp_path):
    from prmkit.config.load import load_config
    from prmkit.training.recipe import build_training_arguments, requested_checkpointing, set_checkpointing

    assert requested_checkpointing(load_config(None, [])) == "auto"
    assert requested_checkpointing(load_config(None, ["train.gradient_checkpointing=false"])) is False
    args = build_training_arguments(load_config(None, [f"train.output_dir={tmp_path}"]), has_eval=False)
    set_checkpointing(args, True)
    # The Trainer of transformers 5.17 reads gradient_checkpointing; later ones read activation_checkpointing.
    assert args.gradient_checkpointing is True
    assert getattr(args, "activation_checkpointing", True) is True
    set_checkpointing(args, False)
    assert args.gradient_checkpointing is False and getattr(args, "activation_checkpointing", False) is False
    from prmkit.config.schema import training_argument_fields

    if "activation_checkpointing" in training_argument_fields():  # transformers 5.2x; 5.17 has only the old name
        assert requested_checkpointing(load_config(None, ["train.activation_checkpointing=true"])) is True
