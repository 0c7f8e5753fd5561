"""Model directories: what `train` writes beside the weights, and what `score`, `eval` and `push` read back.

A prmkit model directory is self-describing, like a transformers one: ``prmkit.json`` records the step separator and
every tokenization parameter, the label mapping, the base model and the data, so nobody repeats the separator.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prmkit import __version__
from prmkit.tokenization import TokenizationParams

log = logging.getLogger("prmkit")

PRMKIT_JSON = "prmkit.json"
CONFIG_YAML = "prmkit_config.yaml"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> Path:
    path = Path(model_dir) / PRMKIT_JSON
    write_json_atomic(path, metadata)
    return path


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """`prmkit.json` of a local model directory, or None when there is none (e.g. a model trained with TRL)."""
    path = Path(model_dir) / PRMKIT_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_tokenization(
    model: str | Path, metadata: dict[str, Any] | None, step_separator: str | None = None, **overrides: Any
) -> tuple[TokenizationParams, bool]:
    """The tokenization a model was trained with; returns (params, assumed) where assumed means no prmkit.json.

    Explicit arguments win over prmkit.json, with a warning when they contradict it: scoring at a separator
    training never used places labels where the model learned nothing.
    """
    if metadata is not None:
        params = TokenizationParams.from_dict(metadata.get("tokenization", {}))
        if step_separator is not None and step_separator != params.step_separator:
            log.warning(f"{model}: trained with separator {params.step_separator!r}, scoring with {step_separator!r} as asked")
            params = TokenizationParams(**{**params.to_dict(), "step_separator": step_separator})
        clean = {k: v for k, v in overrides.items() if v is not None}
        if clean:
            params = TokenizationParams(**{**params.to_dict(), **clean})
        return params, False
    sep = "\n" if step_separator is None else step_separator
    if step_separator is None:
        log.warning(f"{model}: no {PRMKIT_JSON}; assuming step separator {sep!r} (TRL's default). Pass --step-separator if it was trained with another")
    clean = {k: v for k, v in overrides.items() if v is not None}
    return TokenizationParams(**{"step_separator": sep, **clean}), True
