"""chat-plus-minus encoding: linear in the number of steps, and the same tokens and positions as turn-by-turn rendering.

The reference below is prmkit's encoder before issue #24 (it rendered the whole conversation once per step and kept
every prefix): quadratic, but the definition of what the linear encoder must produce.
"""

from __future__ import annotations

import time

import pytest

from prmkit.errors import UsageError
from prmkit.kinds.encoder import KindEncoder
from prmkit.kinds.registry import CHAT_PLUS_MINUS
from prmkit.kinds.spec import KindSettings
from tests.conftest import requires_shared
from tests.test_kinds import CHATML_TEMPLATE, LLAMA3_TEMPLATE, _tokenizer

LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Append-only, but not one fixed string per turn: a numbered header, trimmed content, a system turn first.
NUMBERED_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nBe careful.<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }} {{ loop.index }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
)
# No special token between turns: nowhere to cut the text cleanly, so it is tokenized whole.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# Renders the assistant's "+" unlike any other content: the sentinel that finds each turn is not read like a "+".
CONTENT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' and m['content'] != '+' %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
    "{% endif %}<|eot_id|>{% endfor %}"
)
# Writes a "+" after every assistant turn: each turn's last "+" is not its content, as the old encoder read it.
TRAILING_PLUS_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% if m['role'] == 'assistant' %} +{% endif %}{% endfor %}"
)
# Not a prefix of its continuation: the last turn is marked.
LAST_TURN_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}{% if loop.last %} (last){% endif %}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
)
# Not a prefix of its continuation from the 20th message on only: the bounded check must still find it.
COUNT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if messages | length >= 20 %}<|start_header_id|>note<|end_header_id|>\n\nlong+<|eot_id|>{% endif %}"
)

ROWS = [
    ("What is 6 * 7?", ["So the answer is 42."]),
    ("Which number is larger, 9.8 or 9.11?", ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 42."]),
    (
        "The first equation is 3p + e = 124.",
        [
            "Let's call the price of a pencil p.",
            "3 hours + 5 hours = 8 + 0",
            "  padded step  ",
            "ünïcödé + 😀 step",
            "We check: 6 * 7 = 42. +",
        ],
    ),
    ("Count.", [f"Step {k}: add {k} + {k + 1} to x." for k in range(40)]),
    ("Many.", [f"x{k} = {k % 7} + {k % 3}" for k in range(300)]),  # rendered in several rounds under a limit
]


_OLD: dict = {}


def old_encode(tok, max_length, items, reward="+"):
    """prmkit's chat-plus-minus encoder before issue #24, reduced to its output: (ids, positions) per item."""
    key = (id(tok), tok.chat_template, repr(items))
    if key not in _OLD:  # quadratic: computed once per template and rows, then cut to each max_length
        _OLD[key] = _old_untruncated(tok, items, reward)
    out = []
    for ids, positions in _OLD[key]:
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
            positions = [p if p < max_length else -1 for p in positions]
        out.append((ids, positions))
    return out


def _old_untruncated(tok, items, reward):
    out = []
    for prompt, steps in items:
        conversation, heads = [], []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{prompt} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": reward})
            rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
            heads.append(rendered[: rendered.rfind(reward) + len(reward)])
        if not all(rendered.startswith(head) for head in heads):
            raise UsageError("the chat template does not render a conversation as a prefix of its continuation")
        enc = tok([rendered], add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"][0])
        start_of = {start: i for i, (start, end) in enumerate(enc["offset_mapping"][0]) if end > start}
        positions = []
        for head in heads:
            t = start_of.get(len(head) - len(reward))
            if t is None or t == 0 or ids[t] != tok.encode(reward, add_special_tokens=False)[-1]:
                raise UsageError("reward token is not a token of its own")
            positions.append(t - 1)
        out.append((ids, positions))
    return out


def new_encode(tok, max_length, items):
    encoder = KindEncoder(CHAT_PLUS_MINUS, tok, KindSettings(kind=CHAT_PLUS_MINUS), max_length)
    return [(e.input_ids, e.step_positions) for e in encoder.encode(items)]


@pytest.fixture(scope="module")
def tiny_llama_tokenizer(tmp_path_factory):
    return _tokenizer(
        tmp_path_factory.mktemp("chat-tok"),
        specials=[*LLAMA3_SPECIALS, "<|im_start|>", "<|im_end|>"],
        template=LLAMA3_TEMPLATE,
        bos=True,
    )


@pytest.fixture(scope="module")
def qwen2_llama3_tokenizer():
    from tests.conftest import QWEN2_TOKENIZER

    if not QWEN2_TOKENIZER.exists():
        pytest.skip("needs ../shared/fixtures/qwen2-tokenizer, absent from this clone")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS}, replace_extra_special_tokens=False)
    return tok


def _with_template(tok, template):
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    "template",
    [LLAMA3_TEMPLATE, CHATML_TEMPLATE, NUMBERED_TEMPLATE, PLAIN_TEMPLATE, CONTENT_TEMPLATE, TRAILING_PLUS_TEMPLATE],
    ids=["llama3", "chatml", "numbered", "plain", "content", "trailing-plus"],
)
@pytest.mark.parametrize("max_length", [None, 1, 30, 200, 5000])
def test_chat_encoding_is_the_turn_by_turn_encoding(tiny_llama_tokenizer, template, max_length):
    tok = _with_template(tiny_llama_tokenizer, template)
    try:
        want = old_encode(tok, max_length, ROWS)
    except UsageError as e:
        with pytest.raises(UsageError):
            new_encode(tok, max_length, ROWS)
        assert "token of its own" in str(e)
        return
    got = new_encode(tok, max_length, ROWS)
    assert got == want
    if max_length == 200:  # the long rows are cut, and their later turns have no position
        assert len(got[3][0]) == 200 and got[3][1][-1] == -1 and got[3][1][0] >= 0
    if max_length == 5000:
        assert len(got[4][0]) == 5000 and got[4][1][100] > 0 and got[4][1][-1] == -1


