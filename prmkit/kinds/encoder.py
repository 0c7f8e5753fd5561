"""A kind's text layout: the tokens of (prompt, steps) and the positions whose scores are the steps' scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prmkit.errors import DataError, UsageError, first_line
from prmkit.kinds.chat_turns import ChatTurns
from prmkit.kinds.registry import CHAT_TURNS, TAG_TEXT, get_kind
from prmkit.kinds.spec import KindSettings, reward_token_ids
from prmkit.tokenization import Encoded


class KindEncoder:
    """Tokenizes solutions for one kind; ``encode(items)`` gives :class:`Encoded` rows for the scoring engine."""

    def __init__(self, kind: str, tokenizer: Any, settings: KindSettings, max_length: int | None):
        self.kind = kind
        self.spec = spec = get_kind(kind)
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_length = max_length
        self.tag = settings.tag()
        if spec.uses_step_tag:
            self.tag_id = self._tag_id()
        if spec.reads_reward_tokens:
            self.reward_ids = reward_token_ids(tokenizer, settings, kind)
            # Recorded in prmkit.json (train) and in every result's identity (score, eval).
            self.settings = settings = replace(settings, reward_token_ids=self.reward_ids)
        if spec.needs_chat_template:
            self.template = settings.chat_template or getattr(tokenizer, "chat_template", None)
            if not self.template:
                raise UsageError(
                    f"model.kind {kind} needs a chat template, and the tokenizer has none",
                    hint="set model.chat_template to the model's Jinja template",
                )

    def _tag_id(self) -> int:
        # As the authors' code: the id `encode(tag)` ends with (Qwen: `encode("<extra_0>")[0]`, one token either way).
        ids = self.tokenizer.encode(self.tag, add_special_tokens=False)
        if self.spec.tag_single_token and len(ids) != 1:
            raise UsageError(
                f"step token {self.tag!r} is not a single token of this tokenizer",
                hint="set model.step_tag to the model's step token",
            )
        if not ids:
            raise UsageError(f"step tag {self.tag!r} encodes to no token")
        return ids[-1]

    # -- per kind -------------------------------------------------------------------------------------------------

    def _check_steps(self, steps: Sequence[str], where: str) -> None:
        for k, step in enumerate(steps):
            if self.spec.uses_step_tag and self.tag in step:
                raise DataError(
                    f"{where}: step {k + 1} contains the step tag {self.tag!r}, which would be read as a step end",
                    hint="remove it, or set model.step_tag",
                )

    def _render(self, messages: list[dict[str, str]]) -> str:
        from prmkit.kinds.chat_template import (
            render_chat,  # apply_chat_template's rendering, with time and size limits
        )

        try:
            return render_chat(self.tokenizer, messages, self.settings.chat_template)
        except Exception as e:  # a Jinja error in a user's template, or a limit it broke
            which = (
                "model.chat_template"
                if self.settings.chat_template
                else f"the chat template of {getattr(self.tokenizer, 'name_or_path', '') or 'the tokenizer'}"
            )
            raise UsageError(
                f"the chat template failed ({which}): {first_line(e)}", hint="check model.chat_template"
            ) from None

    def _text(self, prompt: str, steps: Sequence[str]) -> str:
        """The text a model of a tag layout reads (:data:`~prmkit.kinds.registry.TAG_TEXT` or ``TAG_CHAT``)."""
        if self.spec.layout == TAG_TEXT:
            return f"{prompt} " + "\n".join(f"{step} {self.tag}" for step in steps)
        system = (
            self.settings.system_prompt
            if self.settings.system_prompt is not None
            else self.spec.default_system_prompt or ""
        )
        return self._render(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": self.tag.join(steps) + self.tag},
            ]
        )

    def _positions(self, ids: list[int]) -> list[int]:
        return [i for i, t in enumerate(ids) if t == self.tag_id]

    def encode(self, items: Sequence[tuple[str, Sequence[str]]], where: Sequence[str] | None = None) -> list[Encoded]:
        """One :class:`Encoded` per solution; ``where`` names each item in errors (default: "solution N")."""
        places = list(where) if where is not None else [f"solution {n}" for n in range(1, len(items) + 1)]
        for i, (_, steps) in enumerate(items):
            self._check_steps(steps, places[i])
        todo = [i for i, (_, steps) in enumerate(items) if steps]
        out = [Encoded([], [], 0) for _ in items]
        if self.spec.layout == CHAT_TURNS:
            for i, encoded in zip(todo, ChatTurns(self).encode([items[i] for i in todo])):
                out[i] = encoded
            return out
        # One batched call: the Rust tokenizer encodes the texts in parallel. As the authors' code: `encode(text)`
        # (special tokens such as a BOS added).
        texts = [self._text(items[i][0], list(items[i][1])) for i in todo]
        enc = self.tokenizer(texts, add_special_tokens=True) if texts else {}
        for j, i in enumerate(todo):
            ids = list(enc["input_ids"][j])
            positions = self._positions(ids)
            n_steps = len(items[i][1])
            if len(positions) != n_steps:
                raise DataError(
                    f"{places[i]}: found {len(positions)} step tags for {n_steps} steps; "
                    f"the tag {self.tag!r} must stay one token in context",
                    hint="set model.step_tag to a token the tokenizer keeps whole (an added special token is safest)",
                )
            if self.max_length is not None and len(ids) > self.max_length:
                ids = ids[: self.max_length]
                positions = [p if p < self.max_length else -1 for p in positions]
            out[i] = Encoded(ids, positions, 0)
        return out
