"""prmkit.training.distributed without launching processes: the strategy asked for and the one that runs, the warning
and
the refusal when they differ, memory per rank under each strategy, and sharded checkpoints' completeness."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from prmkit.errors import ConfigError, UsageError
from prmkit.models.memory import Budget, MicroBatch, ModelShape, Sharding, estimate_memory, plan_memory
from prmkit.training.distributed import (
    Strategy,
    check_strategy,
    expected_strategy,
    join_cpu_processes,
    plan_strategy,
    replacement_reason,
    requested_strategy,
)

LAUNCHED_FSDP = {
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "4",
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}
NO_ARGS = SimpleNamespace(fsdp_plugin_args=None, deepspeed=None)


def test_what_was_asked_comes_from_the_launcher_or_from_train_fsdp():
    asked = requested_strategy(NO_ARGS, LAUNCHED_FSDP)
    assert (asked.name, asked.fsdp_version, asked.sharding, asked.state_dict_type) == (
        "fsdp",
        2,
        "FULL_SHARD",
        "SHARDED_STATE_DICT",
    )
    assert (asked.world_size, asked.nodes) == (8, 2)  # 8 processes, 4 on each machine
    assert "ACCELERATE_USE_FSDP" in asked.source
    # train.fsdp / train.fsdp_config become TrainingArguments.fsdp_plugin_args; they win over the launcher's.
    args = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2, "reshard_after_forward": False}, deepspeed=None)
    asked = requested_strategy(args, {"WORLD_SIZE": "2"})
    assert (asked.sharding, asked.state_dict_type, asked.source) == ("SHARD_GRAD_OP", "FULL_STATE_DICT", "train.fsdp")
    # accelerate launch --use_fsdp without --fsdp_version: accelerate's default, FSDP1.
    assert requested_strategy(NO_ARGS, {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}).fsdp_version == 1
    ds = requested_strategy(
        NO_ARGS, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    )
    assert (ds.name, ds.zero_stage) == ("deepspeed", 3)
    assert requested_strategy(NO_ARGS, {"WORLD_SIZE": "2"}).name == "ddp"
    assert requested_strategy(NO_ARGS, {}).name == "single"


def test_fsdp1_over_cpu_processes_is_replaced_by_ddp_and_says_so(caplog):
    """accelerate drops FSDP over CPU processes; prmkit enables FSDP2 there, not FSDP1: DDP runs, with a warning
    naming both, or a refusal under train.require_strategy."""
    asked = requested_strategy(NO_ARGS, {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    ran = expected_strategy(asked, "MULTI_CPU", cpu=True)
    assert ran.name == "ddp" and ran.world_size == 2
    why = replacement_reason(asked, "MULTI_CPU", cpu=True)
    with caplog.at_level(logging.WARNING, logger="prmkit"):
        noted = check_strategy(asked, ran, require=False, why=why)
    assert noted.replaced.startswith(
        "FSDP1 was asked for (the launcher (ACCELERATE_USE_FSDP)), but DDP on 2 processes runs"
    )
    assert "FSDP version 2" in caplog.text and "train.require_strategy: true" in caplog.text
    with pytest.raises(ConfigError) as refused:
        check_strategy(asked, ran, require=True, why=why)
    assert "DDP on 2 processes runs" in refused.value.message and "fsdp_version: 2" in refused.value.hint

    # FSDP2 over CPU processes is enabled by prmkit, and over GPUs by accelerate: no warning.
    asked2 = requested_strategy(NO_ARGS, LAUNCHED_FSDP)
    for kind, cpu in (("MULTI_CPU", True), ("MULTI_GPU", False)):
        assert expected_strategy(asked2, kind, cpu).name == "fsdp"
        assert replacement_reason(asked2, kind, cpu) is None
    # DeepSpeed over CPU processes (ACCELERATE_USE_CPU), dropped by accelerate, is enabled by prmkit as well.
    ds = requested_strategy(NO_ARGS, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert expected_strategy(ds, "MULTI_CPU", cpu=True).name == "deepspeed"
    assert replacement_reason(ds, "MULTI_CPU", cpu=True) is None
    # One process started without a launcher has nothing to shard across.
    assert expected_strategy(asked2, "NO", cpu=False).name == "single"
    assert "nothing to shard" in replacement_reason(asked2, "NO", cpu=False)


def test_processes_that_form_no_group_are_refused_and_cpu_processes_join_one():
    state = SimpleNamespace(distributed_type="NO", is_main_process=True)
    with pytest.raises(UsageError) as e:
        plan_strategy(NO_ARGS, state, require=False, environ={"WORLD_SIZE": "2"})
    assert "form no process group" in e.value.message and "ACCELERATE_USE_CPU" in e.value.hint
    env = {"WORLD_SIZE": "2"}
    assert join_cpu_processes(env) is True and env["ACCELERATE_USE_CPU"] == "true"
    assert join_cpu_processes({"WORLD_SIZE": "1"}) is False
    mine = {"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "false"}
    assert join_cpu_processes(mine) is False and mine["ACCELERATE_USE_CPU"] == "false"  # the user's choice


def test_require_strategy_refuses_before_anything_is_written(tmp_path, tiny_qwen2_config_dir):
    """train.fsdp in a single process started without a launcher: nothing to shard across."""
    from conftest import write_train_rows

    from prmkit.config.load import load_config
    from prmkit.training.recipe import train

    rows = write_train_rows(tmp_path / "train.jsonl", n=4)
    flags = {
        "model.name_or_path": str(tiny_qwen2_config_dir),
        "model.init_from_config": True,
        "data.train": str(rows),
        "train.output_dir": str(tmp_path / "out"),
        "train.fsdp": True,
        "train.fsdp_config": {"version": 2},
        "train.require_strategy": True,
    }
    with pytest.raises(ConfigError) as e:
        train(load_config(None, None, flags))
    assert e.value.message.startswith("FSDP2 was asked for (train.fsdp), but one process runs")
    assert "--num-processes" in e.value.hint
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Memory per rank

# Small enough to add up by hand: 4 layers of 680 parameters (q, k, v, o 64 + 64 + 64 + 64, MLP 3 x 128, biases 24,
# norms 16), an embedding of 100 x 8, the final norm (8) and a two-label head (16 + 2): 3546 in all, 826 outside the
# layers.
SHAPE = ModelShape(hidden=8, layers=4, heads=2, kv_heads=2, intermediate=16, vocab=100)
BATCH = MicroBatch(rows=2, width=10, sequences=2)


def _per_rank(strategy: Strategy, shape: ModelShape = SHAPE):
    return estimate_memory(shape, BATCH, param_bytes=4, sharding=strategy.sharding_for_memory())


def test_memory_per_rank_under_each_strategy_by_hand():
    assert (SHAPE.layer_params, SHAPE.total_params) == (680, 3546)
    one = _per_rank(Strategy())
    assert (one.weights, one.gradients, one.optimizer, one.gathered) == (14184, 14184, 28368, 0)  # 4 B, 4 B, 8 B
    ddp = _per_rank(Strategy(name="ddp", world_size=4))
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.gathered) == (14184, 14184, 28368, 0)
    # FSDP FULL_SHARD (= ZeRO-3) over 4: everything / 4, plus what a rank gathers to compute: the parameters
    # outside the layers (826), one layer (680) and that layer's unsharded gradients (680), 4 bytes each.
    full = _per_rank(Strategy(name="fsdp", world_size=4, fsdp_version=2, sharding="FULL_SHARD"))
    assert (full.weights, full.gradients, full.optimizer, full.gathered) == (3546, 3546, 7092, (826 + 680 + 680) * 4)
    zero3 = _per_rank(Strategy(name="deepspeed", world_size=4, zero_stage=3))
    assert (zero3.weights, zero3.gradients, zero3.optimizer, zero3.gathered) == (3546, 3546, 7092, 8744)
    # SHARD_GRAD_OP (= ZeRO-2): whole weights, gradients and optimizer states / 4. ZeRO-1: optimizer states only.
    for grad_op in (
        Strategy(name="fsdp", world_size=4, fsdp_version=2, sharding="SHARD_GRAD_OP"),
        Strategy(name="deepspeed", world_size=4, zero_stage=2),
    ):
        est = _per_rank(grad_op)
        assert (est.weights, est.gradients, est.optimizer, est.gathered) == (14184, 3546, 7092, 0)
    zero1 = _per_rank(Strategy(name="deepspeed", world_size=4, zero_stage=1))
    assert (zero1.weights, zero1.gradients, zero1.optimizer) == (14184, 14184, 7092)
    # HYBRID_SHARD shards within a node: 8 processes on 2 machines hold a quarter each.
    hybrid = _per_rank(
        Strategy(name="fsdp", world_size=8, nodes=2, fsdp_version=2, sharding="HYBRID_SHARD", shard_size=4)
    )
    assert (hybrid.weights, hybrid.optimizer) == (3546, 7092)
    # LoRA under FSDP: the frozen weights are sharded too; gradients and optimizer states exist for the 100 trained
    # parameters only, and so does the gathered layer's gradient (680 x 100 / 3546, rounded up: 20).
    lora = _per_rank(
        Strategy(name="fsdp", world_size=4, fsdp_version=2, sharding="FULL_SHARD"),
        ModelShape(**{**SHAPE.__dict__, "trainable": 100}),
    )
    assert (lora.weights, lora.gradients, lora.optimizer, lora.gathered) == (3546, 100, 200, (826 + 680 + 20) * 4)
    # Activations are per rank: each runs its own micro-batch, whatever the strategy.
    assert len({e.activations + e.workspace for e in (one, ddp, full, zero3, zero1, hybrid, lora)}) == 1


def test_sharding_lets_auto_skip_checkpointing_and_the_preflight_names_the_strategy():
    """Qwen2-0.5B shaped, fp32 weights with bf16 autocast, AdamW, 16 x 1085 tokens: 35.0 GiB in one process, 28.6
    GiB per process under FSDP over 8 (7.4 GiB of weights, gradients and states become 0.9, the 0.7 GiB of 16-bit
    copies 0.1, plus 0.6 gathered; the activations stay). A 33 GiB budget (30.4 usable) needs checkpointing in one
    process, not under FSDP."""
    from prmkit.models.memory import GIB

    shape = ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
    lengths, budget = [1085] * 16, Budget(33 * GIB, "train.memory_budget_gb = 33")
    kwargs = {"param_bytes": 4, "mixed": True}
    one = plan_memory("auto", shape, lengths, 16, "padded", budget, **kwargs)
    fsdp = Strategy(name="fsdp", world_size=8, fsdp_version=2, sharding="FULL_SHARD", state_dict_type="FULL_STATE_DICT")
    sharded = plan_memory("auto", shape, lengths, 16, "padded", budget, sharding=fsdp.sharding_for_memory(), **kwargs)
    assert one.checkpointing is True and sharded.checkpointing is False
    assert 6.3 * GIB < one.estimate_without.total - sharded.estimate.total < 6.5 * GIB
    assert sharded.strategy == "FSDP2 (FULL_SHARD, FULL_STATE_DICT) on 8 processes"
    assert " per process under FSDP2 (FULL_SHARD, FULL_STATE_DICT) on 8 processes, " in sharded.preflight()
    assert " in one process, " in one.preflight() and one.preflight().startswith("memory: estimated peak")
    assert sharded.to_dict()["strategy"] == sharded.strategy
    # The older shorthand, shards=n, is full sharding n ways.
    assert estimate_memory(shape, one.estimate.batch, shards=8, **kwargs).total == sharded.estimate_without.total
    assert Sharding.full(8) == Sharding(8, 8, 8, gathers_layers=True, label=Sharding.full(8).label)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints


def test_a_sharded_checkpoint_is_checked_file_by_file(tmp_path):
    """FSDP's SHARDED_STATE_DICT writes one DCP file per rank (and .metadata) for the model and the optimizer; the
    completion marker lists them all, so a truncated or missing shard makes the checkpoint incomplete."""
    from prmkit.core.checkpoints import checkpoint_problem, latest_complete_checkpoint, mark_complete

    def sharded(step: int):
        path = tmp_path / f"checkpoint-{step}"
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            (path / part).mkdir(parents=True)
            for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
                (path / part / name).write_bytes(b"x" * 64)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        mark_complete(path)
        return path

    old, new = sharded(2), sharded(4)
    assert checkpoint_problem(new) is None
    (new / "optimizer_0" / "__1_0.distcp").write_bytes(b"x" * 10)  # rank 1's optimizer shard, cut short
    assert checkpoint_problem(new) == "optimizer_0/__1_0.distcp has 10 bytes, not the 64 it was written with"
    (new / "optimizer_0" / "__1_0.distcp").write_bytes(b"x" * 64)
    (new / "pytorch_model_fsdp_0" / ".metadata").unlink()  # written by rank 0 once every shard is
    assert latest_complete_checkpoint(tmp_path) == (old, [(new, "pytorch_model_fsdp_0/.metadata is missing")])
    # Without the marker (killed before it was written), a sharded checkpoint holds no weights prmkit can check.
    (old / "prmkit_checkpoint.json").unlink()
    assert checkpoint_problem(old) == "it holds no model weights"
