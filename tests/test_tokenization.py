"""The one tokenization: TRL 1.13 `tokenize_row` semantics, checked on hand-readable ids and on the real Qwen2 BPE."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, requires_shared

from prmkit.tokenization import IGNORE_INDEX as X
from prmkit.tokenization import (
    TextEncoder,
    TokenizationParams,
    encode_solutions,
    normalize_label,
    tokenize_rows,
    tokenizer_fingerprint,
)


def word_tokenizer(bos: bool = False):
    """Whitespace word-level tokenizer whose ids are easy to read: a=1, b=2, ..., '\\n'=10, '\\n\\n'... is two."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "q": 7, "r": 8, "<s>": 9, "\n": 10, "|": 11}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    # Split on spaces but keep newlines as tokens of their own, one per character.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    kwargs = {"pad_token": "<pad>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def run(tok, prompt, steps, labels, is_eval=False, **params):
    res = tokenize_rows(tok, [prompt], [steps], [labels], TokenizationParams(**params), is_eval=is_eval)
    return res["input_ids"][0], res["labels"][0]


def test_ids_of_the_word_tokenizer():
    tok = word_tokenizer()
    assert tok("q r\n", add_special_tokens=False)["input_ids"] == [7, 8, 10]


def test_no_truncation():
    ids, labels = run(word_tokenizer(), "q r", ["a b", "c"], [1, 0])
    assert ids == [7, 8, 1, 2, 10, 3, 10]
    assert labels == [X, X, X, X, 1, X, 0]


def test_bos_is_prepended_when_the_tokenizer_has_one():
    ids, labels = run(word_tokenizer(bos=True), "q r", ["a b", "c"], [1, 0])
    assert ids == [9, 7, 8, 1, 2, 10, 3, 10]
    assert labels == [X, X, X, X, X, 1, X, 0]


def test_train_on_last_step_only_applies_to_train_split_only():
    _ids, labels = run(word_tokenizer(), "q", ["a", "b", "c"], [1, 1, 0], train_on_last_step_only=True)
    assert labels == [X, X, X, X, X, X, 0]
    _, eval_labels = run(word_tokenizer(), "q", ["a", "b", "c"], [1, 1, 0], is_eval=True, train_on_last_step_only=True)
    assert eval_labels == [X, X, 1, X, 1, X, 0]


def test_completion_truncation_cuts_completion_from_the_right():
    ids, labels = run(word_tokenizer(), "q r", ["a b", "c d"], [1, 0], max_completion_length=4)
    assert ids == [7, 8, 1, 2, 10, 3]
    assert labels == [X, X, X, X, 1, X]


def test_max_length_cuts_the_whole_sequence_after_completion_truncation():
    ids, labels = run(word_tokenizer(), "q r", ["a b", "c d"], [1, 0], max_completion_length=5, max_length=4)
    assert ids == [7, 8, 1, 2]
    assert labels == [X, X, X, X]


def test_two_token_separator_labels_its_last_token():
    ids, labels = run(word_tokenizer(), "q", ["a", "b"], [0, 1], step_separator="\n\n")
    assert ids == [7, 1, 10, 10, 2, 10, 10]
    assert labels == [X, X, X, 0, X, X, 1]


def test_max_prompt_length_keeps_the_end_of_the_prompt_and_the_bos():
    ids, labels = run(word_tokenizer(bos=True), "a b c d e", ["f"], [1], max_prompt_length=3)
    assert ids == [9, 4, 5, 6, 10]
    assert labels == [X, X, X, X, 1]
    ids, _ = run(word_tokenizer(), "a b c d e", ["f"], [1], max_prompt_length=3)
    assert ids == [3, 4, 5, 6, 10]


def test_null_disables_every_limit():
    long_steps = ["a b c d e f"] * 300
    ids, labels = run(word_tokenizer(), "q " * 600, long_steps, [1] * 300, max_length=None, max_prompt_length=None)
    assert len(ids) == 600 + 300 * 7
    assert sum(1 for x in labels if x != X) == 300


