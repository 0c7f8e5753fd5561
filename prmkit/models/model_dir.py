"""A prmkit model directory is self-describing, like a transformers one: ``prmkit.json`` records the step separator
and every tokenization parameter, the label mapping, the kind, the base model and the data, so nobody repeats the
separator and scoring never reads a position training did not label. Written by `train`, read by every reader.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from prmkit.core.atomic import read_json, write_atomic
from prmkit.core.filenames import CONFIG_YAML, PRMKIT_JSON
from prmkit.core.jsonio import dumps
from prmkit.core.redact import redact
from prmkit.core.version import __version__
from prmkit.errors import UsageError, shown
from prmkit.tokenization import TokenizationParams

log = logging.getLogger("prmkit")


ID2LABEL = {0: "LABEL_0", 1: "LABEL_1"}


LABEL2ID = {"LABEL_0": 0, "LABEL_1": 1}


POSITIVE_LABEL_ID = 1  # p(step correct) = softmax(logits)[..., 1]; TRL's docs map LABEL_1 -> True


def label_mapping() -> dict[str, Any]:
    return {
        "id2label": {str(k): v for k, v in ID2LABEL.items()},
        "positive_label_id": POSITIVE_LABEL_ID,
        "meaning": {"LABEL_0": "step is wrong", "LABEL_1": "step is correct"},
    }


def build_metadata(
    params: TokenizationParams,
    base_model: str | None,
    data: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "prmkit_version": __version__,
        "tokenization": params.to_dict(),
        "labels": label_mapping(),
        "base_model": base_model,
        "data": data or {},
        "tokenizer": tokenizer or {},
        **(extra or {}),
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    """Metadata as JSON, secrets redacted (prmkit.core.redact): nothing prmkit saves holds a token or password."""
    write_atomic(path, dumps(redact(obj), indent=2) + "\n")


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> Path:
    path = Path(model_dir) / PRMKIT_JSON
    write_json_atomic(path, metadata)
    return path


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """`prmkit.json` of a local model directory, or None when there is none (e.g. a model trained with TRL)."""
    from prmkit.core.overwrite import set_aside_problem  # run_dir imports this module

    problem = set_aside_problem(model_dir)
    if problem is not None:
        raise problem
    path = Path(model_dir) / PRMKIT_JSON
    if not path.is_file():
        if (Path(model_dir) / CONFIG_YAML).is_file():
            # `prmkit train` writes prmkit.json last: without it the weights may be missing, partial or stale.
            raise UsageError(
                f"{model_dir}: a prmkit training run that has not finished (no {PRMKIT_JSON} yet)",
                hint="finish it with the same `prmkit train` command plus --resume, or use one of its "
                "checkpoint-N directories",
            )
        return None
    hint = f"the file is damaged: restore it, or copy {PRMKIT_JSON} from the training run's output"
    metadata = read_json(path, hint=hint)
    if not isinstance(metadata, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(metadata).__name__}", hint=hint)
    check_recorded_tokenization(metadata.get("tokenization"), str(path))
    return metadata


def check_recorded_tokenization(recorded: Any, origin: str) -> None:
    """The limits a model directory records go through the config's own type and range checks."""
    from prmkit.config.schema import check_range

    if not isinstance(recorded, dict):
        return
    for key in ("max_length", "max_prompt_length", "max_completion_length"):
        value = recorded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{origin}: tokenization.{key}: expected an integer or null, got {shown(value)}")
        check_range(f"data.{key}", value, origin, name=f"tokenization.{key}")


TOKENIZATION_KEYS = tuple(f.name for f in fields(TokenizationParams))


# Keys that shape how a solution is tokenized for scoring. train_on_last_step_only only picks which steps TRAINING
# labels: score and eval always score every step, so it has nothing to apply to there.
SCORING_TOKENIZATION_KEYS = ("step_separator", "max_length", "max_prompt_length", "max_completion_length")


def explicit_tokenization(data: Any, is_set: Callable[[str], bool]) -> dict[str, Any]:
    """The ``data.*`` tokenization keys a user set (config file, ``--set``), for score and eval to apply over
    ``prmkit.json``; ``None`` values (no limit) are settings too."""
    return {k: getattr(data, k) for k in TOKENIZATION_KEYS if is_set(f"data.{k}")}


def resolve_tokenization(
    model: str | Path,
    metadata: dict[str, Any] | None,
    step_separator: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[TokenizationParams, dict[str, tuple[Any, Any]]]:
    """The tokenization to score ``model`` with, and what differs from its training: ``{key: (trained, used)}``.

    ``prmkit.json`` records the training tokenization. ``overrides`` (keys the user set) and ``step_separator`` (a
    command's flag, which wins over an override) are honoured, never dropped: where they contradict the record a
    warning says so, since a label may then sit where the model learned nothing. Without ``prmkit.json`` (a model
    trained with TRL) they state how it was trained, and the rest is TRL 1.13's defaults.
    """
    asked = dict(overrides or {})
    unknown = sorted(set(asked) - set(TOKENIZATION_KEYS))
    if unknown:
        raise UsageError(f"not a tokenization key: {', '.join(unknown)}", hint=f"use {', '.join(TOKENIZATION_KEYS)}")
    if step_separator is not None:
        asked["step_separator"] = step_separator
    if metadata is None:
        if "step_separator" not in asked:
            log.warning(
                f"{model}: no {PRMKIT_JSON}; assuming step separator '\\n' (TRL's default). Pass "
                "--step-separator if it was trained with another"
            )
        trained = TokenizationParams()
    else:
        trained = TokenizationParams.from_dict(metadata.get("tokenization", {}))
    if asked.get("train_on_last_step_only", trained.train_on_last_step_only) != trained.train_on_last_step_only:
        raise UsageError(
            f"data.train_on_last_step_only={_yaml(asked['train_on_last_step_only'])} cannot apply to scoring: it only "
            f"picks which steps training labels, and scoring scores every step ({model} was trained with "
            f"{_yaml(trained.train_on_last_step_only)})",
            hint="drop it from --set or the config for score and eval",
        )
    used = TokenizationParams(**{**trained.to_dict(), **asked})
    differs = {
        k: (getattr(trained, k), getattr(used, k))
        for k in SCORING_TOKENIZATION_KEYS
        if getattr(trained, k) != getattr(used, k)
    }
    if metadata is not None:
        for key, (before, after) in differs.items():
            log.warning(
                f"{model}: trained with data.{key}={_yaml(before)} ({PRMKIT_JSON}); scoring with "
                f"{_yaml(after)} as asked, so the tokens differ from training"
            )
    return used, differs if metadata is not None else {}


def kind_tokenization(
    model: str | Path, kind: str, overrides: Mapping[str, Any] | None, step_separator: str | None = None
) -> int | None:
    """The ``max_length`` to score a PRM of another kind with (None: the model's own limit).

    Such a model has its own input layout (its kind's), so of the tokenization keys only ``max_length`` applies; a
    setting of another one that would change something is refused rather than dropped.
    """
    asked = dict(overrides or {})
    if step_separator is not None:
        asked["step_separator"] = step_separator
    default = TokenizationParams()
    moot = [k for k, v in asked.items() if k != "max_length" and v != getattr(default, k)]
    if moot:
        raise UsageError(
            f"{model} is a {kind} PRM, which lays out its input its own way: "
            + ", ".join(f"data.{k}={_yaml(asked[k])}" for k in moot)
            + " cannot apply to it",
            hint="drop the setting (or --step-separator) for this model, or score it in a run of its own",
        )
    return asked.get("max_length")


def _yaml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if value is not None else "null"
