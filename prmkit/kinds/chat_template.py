"""Chat templates rendered with limits on time and size.

A chat template is code from a model repository or a user's config. transformers renders it in jinja's immutable
sandbox, which keeps it away from Python's internals but not from the machine's time and memory: two nested loops
run 10^10 times, and ``'x' * 10**9`` takes gigabytes. :func:`render_chat` renders a conversation as
``tokenizer.apply_chat_template(messages, tokenize=False)`` does, in the same environment (transformers' own
filters, globals and extensions), with a clock and a size limit checked in every loop and at every call, operator and
output chunk. Breaking a limit raises :class:`TemplateLimitError`.
"""

from __future__ import annotations

import functools
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

RENDER_SECONDS = 10.0
"""The most one rendering may take. Real templates take milliseconds, even for thousands of turns."""
MIN_CHARS = 16 << 20
"""The smallest limit on the rendered text and on any string or list a template builds; the limit grows to four times
the conversation's own size, since a template adds headers around each message."""
MAX_POW_BITS = 1 << 16
"""The largest integer ``**`` may build, in bits (``10**10**9`` alone would compute for hours)."""

_ITER, _SIZED = "prmkit_bounded_iter", "prmkit_sized"
# A width or precision of nine digits or more in a format string ("%999999999d", "{:>999999999}").
_HUGE_WIDTH = re.compile(r"\d{9,}")


class TemplateLimitError(SecurityError):
    """A chat template went beyond :data:`RENDER_SECONDS` or the size limit."""


@dataclass(frozen=True)
class _Limits:
    deadline: float
    chars: int
    seconds: float


_limits: ContextVar[_Limits | None] = ContextVar("prmkit_template_limits", default=None)


def _check_time() -> None:
    limits = _limits.get()
    if limits is not None and time.monotonic() > limits.deadline:
        raise TemplateLimitError(f"rendering took longer than {limits.seconds:g} s (a runaway loop?)")


def _check_size(n: int, what: str = "a value") -> None:
    limits = _limits.get()
    if limits is not None and n > limits.chars:
        raise TemplateLimitError(
            f"{what} of more than {limits.chars:,} characters or items (the limit is four "
            f"times the conversation, at least {MIN_CHARS:,})"
        )


def _check_args(args: Any, kwargs: dict[str, Any]) -> None:
    # A count beyond the size limit ('x'.ljust(n), 'x'|center(n), lipsum(n)) would build something at least as big.
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _check_size(abs(value), "an argument")


def _check_format(text: Any) -> None:
    if isinstance(text, str) and _HUGE_WIDTH.search(text):
        raise TemplateLimitError("a format string with a width or precision of nine digits or more")


def _check_str_method(method: Any, args: tuple) -> None:
    """The length of what ``replace``, ``join`` and ``expandtabs`` would build, before they build it."""
    text, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(text, str):
        return
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = text.count(args[0]) if args[0] else len(text) + 1
        _check_size(len(text) + hits * max(len(args[1]) - len(args[0]), 0))
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        _check_size(len(text) * max(len(args[0]) - 1, 0))
    elif name == "expandtabs" and args and isinstance(args[0], int):
        _check_size(len(text) + text.count("\t") * args[0])


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)):
        _check_size(len(value))
    return value


class _Bounded:
    """An iterable that looks at the clock every 64 items: a loop's body need not call anything for it to stop."""

    __slots__ = ("_items",)

    def __init__(self, items: Any):
        self._items = items

    def __len__(self) -> int:  # jinja's ``loop.length`` and ``loop.last`` read it when there is one
        return len(self._items)

    def __iter__(self):
        for n, item in enumerate(self._items):
            if not n & 63:
                _check_time()
            yield item


class _Instrument(NodeTransformer):
    """Every ``{% for %}`` iterates through :class:`_Bounded`; every ``~`` concatenation's length is checked."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # visits the children in place and returns the node itself
        node.iter = nodes.Filter(node.iter, _ITER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, _SIZED, [], [], None, None, lineno=node.lineno)


class LimitedTemplate(jinja2.Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        # Template.render joins every chunk at the end; counting them as they come stops an endless output early.
        ctx = self.new_context(dict(*args, **kwargs))
        out: list[str] = []
        total = 0
        try:
            for chunk in self.root_render_func(ctx):
                total += len(chunk)
                _check_size(total, "a rendering")
                _check_time()
                out.append(chunk)
        except Exception:
            self.environment.handle_exception()
        return self.environment.concat(out)


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the clock and the size limit checked at operators, calls and loops."""

    template_class = LimitedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        sized = (str, list, tuple)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, sized) and isinstance(n, int):
                    _check_size(len(seq) * n)
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length(), 1) * right > MAX_POW_BITS:
                raise TemplateLimitError(f"an integer power of more than {MAX_POW_BITS:,} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args(args, kwargs)
        _check_str_method(__obj, args)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        # The sandbox's hook for `str.format` and `str.format_map`: the format string is checked before the call.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(getattr(value, "__self__", None))
        return wrapped

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Instrument().visit(super()._parse(source, name, filename))


def _guarded_filter(name: str, fn: Any) -> Any:
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args(args, kwargs)
        if name == "format" and args:
            _check_format(args[0])
        return fn(*args, **kwargs)

    return guarded


@functools.lru_cache(maxsize=1)
def _environment() -> LimitedEnvironment:
    # transformers' own environment (its extensions such as {% generation %}, tojson, raise_exception,
    # strftime_now, its dict and namespace), copied into the limited one.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    base = _compile_jinja_template("").environment
    env = LimitedEnvironment(
        trim_blocks=base.trim_blocks,
        lstrip_blocks=base.lstrip_blocks,
        extensions=[type(e) for e in base.extensions.values()],
    )
    env.globals.update({k: v for k, v in base.globals.items() if k != "range"})  # the sandbox's own range is capped
    env.globals.pop("lipsum", None)  # no chat template needs jinja's lorem ipsum generator
    env.filters.update({name: _guarded_filter(name, fn) for name, fn in base.filters.items()})
    env.filters[_ITER] = _Bounded
    env.filters[_SIZED] = _sized
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> LimitedTemplate:
    return _environment().from_string(source)  # type: ignore[return-value]


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None, seconds: float | None = None
) -> str:
    """``tokenizer.apply_chat_template(messages, chat_template=..., tokenize=False, add_generation_prompt=False)``,
    within :data:`RENDER_SECONDS` (or ``seconds``) and the size limit; :class:`TemplateLimitError` past either."""
    source = tokenizer.get_chat_template(chat_template)
    size = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    seconds = RENDER_SECONDS if seconds is None else seconds
    token = _limits.set(_Limits(time.monotonic() + seconds, max(MIN_CHARS, 4 * size), seconds))
    try:
        # What apply_chat_template passes a template: the messages, no tools or documents, the special tokens.
        return compile_template(source).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
    finally:
        _limits.reset(token)