def test_step_positions_mark_truncated_steps():
    [enc] = encode_solutions(word_tokenizer(), ["q"], [["a", "b", "c"]], TokenizationParams(max_length=4))
    assert enc.input_ids == [7, 1, 10, 2]
    assert enc.step_positions == [2, -1, -1]
    res = tokenize_rows(word_tokenizer(), ["q"], [["a", "b", "c"]], [[1, 0, 1]], TokenizationParams(max_length=4))
    assert res["steps_lost"] == [2]


def test_soft_labels_are_kept_not_floored():
    _ids, labels = run(word_tokenizer(), "q", ["a", "b"], [0.7, 1])
    assert labels == [X, X, 0.7, X, 1]


@pytest.mark.parametrize(
    "value, expected", [(True, 1), (False, 0), (1, 1), (0, 0), (0.25, 0.25), (1.0, 1), (0.0, 0), (None, None)]
)
def test_normalize_label(value, expected):
    got = normalize_label(value)
    assert got == expected and type(got) is type(expected)


def test_label_threshold_binarizes_soft_labels():
    assert normalize_label(0.7, label_threshold=0.5) == 1
    assert normalize_label(0.3, label_threshold=0.5) == 0


@pytest.mark.parametrize("bad", [2, -1, 1.5, float("nan"), "yes", [1]])
def test_normalize_label_rejects(bad):
    with pytest.raises(ValueError):
        normalize_label(bad)


def test_text_encoder_equals_tokenizer_call(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = ["Hence, 9.11 > 9.8.", "\n", "\n\n", " leading space", "Step 1: Janet", "Hence, 9.11 > 9.8."]
    table = TextEncoder(tok).encode_many(texts)
    for t in texts:
        assert table[t] == tok(t, add_special_tokens=False)["input_ids"]


def test_fingerprint_changes_with_the_vocabulary(tiny_tokenizer_dir, tiny_bos_tokenizer_dir):
    from transformers import AutoTokenizer

    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    b = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_bos_tokenizer_dir))
    assert a["sha256"] != b["sha256"]
    assert a == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) | {
        "name_or_path": a["name_or_path"]
    }


# --- the real Qwen2 BPE ---------------------------------------------------------------------------------------------


@requires_shared
def test_trl_docstring_example_ids(qwen2_tokenizer):
    # The ids printed in TRL 1.13's tokenize_row docstring for this row.
    ids, labels = run(
        qwen2_tokenizer,
        "Which number is larger, 9.8 or 9.11?",
        ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
        [True, False],
    )
    assert ids == [
        23085,
        1372,
        374,
        8131,
        11,
        220,
        24,
        13,
        23,
        476,
        220,
        24,
        13,
        16,
        16,
        30,
        16,
        16,
        374,
        7046,
        1091,
        220,
        23,
        13,
        198,
        39,
        763,
        11,
        220,
        24,
        13,
        16,
        16,
        861,
        220,
        24,
        13,
        23,
        13,
        198,
    ]
    assert [i for i, x in enumerate(labels) if x != X] == [24, 39]
    assert labels[24] == 1 and labels[39] == 0


@requires_shared
def test_joining_strings_is_not_the_same_tokenization(qwen2_tokenizer):
    # Why steps are tokenized alone: ".\n" is one Qwen2 token, so a joined string has no separate separator token.
    joined = qwen2_tokenizer("Hence, 9.8.\n", add_special_tokens=False)["input_ids"]
    alone = (
        qwen2_tokenizer("Hence, 9.8.", add_special_tokens=False)["input_ids"]
        + qwen2_tokenizer("\n", add_special_tokens=False)["input_ids"]
    )
    assert joined != alone


