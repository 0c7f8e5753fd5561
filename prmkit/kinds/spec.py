"""PRM kinds: where each published kind of process reward model reads a step's score, as its authors' own code does.

| kind | input | score of a step |
|---|---|---|
| ``token-classification`` | TRL's tokenization (:mod:`prmkit.tokenization`) | softmax[:, 1] at the step's last
separator token |
| ``qwen-prm`` | chat: system prompt, user = problem, assistant = steps each followed by ``<extra_0>`` | a
Linear-ReLU-Linear head, softmax[:, 1] at each ``<extra_0>`` |
| ``lm-tag`` | ``"{problem} {step 1} {tag}\\n{step 2} {tag}..."`` (Math-Shepherd's layout) | LM logits at the tag,
softmax over the two reward tokens, p(``+``) |
| ``chat-plus-minus`` | chat: user = problem + step 1, then one step per user turn, every assistant turn ``+`` | LM
logits at the token before each assistant ``+``, softmax over ``+``/``-``, p(``+``) |

Every kind is causal, so every step of a solution is scored in ONE forward pass: the position read for step k sees
exactly what the authors' prefix-by-prefix code shows the model for step k. The engine
(:class:`prmkit.scoring.StepScorer`) is the same for all kinds: a kind gives it the tokens and the positions to read
(:class:`KindEncoder`), and a model whose ``logits[..., 1]`` vs ``logits[..., 0]`` is "step correct" vs "wrong"
(for the LM kinds, :class:`RewardTokenHead` computes just the two reward-token rows of the LM head, not the vocabulary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.errors import UsageError, shown
from prmkit.kinds.registry import (
    AUTO,
    CAUSAL_LM_SUFFIXES,
    CHAT_TEMPLATE,
    DEFAULT_KIND,
    KINDS,
    MATH_SHEPHERD_TAG,
    REWARD_TOKEN_PAIR,
    STEP_TAG_TOKEN,
    find_kind,
    kind_marked_by,
)

log = logging.getLogger("prmkit")


@dataclass
class KindSettings:
    """The kind-specific keys of ``model.*``: the documented values of each kind's authors are the defaults."""

    kind: str = AUTO
    step_tag: str | None = None
    """lm-tag: the tag after each step (Math-Shepherd's ``ки``); qwen-prm: the step token (``<extra_0>``)."""
    reward_tokens: tuple[str, str] = REWARD_TOKEN_PAIR
    """lm-tag and chat-plus-minus: the "correct" and "wrong" tokens."""
    reward_token_ids: tuple[int, int] | None = None
    """lm-tag and chat-plus-minus: the two tokens' ids as the model was trained on them (prmkit.json records them)."""
    pair_encoded: bool = False
    """lm-tag: the ids come from ``encode("+ -")``, as prmkit read them before it recorded ``reward_token_ids``."""
    system_prompt: str | None = None
    """qwen-prm: the system turn (Qwen2.5-Math-PRM's own by default)."""
    chat_template: str | None = None
    """qwen-prm and chat-plus-minus: a Jinja chat template used instead of the tokenizer's own."""

    def tag(self) -> str:
        if self.step_tag:
            return self.step_tag
        kind = find_kind(self.kind)
        return kind.default_tag if kind is not None and kind.default_tag else MATH_SHEPHERD_TAG

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        kind = find_kind(self.kind)
        if kind is not None and kind.uses_step_tag:
            out["step_tag"] = self.tag()
        if kind is not None and kind.reads_reward_tokens:
            out["reward_tokens"] = list(self.reward_tokens)
            if self.reward_token_ids is not None:
                out["reward_token_ids"] = list(self.reward_token_ids)
        if kind is not None and kind.default_system_prompt is not None:
            out["system_prompt"] = self.system_prompt if self.system_prompt is not None else kind.default_system_prompt
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    @classmethod
    def from_sources(cls, explicit: dict[str, Any] | None, recorded: dict[str, Any] | None) -> KindSettings:
        """Explicit keys (config) win over what a model directory recorded; unset explicit keys are ignored."""
        for source in (recorded or {}, explicit or {}):
            tag = source.get("step_tag")
            if tag is not None and not (isinstance(tag, str) and tag):
                # An empty tag would fall back to the default one, not the tag the model was trained with.
                raise UsageError(
                    f"model.step_tag must be a non-empty string, got {shown(tag)}",
                    hint="leave it unset (null) to use the model's own tag",
                )
        merged: dict[str, Any] = {}
        for source in (recorded or {}, explicit or {}):
            for key, value in source.items():
                if key == "pair_encoded":
                    continue
                if key in cls.__dataclass_fields__ and value is not None and not (key == "kind" and value == AUTO):
                    if source is explicit and key in merged and _same(merged[key]) != _same(value):
                        log.warning(
                            f"model.{key}: using {shown(value)}, not the {shown(merged[key])} the model "
                            "recorded at training; its scores may not mean what they meant then"
                        )
                    merged[key] = value
        if "reward_tokens" in merged:
            tokens = merged["reward_tokens"]
            if (
                not isinstance(tokens, (list, tuple))
                or len(tokens) != 2
                or not all(isinstance(t, str) and t for t in tokens)
            ):
                raise UsageError(
                    f"model.reward_tokens must be two non-empty strings (correct, wrong), got {shown(tokens)}"
                )
            merged["reward_tokens"] = tuple(tokens)
        recorded = recorded or {}
        if "reward_token_ids" in merged:
            ids = merged["reward_token_ids"]
            if (
                not isinstance(ids, (list, tuple))
                or len(ids) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            ):
                raise UsageError(f"kind.reward_token_ids must be two token ids (correct, wrong), got {ids!r}")
            if _same(merged.get("reward_tokens", REWARD_TOKEN_PAIR)) != _same(
                recorded.get("reward_tokens", REWARD_TOKEN_PAIR)
            ):
                del merged["reward_token_ids"]  # recorded for other tokens than the ones now asked for
            else:
                merged["reward_token_ids"] = tuple(ids)
        elif _legacy_pair_encoded(recorded.get("kind")) and "reward_tokens" in recorded:
            # prmkit.json from before reward_token_ids was recorded: such a model was trained on encode("+ -").
            merged["pair_encoded"] = True
        return cls(**merged)


