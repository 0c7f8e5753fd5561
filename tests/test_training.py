"""prmkit.training.recipe and the model helpers in prmkit.models.model_dir: loss, batching, metrics, outputs, LoRA,
resuming."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_TINY_MODEL, fake_checkpoint, write_train_rows

from prmkit.config.load import load_config
from prmkit.errors import UsageError
from prmkit.tokenization import IGNORE_INDEX


def make_cfg(tmp_path: Path, model_dir: Path, train: Path, out: str = "out", eval_: Path | None = None, **keys):
    flags = {
        "model.name_or_path": str(model_dir),
        "model.init_from_config": True,
        "data.train": str(train),
        "data.eval": str(eval_) if eval_ else None,
        "train.output_dir": str(tmp_path / out),
        "train.per_device_train_batch_size": 4,
        "train.per_device_eval_batch_size": 8,
        "train.max_steps": 4,
        "train.logging_steps": 1,
        "train.save_steps": 100,
        "train.learning_rate": 1e-3,
        "train.seed": 0,
    }
    for key, value in keys.items():
        flags[key.replace("__", ".")] = value
    return load_config(None, None, flags)


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def test_soft_cross_entropy_with_hard_targets_equals_cross_entropy():
    from prmkit.kinds.heads import step_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 2, dtype=torch.float32)
    hard = torch.full((3, 7), IGNORE_INDEX, dtype=torch.long)
    hard[0, 2], hard[0, 6], hard[1, 3], hard[2, 0], hard[2, 5] = 1, 0, 1, 0, 1
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 2), hard.view(-1), ignore_index=IGNORE_INDEX)
    assert abs(step_loss(logits, hard).item() - expected.item()) < 1e-6
    assert abs(step_loss(logits, hard.float()).item() - expected.item()) < 1e-6
    # Normalised by the accumulated batch's labelled steps when the Trainer says how many there are.
    total = torch.nn.functional.cross_entropy(
        logits.view(-1, 2), hard.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert abs(step_loss(logits, hard.float(), torch.tensor(10)).item() - total.item() / 10) < 1e-6


def test_soft_and_mixed_labels():
    from prmkit.kinds.heads import step_loss

    logits = torch.tensor([[[0.2, 1.0], [2.0, -1.0], [0.0, 0.0]]])
    labels = torch.tensor([[0.3, 1.0, IGNORE_INDEX]])  # one soft label, one hard, one ignored
    lp = torch.log_softmax(logits[0, :2], dim=-1)
    expected = -((0.3 * lp[0, 1] + 0.7 * lp[0, 0]) + lp[1, 1]) / 2
    assert abs(step_loss(logits, labels).item() - expected.item()) < 1e-6


def test_label_smoothing_mixes_the_target_with_the_uniform_one():
    import math

    from prmkit.kinds.heads import step_loss

    # train.label_smoothing_factor eps: target p' = (1 - eps) * p + eps / 2, hard and soft labels alike.
    logits = torch.tensor([[[0.2, 1.0], [2.0, -1.0], [0.0, 0.0]]])
    labels = torch.tensor([[0.3, 1.0, IGNORE_INDEX]])
    eps = 0.2

    def log_softmax(a: float, b: float) -> tuple[float, float]:
        z = math.log(math.exp(a) + math.exp(b))
        return a - z, b - z

    (w0, w1), (h0, h1) = log_softmax(0.2, 1.0), log_softmax(2.0, -1.0)
    soft, hard = 0.3 * 0.8 + 0.1, 1.0 * 0.8 + 0.1  # 0.34 and 0.9
    expected = -((soft * w1 + (1 - soft) * w0) + (hard * h1 + (1 - hard) * h0)) / 2
    assert step_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(expected, abs=1e-6)
    assert step_loss(logits, labels, label_smoothing=eps).item() != pytest.approx(step_loss(logits, labels).item())
    # Hard labels: exactly torch's own label smoothing.
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 2)
    hard_labels = torch.full((3, 7), IGNORE_INDEX, dtype=torch.long)
    hard_labels[0, 2], hard_labels[0, 6], hard_labels[1, 3], hard_labels[2, 0] = 1, 0, 1, 0
    want = torch.nn.functional.cross_entropy(
        logits.view(-1, 2), hard_labels.view(-1), ignore_index=IGNORE_INDEX, label_smoothing=0.9
    )
    assert step_loss(logits, hard_labels, label_smoothing=0.9).item() == pytest.approx(want.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def _features(tokenizer_dir: Path, rows_file: Path, n: int = 6):
    from transformers import AutoTokenizer

    from prmkit.tokenization import TokenizationParams, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()[:n]]
    cols = tokenize_rows(
        tok,
        [r["prompt"] for r in rows],
        [r["completions"] for r in rows],
        [[int(x) for x in r["labels"]] for r in rows],
        TokenizationParams(),
    )
    return tok, [
        {"input_ids": i, "labels": lab, "row": k} for k, (i, lab) in enumerate(zip(cols["input_ids"], cols["labels"]))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_batching_mode_gives_the_same_loss(tmp_path, train_tokenizer_dir, attn):
    from transformers import AutoModelForTokenClassification, Qwen2Config

    from prmkit.kinds.heads import step_loss
    from prmkit.training.batching import StepCollator

    tok, feats = _features(train_tokenizer_dir, write_train_rows(tmp_path / "rows.jsonl", n=6))
    assert len({len(f["input_ids"]) for f in feats}) > 3  # lengths differ, so padding and packing really differ
    torch.manual_seed(0)
    config = Qwen2Config(
        **TRAIN_TINY_MODEL,
        vocab_size=len(tok),
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
        attn_implementation=attn,
    )
    model = AutoModelForTokenClassification.from_config(config).eval()
    losses, probs = {}, {}
    for mode, causal in (("padded", False), ("padded-causal", True), ("grouped", True), ("packed", True)):
        batch = StepCollator(tok.pad_token_id, mode.split("-")[0], causal=causal)(feats)
        assert batch["row"].tolist() == list(range(6))
        assert batch.pop("n_tokens").item() == sum(len(f["input_ids"]) for f in feats)
        batch.pop("row")
        labels = batch.pop("labels")
        # Right padding makes the mask redundant for a causal model; a bidirectional one needs it.
        assert ("attention_mask" in batch) is (not causal)
        if mode == "packed":
            assert batch["input_ids"].shape[0] == 1
            assert batch["position_ids"][0, len(feats[0]["input_ids"])].item() == 0  # restarts per sequence
        with torch.no_grad():
            logits = model(**batch).logits
        losses[mode] = step_loss(logits, labels).item()
        probs[mode] = torch.softmax(logits, -1)[..., 1][labels != IGNORE_INDEX]
    for mode in ("padded-causal", "grouped", "packed"):
        assert abs(losses[mode] - losses["padded"]) < 1e-5, mode
        assert torch.allclose(probs[mode], probs["padded"], atol=1e-5), mode


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    import random

    from prmkit.training.batching import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(20, 600) for _ in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(203))
    assert list(sampler) == first  # same epoch, same order: a resumed run replays it
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3)) == first

    def padded_tokens(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in (order[k : k + 8] for k in range(0, len(order), 8)))

    shuffled = list(range(203))
    random.Random(1).shuffle(shuffled)
    assert padded_tokens(first) < 0.75 * padded_tokens(shuffled)
    assert len(first[-(203 % 8) :]) == 203 % 8  # the one short batch is last


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def test_eval_metrics_use_labelled_positions_only():
    from transformers import EvalPrediction

    from prmkit.kinds.heads import preprocess_logits_for_metrics
    from prmkit.metrics import step_metrics
    from prmkit.training.batching import make_compute_metrics

    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, IGNORE_INDEX, 0], [0, 1, IGNORE_INDEX]])
    reduced = preprocess_logits_for_metrics(logits, labels)
    assert reduced.shape == labels.shape  # fixed shape: ranks gather without waiting on each other
    assert reduced[0, 1].item() == IGNORE_INDEX and reduced[1, 2].item() == IGNORE_INDEX
    p = torch.softmax(logits, -1)[..., 1]
    assert abs(reduced[1, 1].item() - p[1, 1].item()) < 1e-7
    # Padding added when batches are concatenated (-100 in both arrays) is ignored too.
    preds = torch.cat([reduced, torch.full((2, 2), float(IGNORE_INDEX))], dim=1).numpy()
    label_ids = torch.cat([labels, torch.full((2, 2), IGNORE_INDEX)], dim=1).numpy()
    metrics = make_compute_metrics(0.5)(EvalPrediction(predictions=preds, label_ids=label_ids))
    mask = labels != IGNORE_INDEX
    expected = step_metrics(p[mask].tolist(), labels[mask].float().tolist(), 0.5)
    assert metrics["steps"] == 4
    for key in ("accuracy", "correct_f1", "wrong_f1", "auroc"):
        assert metrics[key] == pytest.approx(expected[key])


# ---------------------------------------------------------------------------------------------------------------------
# Model checks


def test_is_causal():
    from transformers import BertConfig, LlamaConfig, Qwen2Config, T5Config

    from prmkit.models.loading import is_causal

    assert is_causal(Qwen2Config())
    assert is_causal(LlamaConfig())
    assert not is_causal(BertConfig())
    assert is_causal(BertConfig(is_decoder=True))
    assert not is_causal(T5Config())


def test_bidirectional_model_is_refused_before_any_data_work(tmp_path, train_tokenizer_dir):
    from transformers import BertConfig

    from prmkit.models.loading import load_model_config
    from prmkit.training.recipe import train

    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=4000
    ).save_pretrained(bert)
    cfg = make_cfg(tmp_path, bert, tmp_path / "missing.jsonl", **{"model__tokenizer": str(train_tokenizer_dir)})
    with pytest.raises(UsageError, match="sees steps 3, 4") as err:
        train(cfg)
    assert "allow_bidirectional" in err.value.hint
    assert not (tmp_path / "out").exists()
    cfg.model.allow_bidirectional = True
    assert load_model_config(cfg.model).model_type == "bert"


def test_pad_token_falls_back_to_eos_with_a_warning(train_tokenizer_dir, caplog):
    from transformers import AutoTokenizer

    from prmkit.models.loading import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    tok.pad_token = None
    with caplog.at_level(logging.WARNING, logger="prmkit"):
        ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text and "EOS" in caplog.text


def test_disable_dropout():
    from transformers import AutoModelForTokenClassification, Qwen2Config

    from prmkit.models.loading import disable_dropout

    model = AutoModelForTokenClassification.from_config(
        Qwen2Config(**TRAIN_TINY_MODEL, vocab_size=50, num_labels=2, attention_dropout=0.1)
    )
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.slow
def test_train_writes_a_self_describing_model_dir(tmp_path, tiny_qwen2_config_dir, monkeypatch):
    from prmkit.models.loading import load_trained_model
    from prmkit.training.recipe import train

    pushed = {}

    def fake_push(model_dir, repo_id, **kwargs):
        pushed.update(model_dir=str(model_dir), repo_id=repo_id, **kwargs)
        return None

    import prmkit.hub

    monkeypatch.setattr(prmkit.hub, "push_model", fake_push)
    train_file = write_train_rows(tmp_path / "train.jsonl", n=16, soft=True)
    eval_file = write_train_rows(tmp_path / "eval.jsonl", n=9, seed=1)
    cfg = make_cfg(
        tmp_path,
        tiny_qwen2_config_dir,
        train_file,
        eval_=eval_file,
        **{
            "train__push_to_hub": True,
            "push__repo_id": "me/tiny-prm",
            "data__step_separator": "\n\n",
            "train__hub_token": "hf_TrainSecret0123456789abcdef",
        },
    )
    result = train(cfg)
    out = tmp_path / "out"
    assert result.model_dir == str(out) and result.global_step == 4 and not result.interrupted
    assert result.tokens > 0 and result.train_loss is not None and result.batching == "grouped"
    assert {"accuracy", "correct_f1", "wrong_f1", "loss"} <= set(result.eval_metrics)
    assert result.eval_metrics["steps"] > 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "prmkit.json", "prmkit_config.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not (out / ".prmkit-final").exists()
    meta = json.loads((out / "prmkit.json").read_text())
    assert meta["tokenization"]["step_separator"] == "\n\n"
    assert meta["labels"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert meta["base_model"] == str(tiny_qwen2_config_dir)
    assert meta["data"]["sources"] == {"train": str(train_file), "eval": str(eval_file)}
    assert meta["training"]["learning_rate"] == 1e-3 and meta["training"]["global_step"] == 4
    assert meta["batching"] == "grouped" and meta["lora"] is None and meta["prmkit_version"]
    from transformers import AutoConfig

    # transformers 5 leaves the default mapping out of config.json; loading gives it back.
    assert AutoConfig.from_pretrained(out).id2label == {0: "LABEL_0", 1: "LABEL_1"}
    resolved = load_config(out / "prmkit_config.yaml")
    assert resolved.data.step_separator == "\n\n" and resolved.training_arguments["max_steps"] == 4
    model = load_trained_model(out)
    assert model.config.num_labels == 2
    assert pushed["repo_id"] == "me/tiny-prm" and pushed["model_dir"] == str(out)
    # The token pushes, and lands in no file: not the config, prmkit.json, nor a checkpoint's pickled arguments.
    assert pushed["token"] == "hf_TrainSecret0123456789abcdef"
    assert yaml.safe_load((out / "prmkit_config.yaml").read_text())["train"]["hub_token"] == "***"
    assert list(out.glob("checkpoint-*/training_args.bin"))
    leaks = [p for p in out.rglob("*") if p.is_file() and b"TrainSecret" in p.read_bytes()]
    assert leaks == []


def _logits_callback(store: dict, input_ids: torch.Tensor):
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                store["logits"] = model(input_ids=input_ids).logits.clone()

    return Capture()


@pytest.mark.slow
@pytest.mark.parametrize("merge", [True, False])
def test_lora_output_reloads_with_the_logits_it_had_in_memory(tmp_path, tiny_qwen2_config_dir, merge):
    from safetensors.torch import load_file

    from prmkit.models.loading import load_trained_model
    from prmkit.training.recipe import train

    cfg = make_cfg(
        tmp_path,
        tiny_qwen2_config_dir,
        write_train_rows(tmp_path / "train.jsonl", n=12),
        **{
            "train__lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train__lora_merge": merge,
            "train__learning_rate": 5e-2,
            "train__max_steps": 3,
        },
    )
    store: dict = {}
    input_ids = torch.tensor([[5, 17, 240, 99, 3, 8, 61, 12]])
    result = train(cfg, callbacks=[_logits_callback(store, input_ids)])
    out = tmp_path / "out"
    assert result.lora["modules_to_save"] == ["score"] and result.lora["merged"] is merge
    meta = json.loads((out / "prmkit.json").read_text())
    assert meta["lora"]["r"] == 4
    adapter_dir = out / meta["adapter_dir"]
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # training moved the adapter
    assert any("score" in k for k in adapter)  # the head is saved with it, not left random
    if merge:
        assert (out / "model.safetensors").is_file() and not any("lora" in k for k in read_weights(out))
    else:
        assert not (out / "model.safetensors").exists() and (out / "base_model" / "model.safetensors").is_file()
    reloaded = load_trained_model(out)
    with torch.no_grad():
        again = reloaded(input_ids=input_ids).logits
    assert torch.allclose(again, store["logits"], atol=1e-5), (again - store["logits"]).abs().max()


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_qwen2_config_dir):
    from transformers import TrainerCallback

    from prmkit.training.recipe import train

    rows = write_train_rows(tmp_path / "train.jsonl", n=20, soft=True)
    keys = {"train__max_steps": 9, "train__save_steps": 3}  # 5 steps per epoch: the kill lands in epoch 2
    full = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="full", **keys))

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise _Killed

    with pytest.raises(_Killed):
        train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="killed", **keys), callbacks=[KillAfterSave()])
    assert (tmp_path / "killed" / "checkpoint-6").is_dir() and not (tmp_path / "killed" / "prmkit.json").exists()
    with pytest.raises(UsageError, match="already holds this run"):
        train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="killed", **keys))
    resumed = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="killed", **keys), resume=True)
    assert resumed.resumed_from.endswith("checkpoint-6") and resumed.global_step == 9
    a, b = read_weights(tmp_path / "full"), read_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert full.global_step == 9


@pytest.mark.slow
def test_resuming_from_the_last_steps_checkpoint_saves_the_same_model_without_training(tmp_path, tiny_qwen2_config_dir):
    import shutil

    from transformers import TrainerCallback

    from prmkit.training.recipe import train

    # What a kill during the final save leaves: checkpoint-3 of a 3-step run (mid-epoch: 5 steps make an epoch).
    rows = write_train_rows(tmp_path / "train.jsonl", n=20)
    keys = {
        "train__max_steps": 3,
        "train__save_steps": 3,
        "train__lr_scheduler_type": "constant",
        "train__save_strategy": "epoch",
    }
    full = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="full", eval_=rows, **keys))
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", copy / "checkpoint-3")
    shutil.copy(tmp_path / "full" / "prmkit_config.yaml", copy)
    events = []

    class Events(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            events.append("save")

        def on_evaluate(self, args, state, control, **kwargs):
            events.append("evaluate")

    resumed = train(
        make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="copy", eval_=rows, **keys),
        resume=True,
        callbacks=[Events()],
    )
    # Nothing saved again or evaluated again at the epoch's end; the evaluation at step 3 is the checkpoint's.
    assert events == []
    assert resumed.global_step == 3 and resumed.max_steps == 3 and resumed.tokens == 0 and resumed.train_loss is None
    assert resumed.model_dir == str(copy) and resumed.eval_metrics == full.eval_metrics
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((copy / "prmkit.json").read_text())["training"]["global_step"] == 3
    a, b = read_weights(tmp_path / "full"), read_weights(copy)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["token-classification", "lm-tag"])
def test_label_smoothing_changes_training_and_is_recorded(tmp_path, tiny_qwen2_config_dir, kind):
    from prmkit.training.recipe import train

    rows = write_train_rows(tmp_path / "train.jsonl", n=8, soft=True)
    keys = {"train__max_steps": 2, "train__kind": kind}
    plain = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="plain", **keys))
    smoothed = train(
        make_cfg(tmp_path, tiny_qwen2_config_dir, rows, out="smooth", train__label_smoothing_factor=0.9, **keys)
    )
    # Same initial weights and batches: the first step's loss differs only by the smoothing.
    # (lm-tag starts near p = 0.5 over its two tokens, where smoothing moves the loss least: about 1e-4)
    assert smoothed.loss_history[0][1] != pytest.approx(plain.loss_history[0][1], abs=1e-6)
    a, b = read_weights(tmp_path / "plain"), read_weights(tmp_path / "smooth")
    assert any(not torch.equal(a[key], b[key]) for key in a)
    meta = json.loads((tmp_path / "smooth" / "prmkit.json").read_text())
    assert meta["training"]["label_smoothing_factor"] == 0.9


@pytest.mark.slow
def test_a_sequential_train_sampling_strategy_is_honoured(tmp_path, tiny_qwen2_config_dir, monkeypatch):
    from prmkit.training.recipe import train

    # `auto` batching would group by length with prmkit's own sampler; the order asked for is kept instead.
    monkeypatch.setenv("PRMKIT_DEBUG_ROWS_DIR", str(tmp_path / "rows"))
    rows = write_train_rows(tmp_path / "train.jsonl", n=12)
    result = train(
        make_cfg(tmp_path, tiny_qwen2_config_dir, rows, train__max_steps=3, train__train_sampling_strategy="sequential")
    )
    assert result.batching == "padded"
    assert json.loads((tmp_path / "rows" / "rows-rank0.json").read_text()) == list(range(1, 13))  # line numbers


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_the_run_resumes(tmp_path, tiny_qwen2_config_dir):
    from transformers import TrainerCallback

    from prmkit.training.recipe import train

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    rows = write_train_rows(tmp_path / "train.jsonl", n=16)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a CI runner's background job
    result = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows), callbacks=[CtrlC()])
    out = tmp_path / "out"
    assert result.interrupted and result.model_dir is None and result.global_step == 2
    assert result.checkpoint == str(out / "checkpoint-2") and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / "prmkit.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    done = train(make_cfg(tmp_path, tiny_qwen2_config_dir, rows), resume=True)
    assert done.global_step == 4 and (out / "prmkit.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Output directory rules (no training)


def test_output_dir_rules(tmp_path, tiny_qwen2_config_dir, monkeypatch):
    from prmkit.config.load import dump_config
    from prmkit.training.run_dir import plan_output_dir

    rows = tmp_path / "rows.jsonl"
    cfg = make_cfg(tmp_path, tiny_qwen2_config_dir, rows)
    out = tmp_path / "out"
    assert plan_output_dir(cfg).action == "fresh"
    with pytest.raises(UsageError, match="nothing to resume"):
        plan_output_dir(cfg, resume=True)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no prmkit run"):
        plan_output_dir(cfg)
    assert plan_output_dir(cfg, overwrite=True).action == "overwrite"
    (out / "notes.txt").unlink()
    (out / "prmkit_config.yaml").write_text(dump_config(cfg))
    with pytest.raises(UsageError, match="already holds this run") as err:
        plan_output_dir(cfg)
    assert "--overwrite" in err.value.hint
    with pytest.raises(UsageError, match="no checkpoint yet"):
        plan_output_dir(cfg, resume=True)
    fake_checkpoint(out / "checkpoint-3", 3)
    fake_checkpoint(out / "checkpoint-12", 12)
    plan = plan_output_dir(cfg, resume=True)
    assert plan.action == "resume" and plan.checkpoint == str(out / "checkpoint-12") and plan.skipped == []
    longer = make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **{"train__max_steps": 40, "train__save_steps": 7})
    with pytest.raises(UsageError, match=r"differs from its prmkit_config.yaml: train.max_steps \(was 4, now 40\)$"):
        plan_output_dir(longer, resume=True)  # the run's length changes only when asked for
    assert plan_output_dir(longer, resume=True, accept_changes=True).action == "resume"
    other = make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **{"train__learning_rate": 3e-4})
    with pytest.raises(UsageError, match=r"different run \(train.learning_rate differ\)"):
        plan_output_dir(other)
    with pytest.raises(UsageError, match=r"train.learning_rate \(was 0.001, now 0.0003\)"):
        plan_output_dir(other, resume=True)
    with pytest.raises(UsageError, match="contradict"):
        plan_output_dir(cfg, resume=True, overwrite=True)
    monkeypatch.chdir(out)
    here = make_cfg(tmp_path, tiny_qwen2_config_dir, rows, **{"train__output_dir": "."})
    with pytest.raises(UsageError, match="refusing to delete"):
        plan_output_dir(here, overwrite=True)


def test_the_hint_for_a_run_already_there_reads_with_and_without_a_checkpoint(tmp_path, tiny_qwen2_config_dir):
    from prmkit.config.load import dump_config
    from prmkit.training.run_dir import plan_output_dir

    cfg = make_cfg(tmp_path, tiny_qwen2_config_dir, tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "prmkit_config.yaml").write_text(dump_config(cfg))
    with pytest.raises(UsageError, match="already holds this run") as err:
        plan_output_dir(cfg)
    assert err.value.hint == "pass --overwrite to start over (it holds no checkpoint to resume from)"
    fake_checkpoint(out / "checkpoint-3", 3)
    with pytest.raises(UsageError, match="already holds this run") as err:
        plan_output_dir(cfg)
    assert err.value.hint == "pass --resume to continue from checkpoint-3, or --overwrite to start over"


def test_example_fills_in_only_defaults(tmp_path):
    from prmkit.training.example import EXAMPLE_EVAL, EXAMPLE_TRAIN
    from prmkit.training.recipe import resolve_config

    cfg = resolve_config(
        load_config(None, ["train.learning_rate=0.0003", "data.max_length=300"], {"train.example": True})
    )
    assert cfg.data.train == str(EXAMPLE_TRAIN) and cfg.data.eval == str(EXAMPLE_EVAL)
    assert cfg.model.init_from_config and (Path(cfg.model.name_or_path) / "config.json").is_file()
    assert cfg.training_arguments["learning_rate"] == 3e-4  # set by the user: kept
    assert cfg.data.max_length == 300
    assert cfg.training_arguments["output_dir"] == "runs/example"
    assert cfg.training_arguments["num_train_epochs"] == 3
    again = resolve_config(load_config(None, None, {"train.example": True}))
    assert again.model.name_or_path == cfg.model.name_or_path  # built once, then cached
    assert yaml.safe_load((Path(cfg.model.name_or_path) / "config.json").read_text())["model_type"] == "qwen2"


def test_example_never_replaces_an_explicit_setting_even_one_equal_to_the_default(tmp_path):
    from prmkit.config.schema import TRAINING_ARGUMENT_DEFAULTS, DataConfig
    from prmkit.training.example import EXAMPLE_TRAIN
    from prmkit.training.recipe import resolve_config

    explicit = [
        "train.save_strategy=steps",
        "train.logging_steps=10",
        "data.max_length=1024",
        "data.eval=null",
        "train.output_dir=runs/prm",
    ]
    cfg = resolve_config(load_config(None, explicit, {"train.example": True}))
    assert cfg.training_arguments["save_strategy"] == "steps" == TRAINING_ARGUMENT_DEFAULTS["save_strategy"]
    assert cfg.training_arguments["logging_steps"] == 10 == TRAINING_ARGUMENT_DEFAULTS["logging_steps"]
    assert cfg.data.max_length == 1024 == DataConfig().max_length
    assert cfg.data.eval is None  # an explicit null: train without eval
    assert cfg.training_arguments["output_dir"] == "runs/prm"
    assert cfg.data.train == str(EXAMPLE_TRAIN)
    assert cfg.training_arguments["eval_strategy"] == "epoch"  # not set by the user: the example's
    # The same from a config file, and from Python with a changed value.
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  save_strategy: steps\n  learning_rate: 1.0e-05\n")
    from_file = resolve_config(load_config(path, None, {"train.example": True}))
    assert from_file.training_arguments["save_strategy"] == "steps"
    assert from_file.training_arguments["learning_rate"] == 1e-5
    assert from_file.explicit >= {"train.save_strategy", "train.learning_rate", "train.example"}
