"""PRM kinds: each published kind is scored exactly where its authors' own usage code reads it.

Every reference below is written from the model card's usage code (prefix by prefix, or turn by turn), independent of
prmkit's one-pass engine, on a tiny random model of the right architecture built offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prmkit.errors import DataError, UsageError

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SOLUTIONS = [
    ("Which number is larger, 9.8 or 9.11?", ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 42."]),
    ("The first equation is 3p + e = 124.", ["Let's call the price of a pencil p.", "We check: 6 * 7 = 42."]),
    ("What is 6 * 7?", ["So the answer is 42."]),
]


def _tokenizer(path: Path, *, specials: list[str], added: list[str] = (), template: str | None = None, bos: bool):
    """A tiny byte-level BPE with the given special tokens, a BOS post-processor (Llama-like) or none (Qwen-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import _CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(([*_CORPUS, "a + b - c + d - e"]) * 20, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    kwargs = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": specials}
    if bos:
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if added:
        fast.add_tokens(list(added))
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return fast


def _llama(path: Path, tok, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def lm_tag_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "math-shepherd-like"
    tok = _tokenizer(path, specials=[], added=["ки"], bos=True)
    return path, tok, _llama(path, tok, seed=1)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "rlhflow-like"
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _tokenizer(path, specials=specials, template=LLAMA3_TEMPLATE, bos=True)
    return path, tok, _llama(path, tok, seed=2)


@pytest.fixture(scope="module")
def qwen_prm_model(tmp_path_factory):
    import torch
    from transformers import Qwen2Config

    from prmkit.kinds.heads import qwen_prm_class

    path = tmp_path_factory.mktemp("kinds") / "qwen-prm-like"
    tok = _tokenizer(path, specials=["<|im_start|>", "<|im_end|>", "<extra_0>"], template=CHATML_TEMPLATE, bos=False)
    torch.manual_seed(3)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    model = qwen_prm_class()(cfg).eval()
    for p in model.score.parameters():  # post_init's small init makes every softmax ~0.5; spread the scores
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(path)
    # As published: the remote-code class named in config.json, which prmkit must not need.
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Qwen2ForProcessRewardModel"]
    config["auto_map"] = {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    (path / "config.json").write_text(json.dumps(config))
    return path, tok, model


def _scorer(path, **settings):
    from prmkit.scoring import StepScorer

    return StepScorer.from_pretrained(path, dtype="float32", device="cpu", kind_settings=settings or None)


# ---------------------------------------------------------------------------------------------------------------------
# References from the model cards


def reference_math_shepherd(model, tok, question: str, steps: list[str]) -> list[float]:
    """peiyi9979/math-shepherd-mistral-7b-prm's usage code."""
    import torch

    good_token, bad_token, step_tag = "+", "-", "ки"
    candidate_tokens = tok.encode(f"{good_token} {bad_token}")[1:]
    step_tag_id = tok.encode(f"{step_tag}")[-1]
    output = "\n".join(f"{s} {step_tag}" for s in steps)
    input_id = torch.tensor([tok.encode(f"{question} {output}")])
    with torch.no_grad():
        logits = model(input_id).logits[:, :, candidate_tokens]
        scores = logits.softmax(dim=-1)[:, :, 0]
        return scores[input_id == step_tag_id].tolist()


def reference_openrlhf(model, tok, question: str, steps: list[str]) -> list[float]:
    """OpenRLHF's reading of an lm-tag PRM: `convert_token_to_id` encodes each reward token and the placeholder on
    its own (`tokenizer.encode(token, add_special_tokens=False)`, exactly one id)."""
    import torch

    def convert_token_to_id(token):
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1
        return ids[0]

    reward_ids = [convert_token_to_id("+"), convert_token_to_id("-")]
    tag_id = convert_token_to_id("ки")
    input_id = torch.tensor([tok.encode(f"{question} " + "\n".join(f"{s} ки" for s in steps))])
    with torch.no_grad():
        scores = model(input_id).logits[:, :, reward_ids].softmax(dim=-1)[:, :, 0]
    return scores[input_id == tag_id].tolist()


def reference_rlhflow(model, tok, question: str, steps: list[str]) -> list[float]:
    """RLHFlow/Llama3.1-8B-PRM-*'s usage code: one forward pass per turn, read at -3."""
    import torch

    candidate_tokens = [tok.encode("+")[-1], tok.encode("-")[-1]]
    conversation, out = [], []
    for k, step in enumerate(steps):
        conversation.append({"content": question + " " + step if k == 0 else step, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        text = tok.apply_chat_template(conversation, tokenize=False)
        input_ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids).logits[:, -3, candidate_tokens]
        out.append(logits.softmax(dim=-1)[:, 0].item())
    return out


def reference_qwen_prm(path: Path, tok, question: str, steps: list[str]) -> list[float]:
    """Qwen2.5-Math-PRM's usage code, with the head computed here from the saved weights (not prmkit's class)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config.from_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    body = Qwen2Model(cfg).eval()
    body.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    conversation_str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    input_ids = torch.tensor([tok.encode(conversation_str)])
    with torch.no_grad():
        hidden = body(input_ids=input_ids).last_hidden_state
        h = F.relu(F.linear(hidden, state["score.0.weight"], state["score.0.bias"]))
        logits = F.linear(h, state["score.2.weight"], state["score.2.bias"])
    step_sep_id = tok.encode("<extra_0>")[0]
    token_masks = input_ids == step_sep_id
    probabilities = F.softmax(logits, dim=-1) * token_masks.unsqueeze(-1)
    sample = probabilities[0]
    return sample[sample != 0].view(-1, 2)[:, 1].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Scores equal the references


def _assert_close(got, want):
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=2e-6)


def test_lm_tag_on_a_byte_level_bpe_reads_the_reward_tokens_as_openrlhf_does(lm_tag_model):
    """A byte-level BPE (Qwen2, Llama 3) encodes "+ -" as `+`, ` -`: the card's reading takes a pair no trainer meant.
    OpenRLHF, which trained lm-tag PRMs on such bases, encodes each reward token on its own."""
    from transformers import AutoTokenizer

    path, _, model = lm_tag_model
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode("+ -", add_special_tokens=False)[1] != tok.encode("-", add_special_tokens=False)[0]
    scorer = _scorer(path)  # detected: the tag is an added token of this tokenizer
    assert scorer.kind_encoder.kind == "lm-tag"
    got = scorer.score_batch(SOLUTIONS)
    for (q, steps), scores in zip(SOLUTIONS, got):
        _assert_close(scores, reference_openrlhf(model, tok, q, steps))
    assert len({round(s, 6) for row in got for s in row}) > 3  # the scores really vary
    assert scorer.identity["kind"]["reward_token_ids"] == [tok.encode(t, add_special_tokens=False)[0] for t in "+-"]


def _sentencepiece_tokenizer(path: Path):
    """A Llama-2-like tokenizer: SentencePiece-style BPE (a `▁` word prefix, prepended to the first word) with a BOS,
    trained offline; `ки` is an ordinary piece of its vocabulary, as in Mistral's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(([*_CORPUS, "a + b - c ки d + e - f ки"]) * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.save_pretrained(path)
    return fast


def test_lm_tag_on_a_sentencepiece_tokenizer_reads_the_math_shepherd_card(tmp_path):
    """On SentencePiece (Mistral, Llama 2) encoding each token alone gives the card's ids, `▁+` and `▁-`."""
    from transformers import AutoTokenizer

    path = tmp_path / "sp-lm-tag"
    sp = _sentencepiece_tokenizer(path)
    assert sp.convert_ids_to_tokens(sp.encode("+ -", add_special_tokens=False)) == ["▁+", "▁-"]
    model = _llama(path, sp, seed=3)
    tok = AutoTokenizer.from_pretrained(path)  # as the model card loads it
    scorer = _scorer(path, kind="lm-tag")
    assert scorer.kind_encoder.reward_ids == tuple(tok.encode("+ -")[1:])
    got = scorer.score_batch(SOLUTIONS)
    for (q, steps), scores in zip(SOLUTIONS, got):
        _assert_close(scores, reference_math_shepherd(model, tok, q, steps))
    assert len({round(s, 6) for row in got for s in row}) > 3


@pytest.mark.slow
def test_lm_tag_with_the_qwen2_tokenizer_scores_as_openrlhf_reads_it(tmp_path):
    """An OpenRLHF-trained lm-tag PRM on a Qwen2 base: `+` and `-` (ids 10 and 12), not `+` and ` -` (481)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import QWEN2_TOKENIZER

    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip("needs ../shared/fixtures/qwen2-tokenizer")
    path = tmp_path / "qwen2-lm-tag"
    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": ["ки"]})  # OpenRLHF's placeholder token, kept whole
    tok.save_pretrained(path)
    torch.manual_seed(5)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tok),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    scorer = _scorer(path, kind="lm-tag")
    assert scorer.kind_encoder.reward_ids == (10, 12)
    got = scorer.score_batch(SOLUTIONS)
    for (q, steps), scores in zip(SOLUTIONS, got):
        assert scores == pytest.approx(reference_openrlhf(model, tok, q, steps), abs=1e-5)
    card = [s for q, steps in SOLUTIONS for s in reference_math_shepherd_qwen(model, tok, q, steps)]
    assert max(abs(a - b) for a, b in zip([s for row in got for s in row], card)) > 1e-3  # the old reading differs


def test_chat_plus_minus_matches_rlhflow_usage_code(chat_model):
    from transformers import AutoTokenizer

    path, _, model = chat_model
    tok = AutoTokenizer.from_pretrained(path)  # as the model card loads it
    scorer = _scorer(path)  # detected: a causal LM with a chat template and no step tag token
    assert scorer.kind_encoder.kind == "chat-plus-minus"
    got = scorer.score_batch(SOLUTIONS)
    for (q, steps), scores in zip(SOLUTIONS, got):
        _assert_close(scores, reference_rlhflow(model, tok, q, steps))


def test_qwen_prm_matches_its_usage_code_without_remote_code(qwen_prm_model):
    from transformers import AutoTokenizer

    path, _, _ = qwen_prm_model
    tok = AutoTokenizer.from_pretrained(path)  # as the model card loads it (transformers picks Qwen2's class)
    scorer = _scorer(path)
    assert scorer.kind_encoder.kind == "qwen-prm"
    got = scorer.score_batch(SOLUTIONS)
    for (q, steps), scores in zip(SOLUTIONS, got):
        _assert_close(scores, reference_qwen_prm(path, tok, q, steps))
    assert max(s for row in got for s in row) - min(s for row in got for s in row) > 0.01


def test_budgets_do_not_change_kind_scores(qwen_prm_model):
    from prmkit.scoring import StepScorer

    path, _, _ = qwen_prm_model
    small = StepScorer.from_pretrained(path, dtype="float32", device="cpu", batch_tokens=64)
    big = StepScorer.from_pretrained(path, dtype="float32", device="cpu", batch_tokens=100000)
    a, b = small.score_batch(SOLUTIONS), big.score_batch(SOLUTIONS)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Detection and bad input


def test_detection_refuses_an_ambiguous_causal_lm(tmp_path, chat_model):
    path, _, _ = chat_model
    # "+" is one token of this vocabulary: as a tag it would also make this model readable as lm-tag.
    with pytest.raises(UsageError, match="set model.kind") as e:
        _scorer(path, step_tag="+")
    assert "lm-tag" in e.value.hint and "chat-plus-minus" in e.value.hint
    assert _scorer(path, step_tag="+", kind="chat-plus-minus").kind_encoder.kind == "chat-plus-minus"


def test_unknown_kind_is_refused(chat_model):
    with pytest.raises(UsageError, match="unknown model.kind"):
        _scorer(chat_model[0], kind="reward-magic")


def test_a_step_containing_the_tag_is_refused(lm_tag_model):
    scorer = _scorer(lm_tag_model[0])
    with pytest.raises(DataError, match="step 2 contains the step tag"):
        scorer.score_batch([("q", ["fine", "sneaky ки step"])])


def test_a_missing_chat_template_is_refused(tmp_path, qwen_prm_model):
    import shutil

    path = tmp_path / "no-template"
    shutil.copytree(qwen_prm_model[0], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UsageError, match="needs a chat template"):
        _scorer(path)
    assert _scorer(path, chat_template=CHATML_TEMPLATE).kind_encoder.kind == "qwen-prm"


def test_reward_tokens_must_be_single_tokens(chat_model):
    with pytest.raises(UsageError, match="not a single token"):
        _scorer(chat_model[0], kind="chat-plus-minus", reward_tokens=["correct!", "-"])


# ---------------------------------------------------------------------------------------------------------------------
# On the command line: eval side by side across kinds, score with a kind


@pytest.mark.slow
def test_eval_compares_kinds_side_by_side_in_a_subprocess(tmp_path, tiny_prm_pair, qwen_prm_model, chat_model):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.eval_fixtures import processbench_records

    data = tmp_path / "gsm8k.json"
    data.write_text(json.dumps(processbench_records(12, seed=5)))
    out = tmp_path / "cmp"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "eval",
            str(tiny_prm_pair[0]),
            str(qwen_prm_model[0]),
            f"{chat_model[0]}@chat-plus-minus",
            "--data",
            str(data),
            "-o",
            str(out),
            "--no-plots",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert list(models) == [str(tiny_prm_pair[0]), str(qwen_prm_model[0]), f"{chat_model[0]}@chat-plus-minus"]
    assert models[str(qwen_prm_model[0])]["tokenization"]["kind"] == "qwen-prm"
    assert models[f"{chat_model[0]}@chat-plus-minus"]["tokenization"]["kind"] == "chat-plus-minus"
    assert "kind" not in models[str(tiny_prm_pair[0])]["tokenization"]  # TRL's tokenization, recorded as before
    for m in models.values():
        assert m["subsets"]["gsm8k"]["n_solutions"] == 12
    # The qwen-prm model's first-error verdicts come from its own scores: check one subset figure by hand.
    from prmkit.scoring import StepScorer
    from tests.eval_fixtures import processbench_first_error

    records = json.loads(data.read_text())
    scorer = StepScorer.from_pretrained(qwen_prm_model[0], dtype="float32", device="cpu")
    scores = scorer.score_batch([(r["problem"], r["steps"]) for r in records])
    want = processbench_first_error(scores, [r["label"] for r in records], 0.5)
    got = models[str(qwen_prm_model[0])]["subsets"]["gsm8k"]["first_error"]
    assert got["f1"] == pytest.approx(want["f1"], abs=1e-9)


def test_score_cli_with_an_explicit_kind(tmp_path, lm_tag_model):
    from typer.testing import CliRunner

    from prmkit.cli.app import app

    path, _, _ = lm_tag_model
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"prompt": q, "completions": s}) + "\n" for q, s in SOLUTIONS))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "score",
            str(path),
            str(rows),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--set",
            "model.kind=lm-tag",
        ],
    )
    assert res.exit_code == 0, res.output
    got = [json.loads(line)["step_scores"] for line in out.read_text().splitlines()]
    want = _scorer(path, kind="lm-tag").score_batch(SOLUTIONS)
    assert got == [pytest.approx(w, abs=1e-6) for w in want]
    res = CliRunner().invoke(
        app, ["score", str(path), str(rows), "-o", str(tmp_path / "x.jsonl"), "--set", "model.kind=magic"]
    )
    assert res.exit_code == 2 and "model.kind: expected one of auto, token-classification" in res.output


# ---------------------------------------------------------------------------------------------------------------------
# Training the lm-tag kind


def _train_lm_tag(tmp_path, config_dir, rows, out="lm", **keys):
    from prmkit.config.load import load_config
    from prmkit.training.recipe import train

    flags = {
        "model.name_or_path": str(config_dir),
        "model.init_from_config": True,
        "data.train": str(rows),
        "train.kind": "lm-tag",
        "train.output_dir": str(tmp_path / out),
        "train.per_device_train_batch_size": 4,
        "train.max_steps": 6,
        "train.logging_steps": 1,
        "train.save_steps": 100,
        "train.learning_rate": 3e-3,
        "train.seed": 0,
        **keys,
    }
    return train(load_config(None, None, flags)), tmp_path / out


@pytest.mark.slow
def test_lm_tag_training_writes_a_model_that_scores_as_the_model_card_reads_it(tmp_path, tiny_qwen2_config_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import write_train_rows

    rows = write_train_rows(tmp_path / "train.jsonl", n=16, soft=True)
    result, out = _train_lm_tag(tmp_path, tiny_qwen2_config_dir, rows)
    assert result.global_step == 6 and result.train_loss is not None
    meta = json.loads((out / "prmkit.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    plus_minus = [tok.encode(t, add_special_tokens=False)[0] for t in "+-"]
    assert meta["kind"] == {
        "kind": "lm-tag",
        "step_tag": "ки",
        "reward_tokens": ["+", "-"],
        "reward_token_ids": plus_minus,
    }
    assert "ки" in tok.all_special_tokens  # added: the example vocabulary has no such token
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tag_id = tok.convert_tokens_to_ids("ки")
    # The tag's embedding started at the mean embedding (then trained), not at random noise or zero.
    assert model.get_input_embeddings().weight[tag_id].abs().sum() > 0
    # score needs nothing but the directory: kind, tag and reward tokens come from prmkit.json.
    scorer = _scorer(out)
    assert scorer.kind_encoder.kind == "lm-tag"
    rows_in = [json.loads(line) for line in rows.read_text().splitlines()][:5]
    items = [(r["prompt"], r["completions"]) for r in rows_in]
    got = scorer.score_batch(items)
    for (q, steps), scores in zip(items, got):
        _assert_close(scores, reference_openrlhf(model, tok, q, steps))
    with torch.no_grad():
        assert all(0.0 < s < 1.0 for row in got for s in row)


def reference_math_shepherd_qwen(model, tok, question, steps):
    """The model card's code for a tokenizer without BOS (Qwen2): `encode("+ -")` has no BOS to drop."""
    import torch

    candidate_tokens = tok.encode("+ -")
    step_tag_id = tok.encode("ки")[-1]
    output = "\n".join(f"{s} ки" for s in steps)
    input_id = torch.tensor([tok.encode(f"{question} {output}")])
    with torch.no_grad():
        scores = model(input_id).logits[:, :, candidate_tokens].softmax(dim=-1)[:, :, 0]
    return scores[input_id == step_tag_id].tolist()


def test_lm_tag_loss_is_cross_entropy_over_the_two_reward_tokens_with_soft_labels():
    import torch

    from prmkit.training.lm_tag import lm_tag_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100.0)
    labels[0, 2], labels[1, 4], labels[1, 1] = 1.0, 0.25, 0.0
    good, bad = 7, 3
    got = lm_tag_loss((good, bad))({"logits": logits}, labels)
    want = []
    for b, t in [(0, 2), (1, 4), (1, 1)]:
        logp = torch.log_softmax(logits[b, t, [good, bad]], dim=-1)
        p = labels[b, t]
        want.append(-(p * logp[0] + (1 - p) * logp[1]))
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
    # train.label_smoothing_factor smooths over the two reward tokens (not the vocabulary): p' = 0.8 p + 0.1.
    smoothed = lm_tag_loss((good, bad), 0.2)({"logits": logits}, labels)
    want = []
    for b, t in [(0, 2), (1, 4), (1, 1)]:
        logp = torch.log_softmax(logits[b, t, [good, bad]], dim=-1)
        p = 0.8 * labels[b, t] + 0.1
        want.append(-(p * logp[0] + (1 - p) * logp[1]))
    assert smoothed.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)


@pytest.mark.slow
def test_lm_tag_training_with_lora_merges_and_scores(tmp_path, tiny_qwen2_config_dir):
    from tests.conftest import write_train_rows

    rows = write_train_rows(tmp_path / "train.jsonl", n=12)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    result, out = _train_lm_tag(tmp_path, tiny_qwen2_config_dir, rows, out="lora", **{"train.lora": lora})
    assert result.lora["merged"] is True and (out / "model.safetensors").is_file()
    scores = _scorer(out).score_batch([("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])])[0]
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)
    with pytest.raises(UsageError, match="lora_merge"):
        _train_lm_tag(
            tmp_path, tiny_qwen2_config_dir, rows, out="lora2", **{"train.lora": lora, "train.lora_merge": False}
        )


@pytest.mark.slow
def test_lm_tag_training_refuses_a_step_containing_the_tag(tmp_path, tiny_qwen2_config_dir):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "completions": ["a", "b ки c"], "labels": [True, False]}) + "\n")
    with pytest.raises(DataError, match="row 1: step 2 contains the step tag"):
        _train_lm_tag(tmp_path, tiny_qwen2_config_dir, rows)


def test_prepare_lm_tag_puts_labels_at_the_tags(tmp_path, train_tokenizer_dir):
    from transformers import AutoTokenizer

    from prmkit.config.load import load_config
    from prmkit.data.prepare import prepare_splits

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "So 6."], "labels": [True, 0.25]}) + "\n"
    )
    cfg = load_config(None, None, {"data.train": str(rows), "train.kind": "lm-tag"})
    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    prepared = prepare_splits(cfg, tok, output=tmp_path / "prep")
    row = prepared.load()["train"][0]
    tag = tok.convert_tokens_to_ids("ки")  # added by prepare, as train adds it
    assert prepared.metadata["kind"]["kind"] == "lm-tag"
    assert row["input_ids"] == tok.encode("What is 2 + 3? 2 + 3 = 5. ки\nSo 6. ки")
    labelled = [(i, v) for i, v in enumerate(row["labels"]) if v != -100]
    assert [row["input_ids"][i] for i, _ in labelled] == [tag, tag]
    assert [v for _, v in labelled] == [1.0, 0.25]