@requires_shared
@pytest.mark.parametrize("sep", ["\n", "\n\n", " ки\n"])
@pytest.mark.parametrize(
    "limits", [{}, {"max_completion_length": 40}, {"max_length": 90}, {"train_on_last_step_only": True}]
)
def test_parity_with_trl_on_real_data(qwen2_tokenizer, sep, limits):
    from trl.experimental.prm import PRMTrainer

    rows = json.loads((SHARED / "data" / "processbench" / "gsm8k.json").read_text())[:25]
    params = TokenizationParams(step_separator=sep, max_prompt_length=None, **limits)
    labels = [[i != r["label"] for i in range(len(r["steps"]))] for r in rows]
    ours = tokenize_rows(
        qwen2_tokenizer,
        [r["problem"] for r in rows],
        [r["steps"] for r in rows],
        [[int(x) for x in ls] for ls in labels],
        params,
    )
    for i, r in enumerate(rows):
        theirs = PRMTrainer.tokenize_row(
            {"prompt": r["problem"], "completions": r["steps"], "labels": labels[i]},
            qwen2_tokenizer,
            sep,
            params.max_length,
            params.max_completion_length,
            params.train_on_last_step_only,
            False,
        )
        assert ours["input_ids"][i] == theirs["input_ids"]
        assert ours["labels"][i] == theirs["labels"]


