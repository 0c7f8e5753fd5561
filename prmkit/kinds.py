"""PRM kinds: where each published kind of process reward model reads a step's score, as its authors' own code does.

| kind | input | score of a step |
|---|---|---|
| ``token-classification`` | TRL's tokenization (:mod:`prmkit.tokenization`) | softmax[:, 1] at the step's last separator token |
| ``qwen-prm`` | chat: system prompt, user = problem, assistant = steps each followed by ``<extra_0>`` | a Linear-ReLU-Linear head, softmax[:, 1] at each ``<extra_0>`` |
| ``lm-tag`` | ``"{problem} {step 1} {tag}\\n{step 2} {tag}..."`` (Math-Shepherd's layout) | LM logits at the tag, softmax over the two reward tokens, p(``+``) |
| ``chat-plus-minus`` | chat: user = problem + step 1, then one step per user turn, every assistant turn ``+`` | LM logits at the token before each assistant ``+``, softmax over ``+``/``-``, p(``+``) |

Every kind is causal, so every step of a solution is scored in ONE forward pass: the position read for step k sees
exactly what the authors' prefix-by-prefix code shows the model for step k. The engine
(:class:`prmkit.scoring.StepScorer`) is the same for all kinds: a kind gives it the tokens and the positions to read
(:class:`KindEncoder`), and a model whose ``logits[..., 1]`` vs ``logits[..., 0]`` is "step correct" vs "wrong"
(for the LM kinds, :class:`RewardTokenHead` computes just the two reward-token rows of the LM head, not the vocabulary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from prmkit import jsonio
from prmkit.chat_turns import ChatTurns
from prmkit.errors import DataError, UsageError, first_line, shown
from prmkit.tokenization import Encoded

log = logging.getLogger("prmkit")

TOKEN_CLASSIFICATION = "token-classification"
QWEN_PRM = "qwen-prm"
LM_TAG = "lm-tag"
CHAT_PLUS_MINUS = "chat-plus-minus"
KINDS = (TOKEN_CLASSIFICATION, QWEN_PRM, LM_TAG, CHAT_PLUS_MINUS)
LM_KINDS = (LM_TAG, CHAT_PLUS_MINUS)

QWEN_PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"
# Qwen2.5-Math-PRM's model card.
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_STEP_TOKEN = "<extra_0>"
# peiyi9979/math-shepherd-mistral-7b-prm's model card; OpenRLHF's defaults are the same.
MATH_SHEPHERD_TAG = "ки"
REWARD_TOKENS = ("+", "-")


@dataclass
class KindSettings:
    """The kind-specific keys of ``model.*``: the documented values of each kind's authors are the defaults."""

    kind: str = "auto"
    step_tag: str | None = None
    """lm-tag: the tag after each step (Math-Shepherd's ``ки``); qwen-prm: the step token (``<extra_0>``)."""
    reward_tokens: tuple[str, str] = REWARD_TOKENS
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
        return QWEN_PRM_STEP_TOKEN if self.kind == QWEN_PRM else MATH_SHEPHERD_TAG

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in (LM_TAG, QWEN_PRM):
            out["step_tag"] = self.tag()
        if self.kind in LM_KINDS:
            out["reward_tokens"] = list(self.reward_tokens)
            if self.reward_token_ids is not None:
                out["reward_token_ids"] = list(self.reward_token_ids)
        if self.kind == QWEN_PRM:
            out["system_prompt"] = self.system_prompt if self.system_prompt is not None else QWEN_PRM_SYSTEM_PROMPT
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    @classmethod
    def from_sources(cls, explicit: dict[str, Any] | None, recorded: dict[str, Any] | None) -> "KindSettings":
        """Explicit keys (config) win over what a model directory recorded; unset explicit keys are ignored."""
        for source in (recorded or {}, explicit or {}):
            tag = source.get("step_tag")
            if tag is not None and not (isinstance(tag, str) and tag):
                # An empty tag would fall back to the default one, not the tag the model was trained with.
                raise UsageError(f"model.step_tag must be a non-empty string, got {shown(tag)}",
                                 hint="leave it unset (null) to use the model's own tag")
        merged: dict[str, Any] = {}
        for source in (recorded or {}, explicit or {}):
            for key, value in source.items():
                if key == "pair_encoded":
                    continue
                if key in cls.__dataclass_fields__ and value is not None and not (key == "kind" and value == "auto"):
                    if source is explicit and key in merged and _same(merged[key]) != _same(value):
                        log.warning(f"model.{key}: using {shown(value)}, not the {shown(merged[key])} the model "
                                    "recorded at training; its scores may not mean what they meant then")
                    merged[key] = value
        if "reward_tokens" in merged:
            tokens = merged["reward_tokens"]
            if not isinstance(tokens, (list, tuple)) or len(tokens) != 2 or not all(isinstance(t, str) and t for t in tokens):
                raise UsageError("model.reward_tokens must be two non-empty strings (correct, wrong), got "
                                 f"{shown(tokens)}")
            merged["reward_tokens"] = tuple(tokens)
        recorded = recorded or {}
        if "reward_token_ids" in merged:
            ids = merged["reward_token_ids"]
            if (not isinstance(ids, (list, tuple)) or len(ids) != 2
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise UsageError(f"kind.reward_token_ids must be two token ids (correct, wrong), got {ids!r}")
            if _same(merged.get("reward_tokens", REWARD_TOKENS)) != _same(recorded.get("reward_tokens", REWARD_TOKENS)):
                del merged["reward_token_ids"]  # recorded for other tokens than the ones now asked for
            else:
                merged["reward_token_ids"] = tuple(ids)
        elif recorded.get("kind") == LM_TAG and "reward_tokens" in recorded:
            # prmkit.json from before reward_token_ids was recorded: such a model was trained on encode("+ -").
            merged["pair_encoded"] = True
        return cls(**merged)


def _same(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------------------------
# Detection


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return jsonio.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def detect_kind(config: dict[str, Any], metadata: dict[str, Any] | None, tokenizer: Any, settings: KindSettings,
                name: str) -> str:
    """The kind of a model: explicit setting, then ``prmkit.json``, then ``config.json`` architectures and the tokenizer.

    Never a silent guess: a causal LM that could be read more than one way is refused with the choices listed.
    """
    if settings.kind != "auto":
        if settings.kind not in KINDS:
            raise UsageError(f"unknown model.kind {settings.kind!r}", hint=f"one of auto, {', '.join(KINDS)}")
        return settings.kind
    if metadata is not None:
        recorded = (metadata.get("kind") or {}).get("kind") if isinstance(metadata.get("kind"), dict) else metadata.get("kind")
        return recorded or TOKEN_CLASSIFICATION  # prmkit models before kinds existed are all token classifiers
    architectures = [str(a) for a in (config.get("architectures") or [])]
    if QWEN_PRM_ARCHITECTURE in architectures:
        return QWEN_PRM
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return TOKEN_CLASSIFICATION
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        choices = []
        tag = settings.tag()
        tag_is_token = tokenizer is not None and _single_token(tokenizer, tag) is not None
        tag_is_special = tokenizer is not None and tag in _special_tokens(tokenizer)
        has_template = settings.chat_template is not None or bool(getattr(tokenizer, "chat_template", None))
        if tag_is_special:
            return LM_TAG  # a placeholder added for PRM training (OpenRLHF, prmkit) is unambiguous
        if tag_is_token:
            choices.append(LM_TAG)
        if has_template:
            choices.append(CHAT_PLUS_MINUS)
        if len(choices) == 1:
            return choices[0]
        if not choices:
            raise UsageError(
                f"model {name!r} is a causal LM ({', '.join(architectures)}) with no trained token-classification head, "
                "no step tag token and no chat template: its scores would mean nothing",
                hint="score a PRM trained by `prmkit train` (or TRL's PRMTrainer), not a base model; for an LM-head "
                     f"PRM set model.kind={LM_TAG} or {CHAT_PLUS_MINUS} (README, PRM kinds)",
            )
        raise UsageError(
            f"model {name!r} is a causal LM ({', '.join(architectures)}) that reads as more than one PRM kind "
            f"({' or '.join(choices)}): set model.kind",
            hint=f"--set model.kind={LM_TAG} (a tag token after each step, e.g. Math-Shepherd) or "
                 f"--set model.kind={CHAT_PLUS_MINUS} (+/- assistant turns, e.g. RLHFlow); in eval, MODEL@KIND",
        )
    raise UsageError(f"model {name!r}: cannot tell its PRM kind from architectures {architectures or 'none'}",
                     hint=f"set model.kind to one of {', '.join(KINDS)}")


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


# ---------------------------------------------------------------------------------------------------------------------
# Encoders: the tokens a kind's model reads, and the position of each step's score


class KindEncoder:
    """Tokenizes solutions for one kind; ``encode(items)`` gives :class:`Encoded` rows for the scoring engine."""

    def __init__(self, kind: str, tokenizer: Any, settings: KindSettings, max_length: int | None):
        self.kind = kind
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_length = max_length
        self.tag = settings.tag()
        if kind in (LM_TAG, QWEN_PRM):
            self.tag_id = self._tag_id()
        if kind in LM_KINDS:
            self.reward_ids = reward_token_ids(tokenizer, settings, kind)
            # Recorded in prmkit.json (train) and in every result's identity (score, eval).
            self.settings = settings = replace(settings, reward_token_ids=self.reward_ids)
        if kind in (QWEN_PRM, CHAT_PLUS_MINUS):
            self.template = settings.chat_template or getattr(tokenizer, "chat_template", None)
            if not self.template:
                raise UsageError(f"model.kind {kind} needs a chat template, and the tokenizer has none",
                                 hint="set model.chat_template to the model's Jinja template")

    def _tag_id(self) -> int:
        # As the authors' code: the id `encode(tag)` ends with (Qwen: `encode("<extra_0>")[0]`, one token either way).
        ids = self.tokenizer.encode(self.tag, add_special_tokens=False)
        if self.kind == QWEN_PRM and len(ids) != 1:
            raise UsageError(f"step token {self.tag!r} is not a single token of this tokenizer",
                             hint="set model.step_tag to the model's step token")
        if not ids:
            raise UsageError(f"step tag {self.tag!r} encodes to no token")
        return ids[-1]

    # -- per kind -------------------------------------------------------------------------------------------------

    def _check_steps(self, steps: Sequence[str], where: str) -> None:
        for k, step in enumerate(steps):
            if self.kind in (LM_TAG, QWEN_PRM) and self.tag in step:
                raise DataError(f"{where}: step {k + 1} contains the step tag {self.tag!r}, "
                                "which would be read as a step end", hint="remove it, or set model.step_tag")

    def _render(self, messages: list[dict[str, str]]) -> str:
        from prmkit.chat_template import render_chat  # apply_chat_template's rendering, with time and size limits

        try:
            return render_chat(self.tokenizer, messages, self.settings.chat_template)
        except Exception as e:  # a Jinja error in a user's template, or a limit it broke
            which = ("model.chat_template" if self.settings.chat_template
                     else f"the chat template of {getattr(self.tokenizer, 'name_or_path', '') or 'the tokenizer'}")
            raise UsageError(f"the chat template failed ({which}): {first_line(e)}",
                             hint="check model.chat_template") from None

    def _text(self, prompt: str, steps: Sequence[str]) -> str:
        """The text an lm-tag or qwen-prm model reads."""
        if self.kind == LM_TAG:
            return f"{prompt} " + "\n".join(f"{step} {self.tag}" for step in steps)
        system = self.settings.system_prompt if self.settings.system_prompt is not None else QWEN_PRM_SYSTEM_PROMPT
        return self._render([{"role": "system", "content": system}, {"role": "user", "content": prompt},
                             {"role": "assistant", "content": self.tag.join(steps) + self.tag}])

    def _positions(self, ids: list[int]) -> list[int]:
        return [i for i, t in enumerate(ids) if t == self.tag_id]

    def encode(self, items: Sequence[tuple[str, Sequence[str]]], where: Sequence[str] | None = None) -> list[Encoded]:
        """One :class:`Encoded` per solution; ``where`` names each item in errors (default: "solution N")."""
        places = list(where) if where is not None else [f"solution {n}" for n in range(1, len(items) + 1)]
        for i, (_, steps) in enumerate(items):
            self._check_steps(steps, places[i])
        todo = [i for i, (_, steps) in enumerate(items) if steps]
        out = [Encoded([], [], 0) for _ in items]
        if self.kind == CHAT_PLUS_MINUS:
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
                    hint="set model.step_tag to a token the tokenizer keeps whole (an added special token is safest)")
            if self.max_length is not None and len(ids) > self.max_length:
                ids = ids[: self.max_length]
                positions = [p if p < self.max_length else -1 for p in positions]
            out[i] = Encoded(ids, positions, 0)
        return out


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
            raise UsageError(f"the recorded reward token ids {ids} are outside the tokenizer's {size} tokens",
                             hint="the tokenizer is not the one the model was trained with")
    elif kind == LM_TAG and settings.pair_encoded:
        ids = tokenizer.encode(f"{good} {bad}", add_special_tokens=False)
    else:
        for token, one in zip((good, bad), alone):
            if len(one) != 1:
                raise UsageError(f"reward token {token!r} is not a single token of this tokenizer (it encodes to "
                                 f"{len(one)} ids)", hint="set model.reward_tokens to two strings the tokenizer keeps whole")
        ids = [alone[0][0], alone[1][0]]
    if alone[0] == alone[1]:
        # Encoded in context ("+ +" is "+", " +") equal tokens can get two ids, and the two scores would mean nothing.
        raise UsageError(f"reward tokens {shown([good, bad])} are the same token (ids {alone[0]}): the correct and "
                         "wrong scores must be read from two different tokens",
                         hint="set model.reward_tokens to two different tokens, e.g. [\"+\", \"-\"]")
    if len(ids) != 2 or ids[0] == ids[1]:
        raise UsageError(f"reward tokens {list(settings.reward_tokens)!r} are not two different single tokens of this "
                         f"tokenizer (got ids {ids})",
                         hint="set model.reward_tokens to two strings the tokenizer keeps whole")
    return ids[0], ids[1]


# ---------------------------------------------------------------------------------------------------------------------
# Models


def reward_token_head(lm: Any, reward_ids: tuple[int, int]):
    """A causal LM seen as a 2-label token classifier: logits ``[wrong, correct]`` from just those two LM-head rows."""
    import torch

    class RewardTokenHead(torch.nn.Module):
        def __init__(self, lm: Any, ids: tuple[int, int]):
            super().__init__()
            self.lm = lm
            self.config = lm.config
            self.register_buffer("rows", torch.tensor([ids[1], ids[0]], dtype=torch.long), persistent=False)

        @property
        def name_or_path(self) -> str:
            return getattr(self.lm, "name_or_path", "")

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
            from transformers.modeling_outputs import TokenClassifierOutput

            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=use_cache, **kwargs)[0]
            head = self.lm.get_output_embeddings()
            weight = head.weight.index_select(0, self.rows)
            bias = head.bias.index_select(0, self.rows) if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(hidden, weight, bias)
            cap = getattr(self.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return TokenClassifierOutput(logits=logits)

    return RewardTokenHead(lm, reward_ids)


def qwen_prm_class():
    """``Qwen2ForProcessRewardModel``: Qwen2.5-Math-PRM's remote-code architecture, without remote code."""
    import torch
    from transformers.modeling_outputs import TokenClassifierOutput
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

    class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
        # The published checkpoints also hold an unused lm_head.
        _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

        def __init__(self, config):
            super().__init__(config)
            self.num_labels = 2
            self.model = Qwen2Model(config)
            self.score = torch.nn.Sequential(
                torch.nn.Linear(config.hidden_size, config.hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(config.hidden_size, self.num_labels),
            )
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=use_cache, **kwargs)[0]
            return TokenClassifierOutput(logits=self.score(hidden))

    return Qwen2ForProcessRewardModel


def load_kind_model(kind: str, name: str, load_kwargs: dict[str, Any], tokenizer: Any, settings: KindSettings):
    """The model the engine runs for ``kind`` (never with remote code for qwen-prm)."""
    from prmkit.modeling import MODEL_LOAD_DEFAULTS

    if kind == QWEN_PRM:
        from transformers import AutoConfig

        kwargs = {k: v for k, v in load_kwargs.items() if k != "trust_remote_code"}
        config = AutoConfig.from_pretrained(name, **{k: v for k, v in kwargs.items() if k == "revision"})
        model, info = qwen_prm_class().from_pretrained(name, config=config, output_loading_info=True,
                                                       **{**MODEL_LOAD_DEFAULTS, **kwargs})
        missing = [k for k in info.get("missing_keys", []) if k.startswith("score.")]
        if missing:
            raise UsageError(f"model {name!r} has no trained Qwen-PRM head ({', '.join(sorted(missing)[:2])} missing)")
        return model
    if (Path(name) / "adapter_config.json").is_file():  # an unmerged LoRA adapter `prmkit train` wrote
        from prmkit.modeling import load_trained_model

        extra = {k: v for k, v in load_kwargs.items() if k not in ("dtype", "trust_remote_code", "revision")}
        lm = load_trained_model(name, load_kwargs.get("dtype", "auto"), bool(load_kwargs.get("trust_remote_code")),
                                causal_lm=True, **extra)
    else:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(name, **{**MODEL_LOAD_DEFAULTS, **load_kwargs})
    return reward_token_head(lm, reward_token_ids(tokenizer, settings, kind))


def max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def scorer_for_kind(cls: Any, kind: str, name: str, tokenizer: Any, settings: KindSettings, *, load_kwargs: dict,
                    device: Any, max_length: int | None = None, **scorer_kwargs: Any):
    """A :class:`~prmkit.scoring.StepScorer` for a PRM of another kind than token classification."""
    from prmkit.scoring.engine import model_identity
    from prmkit.tokenization import TokenizationParams

    settings = KindSettings(**{**settings.__dict__, "kind": kind})
    encoder = KindEncoder(kind, tokenizer, settings, None)
    try:
        model = load_kind_model(kind, name, load_kwargs, tokenizer, encoder.settings)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. sizes that do not match the weights, a damaged file
        raise UsageError(f"model {name!r} could not be loaded as {kind}: {first_line(e)}") from None
    model.to(device)
    limit = max_positions(model.config)
    encoder.max_length = min(x for x in (max_length, limit) if x is not None) if (max_length or limit) else None
    identity = {**model_identity(name, getattr(model, "lm", model)), "kind": encoder.settings.to_dict()}
    params = TokenizationParams(max_length=encoder.max_length, max_prompt_length=None)
    return cls(model, tokenizer, params, kind_encoder=encoder, identity=identity, causal=True, **scorer_kwargs)


def _hub_config(name: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(name, "config.json", revision=revision)))
    except Exception:  # loading the model will say what is wrong, in the words of the error mapping
        return {}