@pytest.mark.slow
def test_push_plans_an_lm_tag_model_and_its_card_snippet_scores_as_prmkit(tmp_path, tiny_qwen2_config_dir):
    import re
    import shutil

    from prmkit.hub import plan_push
    from tests.conftest import write_train_rows

    rows = write_train_rows(tmp_path / "train.jsonl", n=8)
    _, out = _train_lm_tag(tmp_path, tiny_qwen2_config_dir, rows, out="pushme", **{"train.max_steps": 2})
    plan = plan_push(out, "me/lm-prm", license="mit")
    names = {f.path for f in plan.files}
    assert {"model.safetensors", "config.json", "prmkit.json", "README.md"} <= names
    assert "pipeline_tag: text-generation" in plan.card and "lm-tag" in plan.card
    # The card's transformers code, run against the local copy, gives prmkit's scores.
    code = re.search(r"### transformers\n\n.*?```python\n(.*?)```", plan.card, re.S).group(1)
    ns: dict = {}
    exec(code.replace('"me/lm-prm"', repr(str(out))).replace("print(step_scores)", ""), ns)
    want = _scorer(out).score(ns["prompt"], ns["steps"])
    assert ns["step_scores"] == pytest.approx(want, abs=1e-6)
    # An unfinished training output (no prmkit.json yet) is refused, as score and eval refuse it.
    half = tmp_path / "half"
    shutil.copytree(out, half)
    (half / "prmkit.json").unlink()
    with pytest.raises(UsageError, match="did not finish"):
        plan_push(half, "me/lm-prm")