@requires_shared
def test_default_is_trl_on_prompts_over_512_tokens(qwen2_tokenizer):
    # TRL 1.13 has no prompt limit, so neither has the default config. ../shared's GSM8K problems are all under 200
    # Qwen2 tokens; a few-shot prompt made of 10 consecutive real problems is 650-850 tokens, with a real solution.
    from trl.experimental.prm import PRMTrainer

    from prmkit.config.load import load_config

    rows = json.loads((SHARED / "data" / "processbench" / "gsm8k.json").read_text())
    prompts = ["\n\n".join(r["problem"] for r in rows[i : i + 10]) for i in range(0, 60, 10)]
    steps = [rows[i + 9]["steps"] for i in range(0, 60, 10)]
    labels = [[i != rows[j + 9]["label"] for i in range(len(s))] for j, s in zip(range(0, 60, 10), steps)]
    prompt_tokens = [len(qwen2_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert min(prompt_tokens) > 512, prompt_tokens

    default = TokenizationParams.from_data_config(load_config().data)
    assert default.max_prompt_length is None
    ours = tokenize_rows(qwen2_tokenizer, prompts, steps, [[int(x) for x in ls] for ls in labels], default)
    capped = tokenize_rows(
        qwen2_tokenizer,
        prompts,
        steps,
        [[int(x) for x in ls] for ls in labels],
        TokenizationParams(max_length=None, max_prompt_length=512),
    )
    for i, n in enumerate(prompt_tokens):
        theirs = PRMTrainer.tokenize_row(
            {"prompt": prompts[i], "completions": steps[i], "labels": labels[i]},
            qwen2_tokenizer,
            "\n",
            default.max_length,
            default.max_completion_length,
            False,
            False,
        )
        assert ours["input_ids"][i] == theirs["input_ids"]
        assert ours["labels"][i] == theirs["labels"]
        # 512 stays available as an explicit setting: it keeps the prompt's last 512 tokens.
        whole = (
            theirs["input_ids"][:n]
            + PRMTrainer.tokenize_row(
                {"prompt": prompts[i], "completions": steps[i], "labels": labels[i]},
                qwen2_tokenizer,
                "\n",
                None,
                None,
                False,
                False,
            )["input_ids"][n:]
        )
        assert capped["input_ids"][i] == whole[n - 512 :]


TRICKY = [
    "Hence, 9.11 > 9.8.",
    "two  spaces   and tabs\t\there\n\n  indented\n",
    "trailing spaces   ",
    "   leading",
    "I'm sure it's 42, isn't it? They'll see. WE'RE DONE",
    "<<3+5=8>>8 $\\frac{1}{2}$ x^2 + y_1 = 10%",
    "ends with newline\n",
    "\n",
    "\n\n",
    "unicode: café — 数学 ½",  # not ASCII: goes through Rust
    "special <|endoftext|> inside",  # an added token: goes through Rust
    "form\x0cfeed and \x0bvertical tab",  # whitespace the regex engines may classify differently: Rust
]


@requires_shared
def test_python_piece_split_gives_the_rust_ids(qwen2_tokenizer):
    from prmkit.tokenization import _PieceSplitter

    encoder = TextEncoder(qwen2_tokenizer)
    assert encoder._split is not None, "Qwen2's byte-level BPE should take the fast path"
    rows = json.loads((SHARED / "data" / "processbench" / "gsm8k.json").read_text())
    texts = TRICKY + [r["problem"] for r in rows] + [s for r in rows for s in r["steps"]]
    table = encoder.encode_many(texts)
    for t in texts:
        assert table[t] == qwen2_tokenizer(t, add_special_tokens=False)["input_ids"], repr(t)
    # Text the Python split is not certain for goes to Rust: non-ASCII, added tokens, other control characters.
    assert encoder._split.pre.safe(["plain ASCII.\n", "unicode: café", "a <|endoftext|>", "form\x0cfeed"]).tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert isinstance(encoder._split, _PieceSplitter)


def test_other_layouts_fall_back_to_rust(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    # The tiny tokenizer's pre-tokenizer is a bare ByteLevel (GPT-2 regex inside Rust): no Python split.
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    encoder = TextEncoder(tok)
    assert encoder._split is None
    assert encoder.encode("Hence, 9.11 > 9.8.") == tok("Hence, 9.11 > 9.8.", add_special_tokens=False)["input_ids"]


# --- the columnar assembly against a row-by-row reference ------------------------------------------------------------


def reference_encode(tok, prompt, steps, params: TokenizationParams):
    """TRL's tokenize_row layout written the plain way, one tokenizer call per text: the oracle for `_assemble`."""
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        prompt_ids = [tok.bos_token_id, *prompt_ids]
    mp = params.max_prompt_length
    if mp is not None and len(prompt_ids) > mp:
        if tok.bos_token_id is not None:
            prompt_ids = [tok.bos_token_id, *prompt_ids[len(prompt_ids) - mp + 1 :]] if mp > 0 else []
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - mp :]
    sep = tok(params.step_separator, add_special_tokens=False)["input_ids"] if params.step_separator else []
    ids, positions = list(prompt_ids), []
    for step in steps:
        ids += tok(step, add_special_tokens=False)["input_ids"] + sep
        positions.append(len(ids) - 1)
    limit = len(ids)
    if params.max_completion_length is not None:
        limit = min(limit, len(prompt_ids) + params.max_completion_length)
    if params.max_length is not None:
        limit = min(limit, params.max_length)
    return ids[:limit], [p if p < limit else -1 for p in positions], len(prompt_ids)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_assembly_matches_the_row_by_row_reference(tiny_tokenizer_dir, tiny_bos_tokenizer_dir, bos, seed):
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bos_tokenizer_dir if bos else tiny_tokenizer_dir)
    rng = random.Random(seed)
    words = ["Hence,", "9.11", ">", "9.8.", "the", "answer", "is", "42", "\n", "  ", "Step", "1:", "café", "x"]
    phrase = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    prompts = [phrase(rng.randint(0, 12)) for _ in range(30)]
    completions = [[phrase(rng.randint(0, 8)) for _ in range(rng.randint(0, 5))] for _ in range(30)]
    completions[3] = completions[4] = ["same step", "same step"]  # repeated texts share one encoding
    for _ in range(6):
        params = TokenizationParams(
            step_separator=rng.choice(["\n", "\n\n", " | ", ""]),
            max_length=rng.choice([None, 1, 5, 17, 40]),
            max_prompt_length=rng.choice([None, 0, 1, 3, 8]),
            max_completion_length=rng.choice([None, 0, 2, 9]),
        )
        got = encode_solutions(tok, prompts, completions, params)
        for prompt, steps, enc in zip(prompts, completions, got):
            ids, positions, n_prompt = reference_encode(tok, prompt, steps, params)
            assert (enc.input_ids, enc.step_positions, enc.prompt_length) == (ids, positions, n_prompt), (
                params,
                prompt,
                steps,
            )


def test_steps_lost_and_labels_kept_are_counted_per_row():
    from prmkit.tokenization import encode_batch, label_tokens, step_label_array

    tok = word_tokenizer()
    labels = [[1, None, 0], [1, 0]]
    enc = encode_batch(tok, ["q", "q r"], [["a", "b", "c"], ["a b c d", "e"]], TokenizationParams(max_length=4))
    batch = label_tokens(enc, step_label_array(labels), soft=False, train_on_last_step_only=False, is_eval=False)
    # Row 0: q a \n b (cut) -> "a" labelled, "b" unlabelled and cut, "c" cut: one labelled step lost.
    # Row 1: q r a b (cut) -> both steps cut.
    assert batch.input_ids.tolist() == [7, 1, 10, 2, 7, 8, 1, 2]
    assert batch.labels.tolist() == [X, X, 1, X, X, X, X, X]
    assert batch.steps_lost.tolist() == [1, 2]
    assert batch.labels_kept.tolist() == [1, 0]


# --- the Python pre-split: translation to `re`, and worker processes -------------------------------------------------


def test_ascii_translation_of_known_pretokenizer_patterns():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from prmkit.tokenization import _ascii_pattern

    assert _ascii_pattern(PRETOKENIZE_REGEX) == (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 - the pattern as the tokenizer file holds it
    )
    gpt2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert _ascii_pattern(gpt2) == r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
    assert _ascii_pattern(r"[]\p{L}]") == "[]A-Za-z]"  # a leading ] is a literal, not the end of the class
    assert _ascii_pattern(r"\p{Lu}+") is None  # a class this translation does not know
    assert _ascii_pattern(r"\pL+") is None


def test_a_translation_that_changes_matches_is_not_used():
    import re

    import regex

    from prmkit.tokenization import _fast_engine

    assert isinstance(_fast_engine(r" ?\p{L}+|\s+"), re.Pattern)
    # POSIX classes mean something else to `re` (a plain set of characters): the probe catches it, `regex` stays.
    engine = _fast_engine(r"[[:alpha:]]+|\s+")
    assert isinstance(engine, regex.Pattern) and not isinstance(engine, re.Pattern)


def test_worker_processes_give_the_rust_ids(train_tokenizer_dir):
    import os

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    encoder = TextEncoder(tok)
    assert encoder._split is not None, "the example tokenizer has Qwen2's layout and should take the fast path"
    batches = []
    for b in range(7):
        # Each batch brings pieces no other batch has, so workers number new pieces independently.
        texts = [f"Step {i}: batch{b}word{i} costs {i * 7 + b} dollars.\n" for i in range(40)] + TRICKY
        batches.append((b, texts))
    got = list(encoder.encode_pools(batches, processes=2))
    assert [tag for tag, _ in got] == list(range(7))
    for (_, texts), (_, pool) in zip(batches, got):
        for i, text in enumerate(texts):
            assert pool.get(i) == tok(text, add_special_tokens=False)["input_ids"], repr(text)
    assert encoder._split.worker_pids and os.getpid() not in encoder._split.worker_pids


def _dying_worker(texts):
    import os

    os._exit(3)


def test_a_worker_that_dies_is_an_error_not_a_hang(train_tokenizer_dir, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from transformers import AutoTokenizer

    import prmkit.tokenization as tokenization

    monkeypatch.setattr(tokenization, "_worker_split", _dying_worker)
    encoder = TextEncoder(AutoTokenizer.from_pretrained(train_tokenizer_dir))
    with pytest.raises(BrokenProcessPool):
        list(encoder.encode_pools([(i, [f"text {i}"]) for i in range(4)], processes=2))


def test_texts_of_one_token_pieces_take_the_short_path_with_the_same_ids(train_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    words = [
        w
        for w in ["the", "is", "of", "and", "to", "step", "number", "answer", "so", "we"]
        if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
        and len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    ]
    assert len(words) >= 4, words
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    encoder = TextEncoder(tok)
    pool = encoder.encode_pool(texts)
    assert int(encoder._split._tok_len.max()) == 1  # every piece seen is a single token
    for i, text in enumerate(texts):
        assert pool.get(i) == tok(text, add_special_tokens=False)["input_ids"]
