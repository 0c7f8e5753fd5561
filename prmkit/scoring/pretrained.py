"""The steps of :meth:`prmkit.scoring.engine.StepScorer.from_pretrained`: resolve the model (a directory or a Hub id)
and its ``prmkit.json``, read its config and pick the attention, load another kind's scorer or a token-classification
model with its tokenizer, and check what was loaded against what training recorded.

The functions take the scorer class from their caller (``cls``), so this module never imports the engine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.core.filenames import PRMKIT_JSON
from prmkit.errors import PrmkitError, UsageError
from prmkit.models.files import check_model_dir, check_tokenizer_fits, embedding_rows
from prmkit.models.model_dir import kind_tokenization, read_metadata
from prmkit.scoring import attention
from prmkit.scoring.loading import Background, architecture_imported, hub_metadata, load_error, load_model
from prmkit.tokenization import tokenizer_fingerprint

log = logging.getLogger("prmkit")


@dataclass
class ModelSource:
    """Where a model comes from, and what its ``prmkit.json`` records (None: it has none)."""

    name: str
    local: Path
    is_local: bool
    metadata: dict[str, Any] | None
    revision: str | None = None

    @property
    def adapter(self) -> bool:
        """A LoRA adapter that `prmkit train` saved unmerged."""
        return self.is_local and (self.local / "adapter_config.json").is_file()


def resolve_model(path_or_id: str | os.PathLike, revision: str | None) -> ModelSource:
    """The model directory or Hub id, checked before torch loads (a mistyped path is said at once), with its
    ``prmkit.json``; a local directory's config sizes and weight headers are checked before transformers trusts them."""
    from prmkit.core.locate import locate

    name = str(path_or_id)
    local = Path(name).expanduser()
    is_local = local.is_dir()
    if local.exists() and not is_local:
        raise UsageError(f"model {name!r}: not a directory", hint="give a model directory or a Hub id")
    if not is_local:
        locate(name, "model", revision=revision)
    metadata = read_metadata(local) if is_local else hub_metadata(name, revision)
    if is_local:
        check_model_dir(local)
    return ModelSource(name, local, is_local, metadata, revision)


def read_config(source: ModelSource, trust_remote_code: bool) -> Any:
    """The model's transformers config, read once and handed to the model (None for an adapter: its base's is read
    when the adapter loads)."""
    if source.adapter:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.name,
            trust_remote_code=trust_remote_code,
            **({"revision": source.revision} if source.revision else {}),
        )
    except Exception as e:  # whatever stops transformers reading it is the finding
        raise load_error(source.name, e) from None


def pick_attention(
    config: Any, device: Any, torch_dtype: Any, attn_implementation: str | None, packing: bool | None
) -> tuple[str | None, bool]:
    """The attention implementation to load with, and whether prmkit chose it (then loading may fall back)."""
    from prmkit.models.loading import is_causal

    chosen = attn_implementation is None and packing is not False and config is not None
    if chosen:
        attn_implementation = attention.choose_attention(
            device.type, str(torch_dtype).removeprefix("torch."), is_causal(config), config
        )
    elif attn_implementation == attention.VARLEN:
        attention.register_varlen_attention()
    return attn_implementation, chosen


def kind_scorer(
    cls: Any,
    source: ModelSource,
    kind: str,
    settings: Any,
    kind_tokenizer: Any,
    *,
    load_kwargs: dict[str, Any],
    attn_implementation: str | None,
    tokenization: dict[str, Any] | None,
    step_separator: str | None,
    tokenizer: str | None,
    trust_remote_code: bool,
    **scorer_kwargs: Any,
) -> Any:
    """A scorer for a kind that reads its own input layout, not the step separator (:mod:`prmkit.scoring.kinds`)."""
    from prmkit.kinds.registry import get_kind
    from prmkit.models.loading import load_tokenizer
    from prmkit.scoring.kinds import scorer_for_kind

    name = source.name
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    max_length = kind_tokenization(name, kind, tokenization, step_separator)
    if max_length is None and get_kind(kind).trainable:  # a prmkit-trained model: its training limit
        max_length = ((source.metadata or {}).get("tokenization") or {}).get("max_length")
    tok = (
        load_tokenizer(tokenizer, trust_remote_code)
        if tokenizer
        else kind_tokenizer or load_tokenizer(name, trust_remote_code)
    )
    scorer = scorer_for_kind(
        cls, kind, name, tok, settings, load_kwargs=load_kwargs, max_length=max_length, **scorer_kwargs
    )
    check_tokenizer_fits(scorer.tokenizer, embedding_rows(scorer.model), tokenizer or name)
    return scorer