@requires_shared
@pytest.mark.parametrize("max_length", [None, 64, 1000])
def test_chat_encoding_with_the_qwen2_tokenizer_is_the_turn_by_turn_encoding(qwen2_llama3_tokenizer, max_length):
    tok = _with_template(qwen2_llama3_tokenizer, LLAMA3_TEMPLATE)
    rows = [*ROWS, ("Long.", [f"Step {k}: x = {k} * 3 + 1, so x ≈ {k * 3.5}." for k in range(120)])]
    got = new_encode(tok, max_length, rows)
    assert got == old_encode(tok, max_length, rows)


RECORDED = [  # from the encoder before issue #24, with the real Qwen2 BPE and Llama 3's template: (ids, positions)
    (
        [
            151646,
            872,
            151647,
            271,
            3838,
            374,
            220,
            21,
            353,
            220,
            22,
            30,
            2055,
            279,
            4226,
            374,
            220,
            19,
            17,
            13,
            151648,
            151646,
            77091,
            151647,
            271,
            10,
            151648,
            151646,
            872,
            151647,
            271,
            87,
            488,
            220,
            16,
            151648,
            151646,
            77091,
            151647,
            271,
            10,
            151648,
        ],
        [24, 39],
    ),
    (
        [
            151646,
            872,
            151647,
            271,
            48,
            264,
            151648,
            151646,
            77091,
            151647,
            271,
            10,
            151648,
            151646,
            872,
            151647,
            271,
            65,
            151648,
            151646,
            77091,
            151647,
            271,
            10,
            151648,
            151646,
            872,
            151647,
            271,
            66,
            151648,
            151646,
            77091,
            151647,
            271,
            10,
            151648,
        ],
        [10, 22, 34],
    ),
]


@requires_shared
def test_chat_encoding_keeps_the_recorded_ids(qwen2_llama3_tokenizer):
    tok = _with_template(qwen2_llama3_tokenizer, LLAMA3_TEMPLATE)
    rows = [("What is 6 * 7?", ["So the answer is 42.", "x + 1"]), ("Q", ["a", "b", "c"])]
    assert new_encode(tok, None, rows) == RECORDED
    assert new_encode(tok, 30, [("Q", ["a", "b", "c"])]) == [(RECORDED[1][0][:30], [10, 22, -1])]


@pytest.mark.parametrize("template", [LAST_TURN_TEMPLATE, COUNT_TEMPLATE], ids=["last-turn", "message-count"])
def test_a_template_that_is_not_a_prefix_of_its_continuation_is_refused(tiny_llama_tokenizer, template):
    tok = _with_template(tiny_llama_tokenizer, template)
    with pytest.raises(UsageError, match="prefix of its continuation"):
        old_encode(tok, None, ROWS)
    with pytest.raises(UsageError, match="prefix of its continuation"):
        new_encode(tok, None, ROWS)


def _counting(tok, monkeypatch, limit):
    calls = []
    render = type(tok).apply_chat_template

    def counted(self, conversation, *args, **kwargs):
        calls.append(len(conversation))
        if len(calls) > limit:
            raise AssertionError(f"more than {limit} chat template renders")
        return render(self, conversation, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", counted)
    return calls


@pytest.mark.parametrize("max_length", [pytest.param(None, marks=pytest.mark.slow), 512])  # None: 20k steps tokenized
def test_many_steps_take_a_bounded_number_of_renders(tiny_llama_tokenizer, monkeypatch, max_length):
    tok = _with_template(tiny_llama_tokenizer, LLAMA3_TEMPLATE)
    n = 20_000
    steps = [f"Step {k}: add 3 to x." for k in range(n)]
    original = type(tok).apply_chat_template
    calls = _counting(tok, monkeypatch, limit=40)
    t0 = time.perf_counter()
    [(ids, positions)] = new_encode(tok, max_length, [("What is x?", steps)])
    seconds = time.perf_counter() - t0
    monkeypatch.setattr(type(tok), "apply_chat_template", original)
    if max_length is not None:  # what the turns read see is the shorter conversation's, as before
        [(old_ids, old_positions)] = old_encode(tok, max_length, [("What is x?", steps[:100])])
        assert ids == old_ids and positions == old_positions + [-1] * (n - 100)
    # The first turn, the turns max_length reaches (in up to 5 rounds), then each checked shorter conversation: the
    # first 16 turns, every power of two, the last turn read.
    assert len(calls) <= 1 + 5 + 16 + 15 + 1
    assert sum(calls) <= 4 * (2 * n)  # messages rendered: linear in the steps, not n²/2
    if max_length is not None:
        assert sum(calls) < 2_000  # only the turns max_length reaches
    assert len(positions) == n
    if max_length is None:
        assert min(positions) > 0 and sorted(positions) == positions
    else:
        assert len(ids) == max_length and positions[0] > 0 and positions[-1] == -1
        read = [p for p in positions if p >= 0]
        assert sorted(read) == read and read[-1] < max_length and len(read) < 100
    # Generous: the old encoder took about 3 s for 1,000 steps on this machine, 20 times this row's for 20,000.
    assert seconds < 30
