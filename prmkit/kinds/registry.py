"""The PRM kinds, each declared once: its name and every fact the rest of prmkit branches on.

Nothing outside this module spells a kind's name or compares one: code asks the kind (``get_kind(name).trainable``,
``.uses_separator``, ``.causal_lm``, ...). Adding a kind is a :class:`Kind` in :data:`KINDS` below, plus, where it needs
them, a new text layout in :mod:`prmkit.kinds.encoder`, a new head in :mod:`prmkit.kinds.heads` (loaded in
:mod:`prmkit.scoring.kinds`) and card builders in :mod:`prmkit.kinds.cards` (CONTRIBUTING.md, "Adding a PRM kind").

This module imports only :mod:`prmkit.errors` and :mod:`prmkit.kinds.cards` (plain text), so the config and
``--help`` read it without torch or numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prmkit.errors import UsageError
from prmkit.kinds import cards

AUTO = "auto"
"""``model.kind: auto``: detected from the model's files (:func:`prmkit.kinds.spec.detect_kind`)."""

TOKEN_CLASSIFICATION = "token-classification"
QWEN_PRM = "qwen-prm"
LM_TAG = "lm-tag"
CHAT_PLUS_MINUS = "chat-plus-minus"

DEFAULT_KIND = TOKEN_CLASSIFICATION
"""``train.kind``'s default, and the kind of a prmkit model from before kinds were recorded."""

# How a kind lays out (prompt, steps) as tokens, and where it reads each step's score.
SEPARATOR = "separator"
"""TRL's tokenization (:mod:`prmkit.tokenization`): the data's step separator after each step, read at its last
token."""
TAG_TEXT = "tag-text"
"""``"{prompt} {step 1} {tag}\\n{step 2} {tag}..."`` as one text (Math-Shepherd's layout), read at each tag."""
TAG_CHAT = "tag-chat"
"""A chat: system prompt, user = problem, assistant = the steps each followed by the tag, read at each tag."""
CHAT_TURNS = "chat-turns"
"""A chat of one step per user turn, each assistant turn the reward token (:mod:`prmkit.kinds.chat_turns`)."""

# What turns the hidden state at a read position into (wrong, correct) logits.
CLASSIFIER = "classifier"
"""A 2-label token-classification head (``AutoModelForTokenClassification``)."""
QWEN_PRM_HEAD = "qwen2-prm-head"
"""Qwen2.5-Math-PRM's Linear-ReLU-Linear head (:func:`prmkit.kinds.heads.qwen_prm_class`)."""
REWARD_TOKENS = "reward-tokens"
"""A causal LM's logits for the two reward tokens (:func:`prmkit.kinds.heads.reward_token_head`)."""

# What tells a causal LM with no PRM architecture apart as this kind (detection).
STEP_TAG_TOKEN = "step-tag-token"
"""The step tag is one token of the tokenizer (a special token: unambiguous)."""
CHAT_TEMPLATE = "chat-template"
"""The tokenizer (or ``model.chat_template``) has a chat template."""

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""Architecture names of a causal LM (``config.json``)."""

HUB_TOKEN_CLASSIFICATION = "token-classification"
"""The Hub's task id (pipeline tag) for per-token scores: the same spelling as the kind, another namespace."""

QWEN_PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"

# Qwen2.5-Math-PRM's model card.
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

QWEN_PRM_STEP_TOKEN = "<extra_0>"

# peiyi9979/math-shepherd-mistral-7b-prm's model card; OpenRLHF's defaults are the same.
MATH_SHEPHERD_TAG = "ки"

REWARD_TOKEN_PAIR = ("+", "-")


@dataclass(frozen=True)
class KindCard:
    """What a model card says for a kind prmkit trains (:mod:`prmkit.kinds.cards`)."""

    pipeline_tag: str
    """The Hub's pipeline tag for a model of this kind."""
    reads: Callable[[dict[str, Any]], str]
    """(prmkit.json's kind record) -> where a step's score is read, one clause of the card's first paragraph."""
    usage: Callable[[str, dict[str, Any], str, bool], list[str]]
    """(repo id, kind record, step separator, adapter) -> the card's "### transformers" lines."""