def load_token_classifier(
    source: ModelSource,
    config: Any,
    load_kwargs: dict[str, Any],
    *,
    device: Any,
    torch_dtype: Any,
    attn_implementation: str | None,
    chosen: bool,
    tokenizer: str | None,
    trust_remote_code: bool,
    overlap_on: tuple[str, ...],
) -> tuple[Any, Any]:
    """The token-classification model and its tokenizer.

    On the devices in ``overlap_on`` the tokenizer loads in a thread while the weights load (both take seconds), unless
    the architecture's code is not imported yet (importing it in two threads at once is not safe).
    """
    from transformers import AutoModelForTokenClassification

    from prmkit.models.loading import load_tokenizer

    name = source.name
    overlap = (
        device.type in overlap_on
        and not source.adapter
        and architecture_imported(AutoModelForTokenClassification, config)
    )
    with Background(load_tokenizer, tokenizer or name, trust_remote_code, enabled=overlap) as pending_tokenizer:
        try:
            if source.adapter:
                # A LoRA adapter that `prmkit train` saved unmerged: its base, the adapter, and the trained head.
                from prmkit.models.loading import load_trained_model

                extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
                model, info = load_trained_model(source.local, torch_dtype, trust_remote_code, **extra), {}
                model.to(device)
            else:
                model, info = load_model(
                    AutoModelForTokenClassification,
                    name,
                    {**load_kwargs, "config": config, "device_map": device},
                    attn_implementation,
                    fall_back=chosen,
                )
        except PrmkitError:
            raise
        except Exception as e:  # e.g. sizes that do not match the weights, a damaged file
            raise load_error(name, e) from None
        check_head(name, info.get("missing_keys") or [])
        return model, pending_tokenizer.result()


def check_head(name: str, missing_keys: list[str]) -> None:
    """Refuse a model without its trained head (its scores would be random); warn about other missing weights."""
    all_missing = sorted(missing_keys)
    missing = [k for k in all_missing if k.split(".")[0] in ("score", "classifier")]
    if all_missing and not missing:
        log.warning(
            f"{name}: {len(all_missing)} weight(s) missing from the checkpoint were initialised at "
            f"random, e.g. {all_missing[0]}; its scores may not be the trained model's"
        )
    if missing:
        raise UsageError(
            f"model {name!r} has no trained token-classification head ({', '.join(sorted(missing)[:2])} "
            "missing); its scores would be random",
            hint="score with a PRM trained by `prmkit train` (or TRL's PRMTrainer), not a base model",
        )


def check_tokenizer(source: ModelSource, tok: Any, tokenizer: str | None, changes: dict[str, tuple[Any, Any]]) -> None:
    """Warn where the tokenizer loaded now is not the one training recorded (and add it to ``changes``)."""
    name = source.name
    recorded = ((source.metadata or {}).get("tokenizer") or {}).get("sha256")
    used = tokenizer_fingerprint(tok)["sha256"] if recorded else None
    if recorded and used != recorded:
        # e.g. transformers picking the architecture's tokenizer class over the saved tokenizer.json
        log.warning(
            f"{name}: the tokenizer loaded now{f' ({tokenizer})' if tokenizer else ''} differs from "
            f"the one recorded in {PRMKIT_JSON} at training; steps may be tokenized differently from "
            "training"
        )
        changes["tokenizer"] = (recorded, used)
    elif tokenizer and not recorded and tokenizer != name:
        log.warning(
            f"{name}: scoring with the tokenizer of {tokenizer} as asked (model.tokenizer), not the one "
            "saved with the model; nothing records which one training used"
        )