def _warn_unmarked(kind: str, name: str, config: dict[str, Any]) -> None:
    """A kind set by hand on a model that carries no sign of being a PRM of that kind: a base model read so scores
    every step alike (about 0.5), and nothing else would say it."""
    from prmkit.modeling import PRMKIT_JSON

    architectures = [str(a) for a in config.get("architectures") or []]
    if kind == QWEN_PRM and QWEN_PRM_ARCHITECTURE in architectures:
        return
    if kind == TOKEN_CLASSIFICATION and any(a.endswith("ForTokenClassification") for a in architectures):
        return
    what = f"a {architectures[0]}" if architectures else "a model"
    log.warning(f"model.kind={kind} is set for {name}, {what} with no {PRMKIT_JSON} and nothing else that marks "
                f"it as a {kind} PRM: its scores mean something only if it was trained as one (a base model scores "
                "every step alike)")


def resolve_kind(name: str, metadata: dict[str, Any] | None, explicit: dict[str, Any] | None, *, local: bool,
                 revision: str | None = None, trust_remote_code: bool = False) -> tuple[str, KindSettings, Any]:
    """(kind, settings, tokenizer or None): the tokenizer is loaded only when detection needs it."""
    recorded = metadata.get("kind") if metadata is not None and isinstance(metadata.get("kind"), dict) else None
    settings = KindSettings.from_sources(explicit, recorded)
    if settings.kind != "auto" or metadata is not None:
        kind = detect_kind({}, metadata, None, settings, name)
        if metadata is None:
            _warn_unmarked(kind, name, local_config(name) if local else _hub_config(name, revision))
        return kind, settings, None
    config = local_config(name) if local else _hub_config(name, revision)
    tokenizer = None
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or []):
        from prmkit.dataset import load_tokenizer

        tokenizer = load_tokenizer(name, trust_remote_code)
    return detect_kind(config, None, tokenizer, settings, name), settings, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Training the lm-tag kind (OpenRLHF's design): a causal LM, a tag after each step, cross-entropy over two tokens


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


def init_new_tokens(model: Any, tokenizer: Any, new_ids: Sequence[int]) -> None:
    """Give tokens added for training an embedding: grow the matrices if needed, start each at the mean embedding.

    Models often have spare rows beyond the tokenizer (Qwen2: 151,936 rows for 151,665 tokens); an added token can
    land on one, untrained, so it is initialised whether or not the matrix grew.
    """
    import torch

    if not new_ids:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    known = min(new_ids)  # the rows before the first added token are the trained vocabulary
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
            mean = emb.weight[:known].mean(dim=0)
            for i in new_ids:
                emb.weight[i] = mean


def reward_columns(logits: Any, reward_ids: tuple[int, int]) -> Any:
    """LM logits over the vocabulary -> ``[wrong, correct]`` logits, the token-classification layout."""
    return logits[..., [reward_ids[1], reward_ids[0]]]


def lm_tag_loss(reward_ids: tuple[int, int], label_smoothing: float = 0.0):
    """The Trainer's ``compute_loss_func``: prmkit's step loss (hard or soft labels, smoothed as
    :func:`prmkit.batching.step_loss` says: over the two reward tokens, not the vocabulary) on the two reward tokens."""
    from prmkit.batching import step_loss

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return step_loss(reward_columns(logits, reward_ids), labels, num_items_in_batch, label_smoothing)

    return loss


def lm_tag_preprocess(reward_ids: tuple[int, int]):
    """``preprocess_logits_for_metrics``: keep two columns of the vocabulary, so eval holds no vocab-size logits."""
    from prmkit.batching import preprocess_logits_for_metrics

    def preprocess(logits: Any, labels: Any):
        if isinstance(logits, tuple):
            logits = logits[0]
        return preprocess_logits_for_metrics(reward_columns(logits, reward_ids), labels)

    return preprocess


@dataclass
class LMTag:
    """What `train` needs for ``train.kind: lm-tag``: the settings, the tokens it added, the loss on two tokens."""

    settings: KindSettings
    new_ids: list[int]
    reward_ids: tuple[int, int]

    @classmethod
    def setup(cls, cfg: Any, tokenizer: Any) -> "LMTag":
        settings = KindSettings.from_sources({**cfg.model.kind_settings(), "kind": LM_TAG}, None)
        added = ensure_tag_token(tokenizer, settings.tag())
        reward = reward_token_ids(tokenizer, settings, LM_TAG)
        settings = replace(settings, reward_token_ids=reward)
        if added is not None and added in reward:
            raise UsageError(f"step tag {settings.tag()!r} is one of the reward tokens", hint="set model.step_tag")
        if added is not None and cfg.train.lora is not None and not cfg.train.lora_merge:
            # An unmerged adapter does not carry the embedding of a token added for training.
            raise UsageError(f"train.lora_merge: false cannot keep the step tag {settings.tag()!r} that lm-tag adds to "
                             "the tokenizer", hint="keep train.lora_merge: true, or set model.step_tag to a token the "
                             "tokenizer already has")
        return cls(settings, [added] if added is not None else [], reward)

    def loss(self, label_smoothing: float = 0.0):
        return lm_tag_loss(self.reward_ids, label_smoothing)

    @property
    def preprocess(self):
        return lm_tag_preprocess(self.reward_ids)
