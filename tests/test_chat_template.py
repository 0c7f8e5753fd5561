"""Chat templates render as transformers renders them, within a time and a size limit."""

from __future__ import annotations

import time

import pytest

from prmkit.kinds.chat_template import TemplateLimitError, render_chat

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tpl"), bos=True))
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize(
    "template",
    [
        None,  # the tokenizer's own
        "{{ bos_token }}{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.content | tojson }}"
        "{% if loop.last %}!{% endif %}{% generation %}{{ m.role ~ '.' }}{% endgeneration %}{% endfor %}"
        "{{ '%s|%5d|{:>4}'.format('x') % ('y', 7) }}{{ 'a b'.split(' ') | join('-') }}{{ raise_exception is defined }}",
    ],
)
def test_renders_as_apply_chat_template(tok, template):
    messages = [
        {"role": "user", "content": 'a "quoted" <|im_end|> step'},
        {"role": "assistant", "content": "+"},
        {"role": "user", "content": "step 2"},
        {"role": "assistant", "content": "-"},
    ]
    want = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=False)
    assert render_chat(tok, messages, template) == want


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        # No call, filter or output inside the loops: only the loops' own iteration can stop them.
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    ],
)
def test_a_runaway_template_stops_at_the_time_limit(tok, template):
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match=r"rendering took longer than 0.3 s"):
        render_chat(tok, HI, template, seconds=0.3)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize(
    "template, what",
    [
        ("{{ 'x' * 10**9 }}", "a value of more than 16,777,216 characters"),
        ("{{ [0] * 10**9 }}", "a value of more than"),
        ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "a value"),
        ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "a value"),
        ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "a rendering of more than"),
        ("{{ 'x'.ljust(10**9) }}", "an argument of more than"),
        ("{{ 'x' | center(10**9) }}", "an argument of more than"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),  # a million paragraphs of lorem ipsum
        ("{{ '%999999999d' % 1 }}", "a format string with a width"),
        ("{{ '{:>999999999}'.format(1) }}", "a format string with a width"),
        ("{{ ('a' * 100000).replace('', 'x' * 1000) }}", "a value of more than"),
        ("{{ 10 ** (10 ** 9) }}", "an integer power"),
    ],
)
def test_a_template_cannot_build_a_huge_value(tok, template, what):
    start = time.monotonic()
    with pytest.raises(Exception, match=what):
        render_chat(tok, HI, template)
    assert time.monotonic() - start < 3


def test_the_size_limit_grows_with_the_conversation(tok):
    # Four times the conversation's text (5 MiB and "user"): a long conversation renders, repeated five times not.
    messages = [{"role": "user", "content": "z" * (5 << 20)}]
    assert len(render_chat(tok, messages)) == len("<|im_start|>user\n<|im_end|>\n") + (5 << 20)
    with pytest.raises(TemplateLimitError, match="a rendering of more than 20,971,536 "):
        render_chat(tok, messages, "{% for i in range(5) %}{{ messages[0].content }}{% endfor %}")
