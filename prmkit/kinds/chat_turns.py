"""chat-plus-minus: every turn of a conversation read from one rendering, in time linear in the number of turns.

RLHFlow's usage code renders the conversation once per step and reads the logits before each rendering's last ``+``.
One forward pass over the conversation reads the same, provided each shorter conversation renders as a prefix of the
longer one (true of append-only chat templates). Rendering every shorter conversation to see that, as prmkit did
before, is quadratic in the steps (4,000 steps took 71 s), so instead:

- Only the turns that ``max_length`` reaches are rendered, and only as far as it needs are they tokenized. The first
  turns are rendered, twice as many while their tokens fall short. The text is cut just before an added token (which
  the tokenizer splits off before normalizing or pre-tokenizing, so the tokens before it are exactly the longer text's
  first tokens), and the cut lies before the last turn's ``+``, which a longer conversation renders the same.
- The conversation is rendered with a sentinel for each assistant ``+``, which finds every turn's ``+`` in the text.
- The prefix property is checked on a bounded set of the turns that are read (the first 16, every power of two, and
  the last one read). Each shorter conversation, rendered as it is, must be the text up to the ``+`` the sentinel
  found.
- A template that writes a ``+`` after a turn's own, or renders the sentinel unlike a ``+``, fails that check. So
  does one that is no prefix of its continuation (it marks the last turn, or counts messages). Each is read the exact
  way instead: every shorter conversation rendered as it is, up to the last turn read, and the one that is not a
  prefix of its continuation refused.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prmkit.errors import UsageError
from prmkit.tokenization import Encoded

# Private-use code points: not text a solution holds; one that does is read the exact way (the count differs).
SENTINEL = "\ue000prmkit-reward-token\ue001"
FIRST_CHECKED = 16
# The first cut is this many characters per token wanted (templates run 3-6), then four times further each time.
CHARS_PER_TOKEN = 6
# The first rendering has max_length / this many turns (a turn is rarely under 8 tokens), then twice as many each time.
TOKENS_PER_TURN = 8


def checked_turns(read: int) -> list[int]:
    """The turns (1-based) whose shorter conversation is rendered: the first 16, every power of two, the last read."""
    turns = set(range(1, min(read, FIRST_CHECKED) + 1)) | {1 << j for j in range(read.bit_length())}
    if read:
        turns.add(read)
    return sorted(turns)


def not_a_prefix() -> UsageError:
    return UsageError(
        "the chat template does not render a conversation as a prefix of its continuation, "
        "so its turns cannot be scored in one pass",
        hint="set model.chat_template",
    )


@dataclass
class _Row:
    """One solution's conversation and how far it is rendered and tokenized."""

    messages: list[dict[str, str]]
    least: int  # the first turn's "+" ends here: it is always tokenized
    turns: int = 0  # rendered: messages[: 2 * turns]
    chars: int | None = None  # tokenized: the text up to the first added token from here (None: all of it)
    exact: bool = False  # rendered as it is, and every turn's "+" found by rendering its conversation
    text: str = ""
    starts: list[int] | None = None  # each rendered turn's "+" in text (sentinel rendering only)
    ids: list[int] = field(default_factory=list)  # tokenized (empty before)
    offsets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.messages) // 2


