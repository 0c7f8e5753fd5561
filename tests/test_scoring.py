"""The scoring engine: one forward pass per solution, scored exactly where training put the labels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_prm, prmkit_log

from prmkit.core.filenames import PRMKIT_JSON
from prmkit.errors import UsageError
from prmkit.models.loading import resolve_dtype as _resolve_dtype
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.scoring import StepScorer
from prmkit.scoring.engine import _is_causal, _probe_causal
from prmkit.scoring.loading import resolve_device as _resolve_device
from prmkit.tokenization import TokenizationParams, encode_solutions

SOLUTIONS = [
    ("Which number is larger, 9.8 or 9.11?", ["11 is greater than 8.", "Hence, 9.11 > 9.8."]),
    (
        "Let's call the price of a pencil p and the price of a jumbo eraser e.",
        [
            "The first equation is 3p + e = 124, and the second equation is 5p + e = 182.",
            "So the answer is 42.",
            "We check: 6 * 7 = 42.",
            "Hence 42.",
        ],
    ),
    ("So the answer is 42.", ["We check: 6 * 7 = 42."]),
    (
        "Step 1: Janet spends 3 hours + 5 hours = 8 hours per week on music lessons.",
        ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 42."],
    ),
]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("scoring") / "prm", train_tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def scorer(prm_dir) -> StepScorer:
    return StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu")


def manual_scores(model, tokenizer, params, prompt, steps) -> list[float | None]:
    """A forward pass over encode_solutions' ids, softmax, LABEL_1 at each step's position."""
    enc = encode_solutions(tokenizer, [prompt], [steps], params)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids]), use_cache=False).logits[0].float()
    probs = logits.softmax(-1)[:, 1]
    return [None if p < 0 else probs[p].item() for p in enc.step_positions]


def test_scores_equal_a_manual_forward_pass_at_the_training_positions(scorer):
    for prompt, steps in SOLUTIONS:
        expected = manual_scores(scorer.model, scorer.tokenizer, scorer.params, prompt, steps)
        assert scorer.score(prompt, steps) == pytest.approx(expected, abs=1e-6)
    # A random model still gives different scores to different steps: the positions matter.
    assert len(set(scorer.score(*SOLUTIONS[1]))) == 4


@pytest.mark.slow
def test_one_pass_equals_prefix_by_prefix(scorer):
    one_pass = scorer.score_batch(SOLUTIONS)
    # Each prefix encoded on its own by encode_solutions and scored alone: what a step may see, and no more.
    for (prompt, steps), got in zip(SOLUTIONS, one_pass):
        by_prefix = [
            manual_scores(scorer.model, scorer.tokenizer, scorer.params, prompt, steps[: k + 1])[k]
            for k in range(len(steps))
        ]
        assert got == pytest.approx(by_prefix, abs=1e-5)
    # The engine's own prefix mode (what a non-causal model gets) agrees too.
    prefix_engine = StepScorer(scorer.model, scorer.tokenizer, scorer.params, causal=False)
    assert prefix_engine.prefix_mode
    for got, want in zip(prefix_engine.score_batch(SOLUTIONS), one_pass):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_batching_and_packing_do_not_change_scores(scorer):
    alone = [scorer.score(p, s) for p, s in SOLUTIONS]
    tight = StepScorer(scorer.model, scorer.tokenizer, scorer.params, batch_tokens=1)  # one row per batch
    wide = StepScorer(scorer.model, scorer.tokenizer, scorer.params, batch_tokens=100_000)
    # Packing with position_ids restarting at 0 (block-diagonal attention); on CPU it is sdpa, slow but exact.
    packed = StepScorer(scorer.model, scorer.tokenizer, scorer.params, packing=True, batch_tokens=100_000)
    for engine in (tight, wide, packed):
        for got, want in zip(engine.score_batch(SOLUTIONS), alone):
            assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_score_iter_streams_in_input_order_with_bounded_read_ahead(scorer):
    items = [SOLUTIONS[i % len(SOLUTIONS)] for i in range(10)]
    pulled = []

    def source():
        for i, item in enumerate(items):
            pulled.append(i)
            yield item

    stream = scorer.score_iter(source(), sort_window=3)
    first = next(stream)
    assert len(pulled) == 3  # read only one window ahead
    results = [first, *stream]
    assert len(results) == len(items)
    for result, (prompt, steps) in zip(results, items):
        assert result.scores == pytest.approx(scorer.score(prompt, steps), abs=1e-6)
    assert all(not r.truncated for r in results)
    assert results[0].num_tokens == len(scorer.encode([items[0]])[0].input_ids)


def test_truncated_steps_are_none_and_flagged(scorer):
    prompt, steps = SOLUTIONS[1]
    full = scorer.encode([(prompt, steps)])[0]
    # Room for the first two steps only.
    params = TokenizationParams(max_length=full.step_positions[1] + 1)
    short = StepScorer(scorer.model, scorer.tokenizer, params)
    result = short.score_solutions([(prompt, steps)])[0]
    assert result.truncated and short.truncated(prompt, steps)
    assert result.scores[2:] == [None, None]
    assert result.scores[:2] == pytest.approx(scorer.score(prompt, steps)[:2], abs=1e-6)
    assert not scorer.truncated(prompt, steps)


def test_prmkit_json_separator_is_used(tmp_path, train_tokenizer_dir):
    model_dir = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=4, step_separator=" ки\n")
    with prmkit_log() as records:
        sc = StepScorer.from_pretrained(model_dir)
    assert sc.params.step_separator == " ки\n"
    assert not [r for r in records if r.levelno >= logging.WARNING]
    prompt, steps = SOLUTIONS[0]
    assert sc.score(prompt, steps) == pytest.approx(
        manual_scores(sc.model, sc.tokenizer, sc.params, prompt, steps), abs=1e-6
    )
    plain = manual_scores(sc.model, sc.tokenizer, TokenizationParams(step_separator="\n"), prompt, steps)
    assert sc.score(prompt, steps) != pytest.approx(plain, abs=1e-6)
    # An explicit separator wins, with a warning that it contradicts training.
    with prmkit_log() as records:
        assert StepScorer.from_pretrained(model_dir, step_separator="\n").params.step_separator == "\n"
    assert any(
        'trained with data.step_separator=" ки\\n" (prmkit.json); scoring with "\\n" as asked' in r.getMessage()
        for r in records
    )


def test_directory_without_prmkit_json_warns_and_uses_newline(tmp_path, train_tokenizer_dir):
    model_dir = make_tiny_prm(tmp_path / "trl-prm", train_tokenizer_dir, seed=5, step_separator="\n\n")
    (model_dir / PRMKIT_JSON).unlink()  # as a model trained with TRL's PRMTrainer
    with prmkit_log() as records:
        sc = StepScorer.from_pretrained(model_dir)
    assert sc.params.step_separator == "\n"
    assert sc.params == TokenizationParams()  # TRL 1.13's: max_length 1024, no prompt limit
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("no prmkit.json" in w and "'\\n'" in w for w in warnings)


def test_prmkit_json_max_length_truncates(tmp_path, train_tokenizer_dir):
    model_dir = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=6)
    write_metadata(model_dir, build_metadata(TokenizationParams(max_length=20), base_model=None))
    sc = StepScorer.from_pretrained(model_dir)
    assert sc.params.max_length == 20
    result = sc.score_solutions([SOLUTIONS[1]])[0]
    assert result.truncated and result.scores[-1] is None and result.num_tokens == 20


def test_a_model_without_a_trained_head_is_refused(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=len(tok),
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    with pytest.raises(UsageError, match="no trained token-classification head"):
        StepScorer.from_pretrained(tmp_path / "base")


def test_missing_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        StepScorer.from_pretrained(tmp_path / "nope" / "model")


def tiny_bert():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.5,
    )  # large weights, so what a token sees shows in its score
    return BertForTokenClassification(cfg).eval()


def test_causality_is_recognised():
    bert = tiny_bert()
    assert not _is_causal(bert) and not _probe_causal(bert)


@pytest.mark.slow
def test_non_causal_model_is_scored_prefix_by_prefix_with_one_warning(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    bert = tiny_bert()
    params = TokenizationParams()
    with prmkit_log() as records:
        sc = StepScorer(bert, tok, params)
        got = sc.score_batch(SOLUTIONS)
    assert sc.prefix_mode
    assert sum("not causal" in r.getMessage() for r in records) == 1
    for (prompt, steps), scores in zip(SOLUTIONS, got):
        expected = [manual_scores(bert, tok, params, prompt, steps[: k + 1])[k] for k in range(len(steps))]
        assert scores == pytest.approx(expected, abs=1e-5)
    # In one pass a bidirectional model's early steps would see later ones: the scores differ.
    one_pass = StepScorer(bert, tok, params, allow_bidirectional=True)
    assert not one_pass.prefix_mode
    prompt, steps = SOLUTIONS[1]
    assert one_pass.score(prompt, steps) == pytest.approx(manual_scores(bert, tok, params, prompt, steps), abs=1e-5)
    assert abs(one_pass.score(prompt, steps)[0] - got[1][0]) > 1e-3


def test_bad_settings_are_usage_errors(scorer):
    with pytest.raises(UsageError):
        StepScorer(scorer.model, scorer.tokenizer, scorer.params, batch_tokens=0)
    with pytest.raises(UsageError, match="dtype"):
        _resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(UsageError, match="CUDA"):
        if torch.cuda.is_available():
            raise UsageError("CUDA is here; nothing to check")
        _resolve_device("cuda")


def test_settings_over_the_recorded_tokenizer_and_tokenization(tmp_path, train_tokenizer_dir):
    from prmkit.models.model_dir import kind_tokenization, resolve_tokenization

    model_dir = make_tiny_prm(tmp_path / "prm", train_tokenizer_dir, seed=2)
    # No fingerprint recorded: an explicit tokenizer is used, with a word that nothing can vouch for it.
    with prmkit_log() as records:
        sc = StepScorer.from_pretrained(model_dir, tokenizer=str(train_tokenizer_dir))
    assert sc.tokenizer.name_or_path == str(train_tokenizer_dir)
    assert any("scoring with the tokenizer of" in r.getMessage() and "as asked" in r.getMessage() for r in records)
    # A recorded fingerprint it does not match: a warning, and the report-facing record of the difference.
    write_metadata(model_dir, build_metadata(TokenizationParams(), base_model=None, tokenizer={"sha256": "0" * 64}))
    with prmkit_log() as records:
        sc = StepScorer.from_pretrained(model_dir, tokenizer=str(train_tokenizer_dir))
    assert any("differs from the one recorded in prmkit.json" in r.getMessage() for r in records)
    assert sc.differs_from_training["tokenizer"][0] == "0" * 64

    # Without prmkit.json (a TRL model) settings say how it was trained: used as given, TRL's defaults for the rest.
    params, differs = resolve_tokenization("trl-model", None, overrides={"max_length": 2048, "step_separator": "\n\n"})
    assert params == TokenizationParams(step_separator="\n\n", max_length=2048) and differs == {}

    # Another kind of PRM lays out its own input: max_length applies, anything else that would change something is
    # refused, and a value equal to the default (a full config template) is no change.
    assert kind_tokenization("m", "qwen-prm", {"max_length": 300, "max_prompt_length": None}) == 300
    assert kind_tokenization("m", "qwen-prm", {"step_separator": "\n"}) is None
    with pytest.raises(UsageError, match=r"data.max_prompt_length=512 cannot apply"):
        kind_tokenization("m", "qwen-prm", {"max_prompt_length": 512})
    with pytest.raises(UsageError, match=r'data.step_separator="\\n\\n" cannot apply'):
        kind_tokenization("m", "lm-tag", None, step_separator="\n\n")


# ---------------------------------------------------------------------------------------------------------------------
# Scoring something that is not a PRM; the library API refuses what the CLI refuses


def _base_lm(path: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=len(tok),
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_kind_forced_on_an_unmarked_causal_lm_warns_and_flat_scores_are_said(tmp_path, tiny_tokenizer_dir):
    """A plain causal LM forced to chat-plus-minus scores every step about alike: both facts are said."""
    base = _base_lm(tmp_path / "base", tiny_tokenizer_dir)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with prmkit_log() as records:
        scorer = StepScorer.from_pretrained(
            base, dtype="float32", device="cpu", kind_settings={"kind": "chat-plus-minus", "chat_template": template}
        )
        scores = scorer.score_batch(SOLUTIONS)
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("model.kind=chat-plus-minus is set for" in m and "Qwen2ForCausalLM" in m for m in messages), messages
    flat = [m for m in messages if "step scores all lie within" in m]
    values = [s for row in scores for s in row]
    assert max(values) - min(values) < 0.02 and len(flat) == 1
    assert f"the first {len(values)} step scores" in flat[0]
    scorer.score_batch(SOLUTIONS)  # said once, not per call
    assert sum("step scores all lie within" in r.getMessage() for r in records) == 1


def test_a_prm_whose_scores_vary_is_not_called_flat(scorer):
    from prmkit.scoring.engine import StepScores, _warn_if_flat

    with prmkit_log() as records:
        assert _warn_if_flat([StepScores([0.1, 0.9, 0.5, 0.4], False, 9), StepScores([0.3] * 4, False, 9)], "m")
        assert not _warn_if_flat([StepScores([0.5] * 7, False, 9)], "m")  # too few steps to judge
        assert _warn_if_flat([StepScores([0.51, 0.515, 0.518, 0.51], False, 9), StepScores([0.5] * 4, False, 9)], "m")
    assert [r.getMessage() for r in records] == [
        "m: the first 8 step scores all lie within 0.500-0.518: a trained PRM tells steps apart; check that this model "
        "is one (an untrained head, or a model read as a kind it was not trained as, scores every step alike)"
    ]


def test_the_library_refuses_an_empty_step_as_the_cli_does(scorer):
    from prmkit.errors import DataError

    with pytest.raises(DataError, match=r"^solution 1: step 2: empty step$"):
        scorer.score("p", ["ok", ""])
    with pytest.raises(DataError, match=r"solution 2: step 1: empty step \(whitespace only\)"):
        scorer.score_batch([("p", ["ok"]), ("q", ["  \n"])])
    with pytest.raises(DataError, match="steps: expected a list of strings, got one string"):
        scorer.score("p", "one string")
    with pytest.raises(DataError, match="step 1: expected a string, got int"):
        scorer.score("p", [3])


def test_loading_prints_no_progress_bar_or_load_report(prm_dir, capfd):
    from transformers.utils import logging as tlog

    tlog.enable_progress_bar()  # as in a user's program (a CLI test before this one may have turned it off)
    StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu").score("p", ["a step."])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "LOAD REPORT" not in err
    assert tlog.is_progress_bar_enabled()  # turned off for the load only