@dataclass(frozen=True)
class Kind:
    """One PRM kind. The fields are facts; the properties name what modules ask of them."""

    name: str
    layout: str
    """How (prompt, steps) become tokens: :data:`SEPARATOR`, :data:`TAG_TEXT`, :data:`TAG_CHAT`, :data:`CHAT_TURNS`."""
    head: str
    """Where the scores come from: :data:`CLASSIFIER`, :data:`QWEN_PRM_HEAD` or :data:`REWARD_TOKENS`."""
    summary: str = ""
    """What such a model looks like, for the hint that asks a user to pick a kind."""
    trainable: bool = False
    """``prmkit train`` trains it (``train.kind``); its prmkit.json records the kind and the training limits."""
    causal_lm: bool = False
    """The model is the causal LM itself (``AutoModelForCausalLM``), whose vocabulary head gives the scores; else a
    model with its own head. For training this means: transformers' causal-LM class (kernels, loading), the LM head
    frozen under LoRA, and logits over the whole vocabulary in the memory plan."""
    default_tag: str | None = None
    """The tag after each step (``model.step_tag``'s default) for the tag layouts."""
    tag_single_token: bool = False
    """The tag must encode to exactly one id on its own (the authors' code reads ``encode(tag)[0]``)."""
    default_system_prompt: str | None = None
    """The system turn (``model.system_prompt``'s default) of a chat layout that has one."""
    architectures: tuple[str, ...] = ()
    """``config.json`` architectures that mark a model as this kind."""
    architecture_suffixes: tuple[str, ...] = ()
    """Architecture name endings that mark a model as this kind."""
    causal_signature: str | None = None
    """For a plain causal LM: what makes it read as this kind (:data:`STEP_TAG_TOKEN`, :data:`CHAT_TEMPLATE`)."""
    legacy_pair_encoded: bool = False
    """A prmkit.json of this kind with reward tokens but no ids was trained on ``encode("+ -")`` (before the ids
    were recorded)."""
    card: KindCard | None = None
    """The card's kind-specific parts; None for a kind prmkit does not train."""

    @property
    def uses_separator(self) -> bool:
        """TRL's layout with the data's step separator (the engine's own tokenization), not a :class:`KindEncoder`."""
        return self.layout == SEPARATOR

    @property
    def uses_step_tag(self) -> bool:
        """A tag follows each step and is read (``model.step_tag``); a step must not contain it."""
        return self.layout in (TAG_TEXT, TAG_CHAT)

    @property
    def needs_chat_template(self) -> bool:
        return self.layout in (TAG_CHAT, CHAT_TURNS)

    @property
    def reads_reward_tokens(self) -> bool:
        """Scores are two reward tokens' logits (``model.reward_tokens``, ``kind.reward_token_ids`` recorded)."""
        return self.head == REWARD_TOKENS

    @property
    def vocabulary_logits(self) -> bool:
        """Training computes logits over the whole vocabulary (the memory plan counts them; scoring computes only
        the two reward-token rows, :func:`prmkit.kinds.heads.reward_token_head`)."""
        return self.causal_lm

    @property
    def lora_task(self) -> str:
        """peft's ``TaskType`` member for LoRA on this kind."""
        return "CAUSAL_LM" if self.causal_lm else "TOKEN_CLS"

    @property
    def lora_trains_head(self) -> bool:
        """LoRA trains the (small, new) head fully and saves it with the adapter; an LM head stays frozen."""
        return not self.causal_lm

    def marked_by(self, architectures: list[str]) -> bool:
        """Whether ``config.json``'s architectures say a model is of this kind."""
        return any(a in self.architectures or a.endswith(self.architecture_suffixes) for a in architectures)


KINDS: dict[str, Kind] = {
    TOKEN_CLASSIFICATION: Kind(
        TOKEN_CLASSIFICATION,
        layout=SEPARATOR,
        head=CLASSIFIER,
        trainable=True,
        architecture_suffixes=("ForTokenClassification",),
        card=KindCard(HUB_TOKEN_CLASSIFICATION, cards.separator_reads, cards.separator_usage),
    ),
    QWEN_PRM: Kind(
        QWEN_PRM,
        layout=TAG_CHAT,
        head=QWEN_PRM_HEAD,
        default_tag=QWEN_PRM_STEP_TOKEN,
        tag_single_token=True,
        default_system_prompt=QWEN_PRM_SYSTEM_PROMPT,
        architectures=(QWEN_PRM_ARCHITECTURE,),
    ),
    LM_TAG: Kind(
        LM_TAG,
        layout=TAG_TEXT,
        head=REWARD_TOKENS,
        summary="a tag token after each step, e.g. Math-Shepherd",
        trainable=True,
        causal_lm=True,
        default_tag=MATH_SHEPHERD_TAG,
        causal_signature=STEP_TAG_TOKEN,
        legacy_pair_encoded=True,
        card=KindCard("text-generation", cards.lm_tag_reads, cards.lm_tag_usage),
    ),
    CHAT_PLUS_MINUS: Kind(
        CHAT_PLUS_MINUS,
        layout=CHAT_TURNS,
        head=REWARD_TOKENS,
        summary="+/- assistant turns, e.g. RLHFlow",
        causal_lm=True,
        causal_signature=CHAT_TEMPLATE,
    ),
}
"""Every kind, in the order choices are listed. Tests add a kind with ``monkeypatch.setitem``: read it at call time."""


def find_kind(name: Any) -> Kind | None:
    """The kind named ``name``, or None (``auto``, an unknown name, or not a name: a damaged prmkit.json's)."""
    return KINDS.get(name) if isinstance(name, str) else None


def kind_marked_by(architectures: list[str]) -> Kind | None:
    """The kind ``config.json``'s architectures name: an architecture named exactly first, then a name ending."""
    exact = [k for k in KINDS.values() if any(a in k.architectures for a in architectures)]
    return exact[0] if exact else next((k for k in KINDS.values() if k.marked_by(architectures)), None)


def get_kind(name: str) -> Kind:
    """The kind named ``name`` (not ``auto``: resolve that first)."""
    kind = find_kind(name)
    if kind is None:
        raise UsageError(f"unknown PRM kind {name!r}", hint=f"one of {', '.join(KINDS)}")
    return kind


def kind_choices() -> tuple[str, ...]:
    """``model.kind``'s values."""
    return (AUTO, *KINDS)


def train_kind_choices() -> tuple[str, ...]:
    """``train.kind``'s values."""
    return tuple(name for name, kind in KINDS.items() if kind.trainable)


def trained_kind(record: Any) -> Kind:
    """The kind prmkit trained a model directory as, from prmkit.json's ``kind`` record (absent: the default)."""
    kind = find_kind(record.get("kind")) if isinstance(record, dict) else None
    return kind if kind is not None and kind.trainable else KINDS[DEFAULT_KIND]