class ChatTurns:
    """Encodes solutions for a chat-plus-minus :class:`~prmkit.kinds.encoder.KindEncoder` (its template, tokens and
    limit)."""

    def __init__(self, encoder: Any):
        self.render = encoder._render
        self.tokenizer = encoder.tokenizer
        self.plus = encoder.settings.reward_tokens[0]
        self.plus_id = encoder.reward_ids[0]
        self.max_length = encoder.max_length
        # Added tokens matched in the raw text (not normalized, not eating the whitespace before them).
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        self.cut_ids = {
            t.content: i
            for i, t in decoder.items()
            if t.content and not t.lstrip and not t.single_word and not t.normalized
        }
        names = sorted(self.cut_ids, key=len, reverse=True)
        self.cut_pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Encoded]:
        rows = []
        for prompt, steps in items:
            messages = []
            for k, step in enumerate(steps):
                messages.append({"role": "user", "content": f"{prompt} {step}" if k == 0 else step})
                messages.append({"role": "assistant", "content": self.plus})
            # However short max_length, the first turn is tokenized: a template whose "+" is no token is refused.
            rows.append(_Row(messages, least=self.render(messages[:2]).rfind(self.plus) + len(self.plus)))
        self._tokenize(rows)
        return [self._encoded(row) for row in rows]

    # -- rendering and tokenizing as far as max_length needs --------------------------------------------------------

    def _tokenize(self, rows: list[_Row]) -> None:
        need = None if self.max_length is None else self.max_length + 1
        for row in rows:
            row.turns = row.n if need is None else min(row.n, max(FIRST_CHECKED, need // TOKENS_PER_TURN))
            row.chars = None if need is None else max(CHARS_PER_TOKEN * need, row.least)
            self._render_turns(row)
        todo = rows
        while todo:  # one batched tokenizer call per round (the Rust tokenizer encodes the texts in parallel)
            cuts = [self._cut(row) for row in todo]
            pieces = [row.text if cut is None else row.text[: cut[1]] for row, cut in zip(todo, cuts)]
            enc = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
            again = []
            for row, cut, ids, offsets in zip(todo, cuts, enc["input_ids"], enc["offset_mapping"]):
                row.ids, row.offsets = list(ids), [tuple(o) for o in offsets]
                if self._further(row, cut, need):
                    again.append(row)
            todo = again

    def _render_turns(self, row: _Row) -> None:
        messages = row.messages[: 2 * row.turns]
        if not row.exact:
            marked = self.render([{**m, "content": SENTINEL} if m["role"] == "assistant" else m for m in messages])
            parts = marked.split(SENTINEL)
            if len(parts) == row.turns + 1:
                row.text, row.starts, at = self.plus.join(parts), [], 0
                for part in parts[:-1]:
                    at += len(part)
                    row.starts.append(at)
                    at += len(self.plus)
                return
            row.exact = True
        row.text, row.starts = self.render(messages), None

    def _cut(self, row: _Row) -> tuple[int, int, int] | None:
        """(start, end, id) of the first added token from ``row.chars`` on; None: tokenize the whole text."""
        end = self._cut_before(row)
        if row.chars is None or self.cut_pattern is None or row.chars >= end:
            return None
        found = self.cut_pattern.search(row.text, row.chars, end)
        return None if found is None else (found.start(), found.end(), self.cut_ids[found.group()])

    def _cut_before(self, row: _Row) -> int:
        # Short of the whole conversation, before the last rendered turn's "+": a template may end a conversation
        # with what a longer one does not have there.
        if row.turns == row.n:
            return len(row.text)
        return row.starts[-1] if row.starts is not None else row.text.rfind(self.plus)

    def _further(self, row: _Row, cut: tuple[int, int, int] | None, need: int | None) -> bool:
        """After tokenizing: drop the added token cut at, or go further (True: tokenize again)."""
        if cut is not None:
            assert row.chars is not None, "_cut cuts only from row.chars on"
            start, end, token = cut
            if not row.ids or row.ids[-1] != token or row.offsets[-1] != (start, end):
                row.turns, row.chars = row.n, None  # not split off there: the whole conversation is tokenized
                self._render_turns(row)
                return True
            del row.ids[-1], row.offsets[-1]
            if need is None or len(row.ids) >= need:
                return False
            row.chars = 4 * row.chars
            if row.chars < self._cut_before(row) or row.turns == row.n:
                return True
        elif row.turns == row.n:
            return False  # the whole conversation, tokenized whole
        row.turns = min(row.n, 2 * row.turns)  # no added token to cut at, or too few tokens before the last turn
        self._render_turns(row)
        return True

    # -- where each turn is read -------------------------------------------------------------------------------------

    def _encoded(self, row: _Row) -> Encoded:
        limit = self.max_length
        # A turn is read when its "+" is token `limit` or before: it starts at or before that token's start. Fewer
        # tokens than that are the whole conversation's.
        last_read = row.offsets[limit][0] if limit is not None and len(row.ids) > limit else len(row.text)
        starts = row.starts
        if starts is not None and not self._sampled_turns_hold(row, starts, max(bisect_right(starts, last_read), 1)):
            row.exact = True  # the first turn is checked above however short the limit
            self._tokenize([row])
            last_read = row.offsets[limit][0] if limit is not None and len(row.ids) > limit else len(row.text)
        if row.exact:
            starts = self._exact_starts(row, last_read)
        assert starts is not None, "a rendering that is not exact found every turn's start"
        start_of = {start: i for i, (start, end) in enumerate(row.offsets) if end > start}
        tokenized = row.offsets[-1][1] if row.offsets else 0
        positions = []
        for start in starts:
            if start >= tokenized:
                positions.append(-1)
                continue
            t = start_of.get(start)
            if t is None or t == 0 or row.ids[t] != self.plus_id:
                raise UsageError(
                    f"reward token {self.plus!r} is not a token of its own in the chat template's assistant turn",
                    hint="check model.reward_tokens and model.chat_template",
                )
            positions.append(t - 1 if limit is None or t - 1 < limit else -1)  # the logits that predict the "+"
        positions += [-1] * (row.n - len(positions))  # turns past the limit, not rendered
        return Encoded(row.ids[:limit] if limit is not None else row.ids, positions, 0)

    def _sampled_turns_hold(self, row: _Row, starts: list[int], read: int) -> bool:
        """Whether each turn of :func:`checked_turns`, rendered alone, is the text up to the "+" found for it."""
        for k in checked_turns(read):
            rendered = self.render(row.messages[: 2 * k])
            head = rendered.rfind(self.plus)
            if head != starts[k - 1] or not row.text.startswith(rendered[: head + len(self.plus)]):
                return False
        return True

    def _exact_starts(self, row: _Row, last_read: int) -> list[int]:
        """Every shorter conversation rendered, as the usage code does, until a turn lies past the limit."""
        starts = []
        for k in range(1, row.n + 1):
            rendered = self.render(row.messages[: 2 * k])
            end = rendered.rfind(self.plus) + len(self.plus)
            if not row.text.startswith(rendered[:end]):
                raise not_a_prefix()
            starts.append(end - len(self.plus))
            if starts[-1] > last_read:
                break
        return starts
