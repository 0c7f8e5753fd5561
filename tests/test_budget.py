"""The batch budget sized to a device: a pure function of free memory and the model's dimensions, checked with
numbers."""

from __future__ import annotations

import pytest
import torch
from test_scoring import prmkit_log

from prmkit.models.memory import ModelShape, model_shape
from prmkit.scoring import budget
from prmkit.scoring.budget import bytes_per_token, device_batch_tokens

GiB = 1 << 30
# Qwen2-0.5B's shape, the model of issue #14's measurements.
QWEN2_05B = ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
# Qwen2-7B's shape.
QWEN2_7B = ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)


def test_bytes_per_token_by_hand():
    # Qwen2-0.5B in bf16: the MLP peaks (3 x 4864 + 896 = 15488) over attention (4 x 896 + 4 x 128 + 2 x 896 + 896 =
    # 6784); plus the residual stream 3 x 896: 18176 values of 2 bytes, two float32 norm temporaries of 896, 2 logits.
    assert bytes_per_token(QWEN2_05B, 2) == 18176 * 2 + 2 * 896 * 4 + 2 * 4 == 43528
    assert bytes_per_token(QWEN2_05B, 4) == 18176 * 4 + 2 * 896 * 4 + 2 * 4


def test_device_budget_with_numbers():
    # An H200 after loading Qwen2-0.5B: far more memory than batches need, so the cap.
    assert device_batch_tokens(138 * GiB, 140 * GiB, QWEN2_05B, 2) == budget.MAX_DEVICE_BATCH_TOKENS == 131072
    # A 24 GiB card holding Qwen2-7B in bf16 (15 GiB): 9 GiB free, 2 GiB kept back (8% of 24 GiB, over the 1 GiB floor).
    usable = 9 * GiB - int(0.08 * 24 * GiB)
    per_token = bytes_per_token(QWEN2_7B, 2)
    assert per_token == 171016
    expected = int(usable / (per_token * 1.5)) // 1024 * 1024
    assert usable == 7_602_092_114 and expected == 28672  # 29,635 tokens, rounded down to 28 x 1,024
    assert device_batch_tokens(9 * GiB, 24 * GiB, QWEN2_7B, 2) == expected
    # Next to nothing free: the floor, and the engine's split-and-retry takes it from there.
    assert device_batch_tokens(GiB // 4, 80 * GiB, QWEN2_7B, 2) == budget.MIN_DEVICE_BATCH_TOKENS
    # An H200 that another process fills but for 8 GiB: half of that is kept back (not 8% of 139 GiB, which is more
    # than is free), so Qwen2-0.5B still gets a working budget: 4 GiB / (43,528 x 1.5) = 65,783 tokens.
    assert device_batch_tokens(8 * GiB, 139 * GiB, QWEN2_05B, 2) == 65536
    # 1 GiB free on an 80 GiB card: 512 MiB usable, 2,093 tokens of Qwen2-7B, rounded down.
    assert device_batch_tokens(GiB, 80 * GiB, QWEN2_7B, 2) == 2048
    # More free memory never means a smaller budget.
    figures = [device_batch_tokens(f * GiB, 80 * GiB, QWEN2_7B, 2) for f in range(1, 80)]
    assert figures == sorted(figures)


def test_a_dense_mask_or_eager_attention_shrinks_the_budget():
    free, total = 9 * GiB, 24 * GiB
    linear = device_batch_tokens(free, total, QWEN2_7B, 2)
    masked = device_batch_tokens(free, total, QWEN2_7B, 2, dense_attention_width=8192)
    eager = device_batch_tokens(free, total, QWEN2_7B, 2, dense_attention_width=1024, eager_attention=True)
    assert (linear, masked) == (28672, 26624)  # 8,192 mask values of 2 bytes per token
    # Eager attention: 1024 mask values of 2 bytes and 2 x 28 heads x 1024 float32 scores per token on top.
    per_token = bytes_per_token(QWEN2_7B, 2) + 1024 * 2 + 2 * 28 * 1024 * 4
    usable = free - int(0.08 * total)
    assert eager == int(usable / (per_token * 1.5)) // 1024 * 1024 == 12288


def test_the_scorer_sizes_its_budget_to_the_device(monkeypatch, tmp_path, train_tokenizer_dir):
    from conftest import make_tiny_prm

    from prmkit.scoring import StepScorer

    sc = StepScorer.from_pretrained(make_tiny_prm(tmp_path / "prm", train_tokenizer_dir), device="cpu")
    assert (sc.batch_tokens, sc.batch_tokens_source) == (2048, "cpu default")
    assert StepScorer(sc.model, sc.tokenizer, sc.params, batch_tokens=300).batch_tokens_source == "given"

    # The same scorer as if its model sat on a CUDA device with 5 GiB free of 8 GiB.
    seen = []

    def fake_memory(device):
        seen.append(device.type)
        return 5 * GiB, 8 * GiB

    monkeypatch.setattr(budget, "free_device_memory", fake_memory)
    sc.device = torch.device("cuda")
    shape = model_shape(sc.model.config)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads) == (64, 128, 4, 2)
    with prmkit_log() as records:
        tokens, source = sc._device_budget()
    assert seen == ["cuda"]
    assert tokens == device_batch_tokens(5 * GiB, 8 * GiB, shape, 4) == budget.MAX_DEVICE_BATCH_TOKENS
    assert source == "5.0 GiB free on cuda"
    assert any("batch budget 131072 tokens" in r.getMessage() for r in records)

    # Memory that cannot be read (MPS, say) keeps the fixed accelerator figure.
    monkeypatch.setattr(budget, "free_device_memory", lambda device: None)
    assert sc._device_budget() == (budget.FALLBACK_ACCELERATOR_BATCH_TOKENS, "default")


@pytest.mark.parametrize("bad", [0, -5])
def test_a_given_budget_below_one_is_refused(bad, tmp_path, train_tokenizer_dir):
    from conftest import make_tiny_prm

    from prmkit.errors import UsageError
    from prmkit.scoring import StepScorer

    sc = StepScorer.from_pretrained(make_tiny_prm(tmp_path / "prm", train_tokenizer_dir), device="cpu")
    with pytest.raises(UsageError, match="batch_tokens"):
        StepScorer(sc.model, sc.tokenizer, sc.params, batch_tokens=bad)
