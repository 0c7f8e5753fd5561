"""prmkit.training.batching and prmkit.training.kernels: collation without per-token loops, packing with a
variable-length attention
kernel (FlexAttention here, flash-attention on a GPU), `batching: auto`, Liger's gate and torch_compile."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import TRAIN_TINY_MODEL, write_train_rows

from prmkit.kinds.heads import step_loss
from prmkit.tokenization import IGNORE_INDEX
from prmkit.training.batching import StepCollator, resolve_batching


def _rows(n: int = 7, soft: bool = False, seed: int = 0):
    rng = random.Random(seed)
    feats = []
    for r in range(n):
        length = rng.randint(1, 40)
        labels = [IGNORE_INDEX] * length
        for pos in rng.sample(range(length), k=min(length, 3)):
            labels[pos] = round(rng.random(), 3) if soft else rng.randint(0, 1)
        feats.append({"input_ids": [rng.randint(1, 99) for _ in range(length)], "labels": labels, "row": 100 + r})
    return feats


def _reference(feats, mode, pad, soft):
    """What the collator did before: Python loops over every token."""
    ldtype = torch.float32 if soft else torch.long
    ids = [[int(t) for t in f["input_ids"]] for f in feats]
    labels = [[(float if soft else int)(x) for x in f["labels"]] for f in feats]
    if mode == "packed":
        return {
            "input_ids": torch.tensor([[t for s in ids for t in s]]),
            "position_ids": torch.tensor([[p for s in ids for p in range(len(s))]]),
            "labels": torch.tensor([[x for s in labels for x in s]], dtype=ldtype),
        }
    width = max(len(s) for s in ids)
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
        "labels": torch.tensor([s + [IGNORE_INDEX] * (width - len(s)) for s in labels], dtype=ldtype),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
    }


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mode", ["padded", "grouped", "packed"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_collator_equals_the_per_token_reference(mode, soft, as_numpy):
    feats = _rows(soft=soft)
    if as_numpy:  # what a dataset formatted as numpy hands the collator in training
        feats = [
            {
                "input_ids": np.asarray(f["input_ids"], dtype=np.int32),
                "labels": np.asarray(f["labels"], dtype=np.float32 if soft else np.int64),
                "row": np.int64(f["row"]),
            }
            for f in feats
        ]
    batch = StepCollator(7, mode, soft_labels=soft, causal=False)(feats)
    expected = _reference(feats, mode, 7, soft)
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype, key
        assert torch.equal(batch[key], value), key
    assert batch["n_tokens"].item() == sum(len(f["input_ids"]) for f in feats)
    assert batch["row"].tolist() == [100 + r for r in range(len(feats))]
    if mode != "packed":
        assert "attention_mask" not in StepCollator(7, mode, causal=True)(feats)


def _tiny(tok, attn: str, seed: int = 0):
    from transformers import AutoModelForTokenClassification, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        **TRAIN_TINY_MODEL,
        vocab_size=len(tok),
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
        classifier_dropout=0.0,
    )
    return AutoModelForTokenClassification.from_config(config, attn_implementation=attn, dtype=torch.float32)


def _features(tok, path, n=8):
    import json

    from prmkit.tokenization import TokenizationParams, tokenize_rows

    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    cols = tokenize_rows(
        tok,
        [r["prompt"] for r in rows],
        [r["completions"] for r in rows],
        [[int(x) for x in r["labels"]] for r in rows],
        TokenizationParams(),
    )
    return [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"])]


@pytest.mark.slow
def test_packed_flex_attention_loss_equals_the_unpacked_run(tmp_path, train_tokenizer_dir):
    """FlexAttention with the document mask transformers builds from restarting position_ids: each packed sequence
    sees only itself, so loss and step probabilities equal padded SDPA batches (fp32 on CPU: 1e-5). Flex has no
    backward pass on CPU; its gradients are checked on a GPU (below) and by bench/gpu_train.py."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    feats = _features(tok, write_train_rows(tmp_path / "rows.jsonl", n=8))
    assert len({len(f["input_ids"]) for f in feats}) > 4
    flex = _tiny(tok, "flex_attention").eval()
    sdpa = _tiny(tok, "sdpa").eval()
    assert flex.config._attn_implementation == "flex_attention"
    sdpa.load_state_dict(flex.state_dict())
    packed = StepCollator(tok.pad_token_id, "packed", causal=True)(feats)
    padded = StepCollator(tok.pad_token_id, "grouped", causal=True)(feats)
    with torch.no_grad():
        flex_logits = flex(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        sdpa_logits = sdpa(input_ids=padded["input_ids"]).logits
        # Without the document mask the packed sequences would read each other: the check can fail.
        leaky = flex(input_ids=packed["input_ids"]).logits
    packed_loss = step_loss(flex_logits, packed["labels"]).item()
    padded_loss = step_loss(sdpa_logits, padded["labels"]).item()
    assert abs(packed_loss - padded_loss) < 1e-5
    p_packed = torch.softmax(flex_logits, -1)[..., 1][packed["labels"] != IGNORE_INDEX]
    p_padded = torch.softmax(sdpa_logits, -1)[..., 1][padded["labels"] != IGNORE_INDEX]
    assert torch.allclose(p_packed, p_padded, atol=1e-5)
    assert abs(step_loss(leaky, packed["labels"]).item() - padded_loss) > 1e-3


@pytest.mark.slow
def test_packed_training_step_equals_the_unpacked_one(tmp_path, train_tokenizer_dir):
    """One optimizer step on a pack (block-diagonal mask from position_ids) gives the gradients of padded batches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    feats = _features(tok, write_train_rows(tmp_path / "rows.jsonl", n=8))
    grads = {}
    for mode in ("grouped", "packed"):
        model = _tiny(tok, "sdpa").train()
        batch = StepCollator(tok.pad_token_id, mode, causal=True)(feats)
        inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
        step_loss(model(**inputs).logits, batch["labels"]).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["grouped"].items():
        assert torch.allclose(grads["packed"][name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlexAttention has no backward on CPU)")
def test_flex_packed_gradients_match_padded_on_cuda(tmp_path, train_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    feats = _features(tok, write_train_rows(tmp_path / "rows.jsonl", n=8))
    grads, losses = {}, {}
    for mode, attn in (("grouped", "sdpa"), ("packed", "flex_attention")):
        model = _tiny(tok, attn).cuda().train()
        batch = StepCollator(tok.pad_token_id, mode, causal=True)(feats)
        inputs = {k: batch[k].cuda() for k in ("input_ids", "position_ids") if k in batch}
        loss = step_loss(model(**inputs).logits, batch["labels"].cuda())
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    assert abs(losses["packed"] - losses["grouped"]) < 1e-4
    for name, grad in grads["grouped"].items():
        assert torch.allclose(grads["packed"][name], grad, atol=1e-4, rtol=1e-3), name


def test_auto_batching_packs_only_on_cuda_with_a_varlen_kernel():
    flex, flash = ["flex_attention"], ["flash_attention_2", "flex_attention"]
    # CPU: length-grouped padding whatever is installed; an explicit pack keeps the default (dense-mask) attention.
    assert resolve_batching("auto", None, cuda=False, kernels=flash) == ("grouped", None)
    assert resolve_batching("packed", None, cuda=False, kernels=flash) == ("packed", None)
    # CUDA: pack with the best kernel there is; flash-attention first.
    assert resolve_batching("auto", None, cuda=True, kernels=flex) == ("packed", "flex_attention")
    assert resolve_batching("auto", None, cuda=True, kernels=flash) == ("packed", "flash_attention_2")
    assert resolve_batching("packed", None, cuda=True, kernels=flex) == ("packed", "flex_attention")
    # No kernel, a kernel the user ruled out, or a bidirectional model: grouped.
    assert resolve_batching("auto", None, cuda=True, kernels=[]) == ("grouped", None)
    assert resolve_batching("auto", "sdpa", cuda=True, kernels=flash) == ("grouped", "sdpa")
    assert resolve_batching("auto", None, cuda=True, causal=False, kernels=flash) == ("grouped", None)
    # The user's own varlen choice packs; explicit modes are kept.
    assert resolve_batching("auto", "flash_attention_2", cuda=True, kernels=[]) == ("packed", "flash_attention_2")
    assert resolve_batching("grouped", None, cuda=True, kernels=flash) == ("grouped", None)
    assert resolve_batching("padded", "eager", cuda=False) == ("padded", "eager")


def test_varlen_kernels_respect_the_model_class():
    from transformers import Qwen2Config

    from prmkit.training.kernels import model_class_for, varlen_kernels_available

    cls = model_class_for(Qwen2Config())
    assert cls.__name__ == "Qwen2ForTokenClassification"
    assert model_class_for(Qwen2Config(), "lm-tag").__name__ == "Qwen2ForCausalLM"
    found = varlen_kernels_available(cls)
    assert "flex_attention" in found  # torch >= 2.5 ships FlexAttention

    class NoFlex:
        _supports_flex_attn = False
        _supports_flash_attn = False

    assert varlen_kernels_available(NoFlex) == []


# ---------------------------------------------------------------------------------------------------------------------
# Liger and torch_compile


def test_liger_is_gated_to_what_applies_to_a_prm():
    from prmkit.errors import ConfigError
    from prmkit.training.kernels import LIGER_DEFAULTS, liger_kernel_config

    with pytest.raises(ConfigError, match="not installed") as err:
        liger_kernel_config(None, cuda=True, installed=False)
    assert "prmkit[liger]" in err.value.hint
    with pytest.raises(ConfigError, match="need a CUDA device"):
        liger_kernel_config(None, cuda=False, installed=True)
    for key in ("fused_linear_cross_entropy", "cross_entropy"):
        with pytest.raises(ConfigError, match="no token-classification path"):
            liger_kernel_config({key: True}, cuda=True, installed=True)
    cfg = liger_kernel_config({"swiglu": False}, cuda=True, installed=True)
    assert cfg == {**LIGER_DEFAULTS, "swiglu": False}
    assert cfg["fused_linear_cross_entropy"] is False and cfg["cross_entropy"] is False and cfg["rms_norm"] is True


def test_liger_on_cpu_is_a_config_error_before_training(tmp_path, tiny_qwen2_config_dir):
    from prmkit.config.load import load_config
    from prmkit.errors import ConfigError
    from prmkit.training.recipe import build_training_arguments

    cfg = load_config(None, ["train.use_liger_kernel=true", f"train.output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="train.use_liger_kernel"):
        build_training_arguments(cfg, has_eval=False)


def test_a_replaced_forward_is_refused(train_tokenizer_dir):
    from transformers import AutoTokenizer

    from prmkit.errors import ConfigError
    from prmkit.training.kernels import check_forward_untouched

    model = _tiny(AutoTokenizer.from_pretrained(train_tokenizer_dir), "sdpa")
    check_forward_untouched(model)
    model.forward = lambda *a, **k: None  # what Liger's fused linear cross-entropy does to a causal LM
    with pytest.raises(ConfigError, match="forward was replaced"):
        check_forward_untouched(torch.nn.Sequential(model))


@pytest.mark.slow
def test_torch_compile_passes_through_and_trains_the_same(tmp_path, tiny_qwen2_config_dir):
    """train.torch_compile reaches the Trainer, which compiles the model; the losses equal the eager run's. The
    aot_eager backend runs dynamo and AOTAutograd, the parts prmkit's batches and loss go through, without a C++
    build (inductor takes minutes on a 2-core CPU)."""
    import torch._dynamo

    from prmkit.config.load import load_config
    from prmkit.training.recipe import train

    def cfg(out, **extra):
        flags = {
            "model.name_or_path": str(tiny_qwen2_config_dir),
            "model.init_from_config": True,
            "data.train": str(write_train_rows(tmp_path / "rows.jsonl", n=8)),
            "train.output_dir": str(tmp_path / out),
            "train.per_device_train_batch_size": 4,
            "train.max_steps": 2,
            "train.logging_steps": 1,
            "train.save_strategy": "no",
            "train.learning_rate": 1e-3,
            "train.seed": 0,
            **extra,
        }
        return load_config(None, None, flags)

    eager = train(cfg("eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(cfg("compiled", **{"train.torch_compile": True, "train.torch_compile_backend": "aot_eager"}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was really compiled
    assert [s for s, _ in compiled.loss_history] == [1, 2]
    for (_, a), (_, b) in zip(eager.loss_history, compiled.loss_history):
        assert abs(a - b) < 1e-4
    torch._dynamo.reset()