def test_recorded_kind_settings_win_over_defaults_and_an_explicit_change_warns(tmp_path, lm_tag_model, caplog):
    import shutil

    from prmkit.config.load import load_config

    path = tmp_path / "recorded"
    shutil.copytree(lm_tag_model[0], path)
    (path / "prmkit.json").write_text(
        json.dumps(
            {
                "kind": {"kind": "lm-tag", "step_tag": "ки", "reward_tokens": ["-", "+"]},
                "tokenization": {"max_length": 64},
            }
        )
    )
    # The CLI passes only the keys the user set: the default reward_tokens must not replace the recorded ones.
    assert load_config(None, None, {}).kind_settings() == {}
    assert load_config(None, ['model.reward_tokens=["+", "-"]'], {}).kind_settings() == {"reward_tokens": ["+", "-"]}
    recorded = _scorer(path)
    assert recorded.kind_encoder.settings.reward_tokens == ("-", "+")
    assert recorded.kind_encoder.max_length == 64  # the training limit prmkit.json records
    # Written before prmkit recorded reward_token_ids: the model was trained on encode("- +"), and is read so.
    assert recorded.kind_encoder.reward_ids == tuple(recorded.tokenizer.encode("- +", add_special_tokens=False))
    assert recorded.identity["kind"]["reward_token_ids"] == list(recorded.kind_encoder.reward_ids)
    meta = json.loads((path / "prmkit.json").read_text())
    meta["kind"]["reward_token_ids"] = [7, 9]  # recorded ids win over any encoding
    (path / "prmkit.json").write_text(json.dumps(meta))
    assert _scorer(path).kind_encoder.reward_ids == (7, 9)
    meta["kind"]["reward_token_ids"] = [7, 10**6]
    (path / "prmkit.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="outside the tokenizer"):
        _scorer(path)
    meta["kind"]["reward_token_ids"] = [7, 9]
    (path / "prmkit.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="prmkit"):
        _scorer(path, reward_tokens=["+", "-"])
    assert "model.reward_tokens: using ['+', '-'], not the ['-', '+'] the model recorded" in caplog.text


@pytest.mark.slow
def test_lm_tag_training_with_the_default_tag_on_the_qwen2_tokenizer(tmp_path):
    """Qwen2 keeps `ки` whole alone (id 16748) but splits `" ки"` into `" к"`, `"и"`: the tag is checked where lm-tag
    text puts it, and made an added token, so training with the default tag works (it found 0 tags before)."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from prmkit.cli.app import app
    from prmkit.kinds.spec import ensure_tag_token
    from tests.conftest import QWEN2_TOKENIZER, write_train_rows

    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip("needs ../shared/fixtures/qwen2-tokenizer")
    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    assert len(tok.encode("ки")) == 1 and len(tok.encode(" ки")) == 2
    added = ensure_tag_token(tok, "ки")
    assert added is not None and tok.encode("a ки\nb ки").count(added) == 2
    rows = write_train_rows(tmp_path / "rows.jsonl", n=8)
    out = tmp_path / "x"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--tiny",
            "qwen2",
            "--tokenizer",
            str(QWEN2_TOKENIZER),
            "--train",
            str(rows),
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--set",
            "train.kind=lm-tag",
        ],
    )
    assert res.exit_code == 0, res.output
    kind = json.loads((out / "prmkit.json").read_text())["kind"]
    assert kind["step_tag"] == "ки" and kind["reward_token_ids"] == [10, 12]  # `+`, `-`, each encoded alone
    scores = _scorer(out).score("What is 2 + 3?", ["2 + 3 = 5.", "The answer is 5."])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_equal_reward_tokens_are_refused(lm_tag_model, chat_model):
    from prmkit.kinds.spec import KindSettings, reward_token_ids

    # lm-tag reads its ids from "+ +", where the second "+" is " +": two ids for one token (was: accepted).
    for path, kind in ((lm_tag_model[0], "lm-tag"), (chat_model[0], "chat-plus-minus")):
        with pytest.raises(UsageError, match=r"reward tokens \['\+', '\+'\] are the same token \(ids \[\d+\]\)"):
            _scorer(path, kind=kind, reward_tokens=["+", "+"])
    with pytest.raises(UsageError, match="are the same token"):
        reward_token_ids(lm_tag_model[1], KindSettings(reward_tokens=("+", "+")), "lm-tag")
    assert len(set(reward_token_ids(lm_tag_model[1], KindSettings(reward_tokens=("+", "-")), "lm-tag"))) == 2


def test_an_empty_step_tag_is_refused(lm_tag_model):
    from prmkit.kinds.spec import KindSettings

    # It fell back to the default tag "ки", whatever tag the model was trained with.
    with pytest.raises(UsageError, match="model.step_tag must be a non-empty string, got ''") as e:
        _scorer(lm_tag_model[0], step_tag="")
    assert "leave it unset" in e.value.hint
    with pytest.raises(UsageError, match="model.step_tag must be a non-empty string"):
        KindSettings.from_sources({"kind": "lm-tag"}, {"kind": "lm-tag", "step_tag": ""})
    assert KindSettings.from_sources({"step_tag": None}, {"kind": "lm-tag", "step_tag": "<t>"}).tag() == "<t>"


def test_a_runaway_chat_template_is_one_line_naming_it(chat_model, qwen_prm_model, monkeypatch):
    import time

    import prmkit.kinds.chat_template

    monkeypatch.setattr(prmkit.kinds.chat_template, "RENDER_SECONDS", 0.3)
    slow = "{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}" + LLAMA3_TEMPLATE
    scorer = _scorer(chat_model[0], kind="chat-plus-minus", chat_template=slow)
    start = time.monotonic()
    with pytest.raises(UsageError) as e:  # was: no limit (this one renders in seconds, 10^10 loops in hours)
        scorer.score_batch(SOLUTIONS[:1])
    assert e.value.message == (
        "the chat template failed (model.chat_template): rendering took longer than 0.3 s (a runaway loop?)"
    )
    assert time.monotonic() - start < 3
    # The tokenizer's own template is named by the tokenizer's directory.
    scorer = _scorer(qwen_prm_model[0])
    scorer.tokenizer.chat_template = "{{ 'x' * 10**9 }}"
    with pytest.raises(
        UsageError,
        match=rf"^the chat template failed \(the chat template of {qwen_prm_model[0]}\): "
        "a value of more than 16,777,216 characters",
    ):
        scorer.score_batch(SOLUTIONS[:1])
