"""Scoring another PRM kind than token classification: find the kind, load its model, build the engine for it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prmkit.errors import UsageError, first_line
from prmkit.kinds.encoder import KindEncoder
from prmkit.kinds.heads import qwen_prm_class, reward_token_head
from prmkit.kinds.registry import CAUSAL_LM_SUFFIXES, QWEN_PRM_HEAD, get_kind
from prmkit.kinds.spec import KindSettings, _read_json, detect_kind, local_config, reward_token_ids

log = logging.getLogger(__name__)


def load_kind_model(kind: str, name: str, load_kwargs: dict[str, Any], tokenizer: Any, settings: KindSettings):
    """The model the engine runs for ``kind`` (never with remote code for Qwen-PRM's head): its :attr:`Kind.head`."""
    from prmkit.models.loading import MODEL_LOAD_DEFAULTS

    if get_kind(kind).head == QWEN_PRM_HEAD:
        from transformers import AutoConfig

        kwargs = {k: v for k, v in load_kwargs.items() if k != "trust_remote_code"}
        config = AutoConfig.from_pretrained(name, **{k: v for k, v in kwargs.items() if k == "revision"})
        model, info = qwen_prm_class().from_pretrained(
            name, config=config, output_loading_info=True, **{**MODEL_LOAD_DEFAULTS, **kwargs}
        )
        missing = [k for k in info.get("missing_keys", []) if k.startswith("score.")]
        if missing:
            raise UsageError(f"model {name!r} has no trained Qwen-PRM head ({', '.join(sorted(missing)[:2])} missing)")
        return model
    if (Path(name) / "adapter_config.json").is_file():  # an unmerged LoRA adapter `prmkit train` wrote
        from prmkit.models.loading import load_trained_model

        extra = {k: v for k, v in load_kwargs.items() if k not in ("dtype", "trust_remote_code", "revision")}
        lm = load_trained_model(
            name, load_kwargs.get("dtype", "auto"), bool(load_kwargs.get("trust_remote_code")), causal_lm=True, **extra
        )
    else:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(name, **{**MODEL_LOAD_DEFAULTS, **load_kwargs})
    return reward_token_head(lm, reward_token_ids(tokenizer, settings, kind))


def max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def scorer_for_kind(
    cls: Any,
    kind: str,
    name: str,
    tokenizer: Any,
    settings: KindSettings,
    *,
    load_kwargs: dict,
    device: Any,
    max_length: int | None = None,
    **scorer_kwargs: Any,
):
    """A :class:`~prmkit.scoring.StepScorer` for a PRM of another kind than token classification."""
    from prmkit.scoring.loading import model_identity
    from prmkit.tokenization import TokenizationParams

    settings = KindSettings(**{**settings.__dict__, "kind": kind})
    encoder = KindEncoder(kind, tokenizer, settings, None)
    try:
        model = load_kind_model(kind, name, load_kwargs, tokenizer, encoder.settings)
    except UsageError:
        raise
    except Exception as e:
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
    from prmkit.core.filenames import PRMKIT_JSON

    architectures = [str(a) for a in config.get("architectures") or []]
    if get_kind(kind).marked_by(architectures):
        return
    what = f"a {architectures[0]}" if architectures else "a model"
    log.warning(
        f"model.kind={kind} is set for {name}, {what} with no {PRMKIT_JSON} and nothing else that marks "
        f"it as a {kind} PRM: its scores mean something only if it was trained as one (a base model scores "
        "every step alike)"
    )


def resolve_kind(
    name: str,
    metadata: dict[str, Any] | None,
    explicit: dict[str, Any] | None,
    *,
    local: bool,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[str, KindSettings, Any]:
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
    if any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in config.get("architectures") or []):
        from prmkit.models.loading import load_tokenizer

        tokenizer = load_tokenizer(name, trust_remote_code)
    return detect_kind(config, None, tokenizer, settings, name), settings, tokenizer