def _legacy_pair_encoded(name: Any) -> bool:
    kind = find_kind(name)
    return kind is not None and kind.legacy_pair_encoded


def _same(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return jsonio.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def detect_kind(
    config: dict[str, Any], metadata: dict[str, Any] | None, tokenizer: Any, settings: KindSettings, name: str
) -> str:
    """The kind of a model: explicit setting, then ``prmkit.json``, then ``config.json`` architectures and the
    tokenizer.

    Never a silent guess: a causal LM that could be read more than one way is refused with the choices listed.
    """
    if settings.kind != AUTO:
        if settings.kind not in KINDS:
            raise UsageError(f"unknown model.kind {settings.kind!r}", hint=f"one of auto, {', '.join(KINDS)}")
        return settings.kind
    if metadata is not None:
        recorded = (
            (metadata.get("kind") or {}).get("kind") if isinstance(metadata.get("kind"), dict) else metadata.get("kind")
        )
        return recorded or DEFAULT_KIND  # prmkit models before kinds existed are all token classifiers
    architectures = [str(a) for a in (config.get("architectures") or [])]
    marked = kind_marked_by(architectures)
    if marked is not None:
        return marked.name
    if any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        return _causal_lm_kind(architectures, tokenizer, settings, name)
    raise UsageError(
        f"model {name!r}: cannot tell its PRM kind from architectures {architectures or 'none'}",
        hint=f"set model.kind to one of {', '.join(KINDS)}",
    )


def _causal_lm_kind(architectures: list[str], tokenizer: Any, settings: KindSettings, name: str) -> str:
    """The kind of a causal LM with no PRM architecture: the one kind its tokenizer reads as, else refused."""
    readers = [kind for kind in KINDS.values() if kind.causal_signature is not None]  # in the order of KINDS
    tag = settings.tag()
    tag_is_token = tokenizer is not None and _single_token(tokenizer, tag) is not None
    tag_is_special = tokenizer is not None and tag in _special_tokens(tokenizer)
    has_template = settings.chat_template is not None or bool(getattr(tokenizer, "chat_template", None))
    if tag_is_special:
        # a placeholder added for PRM training (OpenRLHF, prmkit) is unambiguous
        return next(kind.name for kind in readers if kind.causal_signature == STEP_TAG_TOKEN)
    found = {STEP_TAG_TOKEN: tag_is_token, CHAT_TEMPLATE: has_template}
    choices = [kind.name for kind in readers if found.get(kind.causal_signature or "")]
    if len(choices) == 1:
        return choices[0]
    if not choices:
        raise UsageError(
            f"model {name!r} is a causal LM ({', '.join(architectures)}) with no trained token-classification head, "
            "no step tag token and no chat template: its scores would mean nothing",
            hint="score a PRM trained by `prmkit train` (or TRL's PRMTrainer), not a base model; for an LM-head "
            f"PRM set model.kind={' or '.join(kind.name for kind in readers)} (README, PRM kinds)",
        )
    raise UsageError(
        f"model {name!r} is a causal LM ({', '.join(architectures)}) that reads as more than one PRM kind "
        f"({' or '.join(choices)}): set model.kind",
        hint=" or ".join(f"--set model.kind={kind.name} ({kind.summary})" for kind in readers)
        + "; in eval, MODEL@KIND",
    )


def _special_tokens(tokenizer: Any) -> set[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if added is not None:
        names |= set(added())
    return names


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id when ``text`` is one token of the vocabulary, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(tid, int) and tid != unk and tid is not None:
        return tid
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def local_config(name: str) -> dict[str, Any]:
    path = Path(name).expanduser() / "config.json"
    return _read_json(path) if path.is_file() else {}


def reward_token_ids(tokenizer: Any, settings: KindSettings, kind: str) -> tuple[int, int]:
    """(correct, wrong) ids: the ones the model recorded at training, else each reward token encoded on its own.

    Encoding each token alone is OpenRLHF's `convert_token_to_id` (`encode(token)`, exactly one id). On a
    SentencePiece tokenizer (Mistral, Llama 2) it gives the ids of Math-Shepherd's card, `encode("+ -")[1:]` (`▁+`,
    `▁-`); on a byte-level BPE (Qwen2, Llama 3) the card's reading would take `+` and ` -`, a pair no trainer meant.
    """
    good, bad = settings.reward_tokens
    alone = [tokenizer.encode(t, add_special_tokens=False) for t in (good, bad)]
    if settings.reward_token_ids is not None:
        ids = list(settings.reward_token_ids)
        size = len(tokenizer)
        if any(i >= size for i in ids):
            raise UsageError(
                f"the recorded reward token ids {ids} are outside the tokenizer's {size} tokens",
                hint="the tokenizer is not the one the model was trained with",
            )
    elif settings.pair_encoded and _legacy_pair_encoded(kind):
        ids = tokenizer.encode(f"{good} {bad}", add_special_tokens=False)
    else:
        for token, one in zip((good, bad), alone):
            if len(one) != 1:
                raise UsageError(
                    f"reward token {token!r} is not a single token of this tokenizer (it encodes to {len(one)} ids)",
                    hint="set model.reward_tokens to two strings the tokenizer keeps whole",
                )
        ids = [alone[0][0], alone[1][0]]
    if alone[0] == alone[1]:
        # Encoded in context ("+ +" is "+", " +") equal tokens can get two ids, and the two scores would mean nothing.
        raise UsageError(
            f"reward tokens {shown([good, bad])} are the same token (ids {alone[0]}): the correct and "
            "wrong scores must be read from two different tokens",
            hint='set model.reward_tokens to two different tokens, e.g. ["+", "-"]',
        )
    if len(ids) != 2 or ids[0] == ids[1]:
        raise UsageError(
            f"reward tokens {list(settings.reward_tokens)!r} are not two different single tokens of this "
            f"tokenizer (got ids {ids})",
            hint="set model.reward_tokens to two strings the tokenizer keeps whole",
        )
    return ids[0], ids[1]


def ensure_tag_token(tokenizer: Any, tag: str) -> int | None:
    """Make the step tag one token: added as a special token when the tokenizer lacks it. Returns its id if added.

    A tag the vocabulary already holds as one token where lm-tag text puts it (Math-Shepherd's ``ки`` in Mistral's)
    is kept, so a published lm-tag PRM can be trained further on its own tag. A tag that is one token alone but not
    in context (``ки`` in Qwen2's) is made an added token, which the tokenizer never merges with its neighbours; it
    keeps its vocabulary id and trained embedding, so it is not returned as new.
    """
    if tag in _special_tokens(tokenizer) or _whole_in_context(tokenizer, tag):
        return None
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [tag]}, replace_extra_special_tokens=False)
    tag_id = tokenizer.convert_tokens_to_ids(tag)
    return tag_id if tag_id >= before else None


def _whole_in_context(tokenizer: Any, tag: str) -> bool:
    """Whether ``tag`` is one token where lm-tag text puts it: after a space, before a newline or the end.

    Alone, Qwen2's BPE keeps ``ки`` whole (one id), but ``" ки"`` merges the space in and splits it (`" к"`, `"и"`).
    """
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) != 1:
        return False
    return tokenizer.encode(f"x {tag}\nx {tag}", add_special_tokens=False).count(ids[0]) == 2
