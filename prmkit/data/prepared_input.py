"""A `prmkit prepare` output read back as data: ``--train prepared/`` (train) or ``--data prepared/`` (eval).

Such a directory holds token ids and labels, not text, so it is only valid for the tokenizer, tokenization and
label settings it was made with: each is checked against what the run uses, and a difference is one line naming it
(a label at another position, or another tokenizer's ids, would train or score garbage without a word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.core.filenames import METADATA_FILE
from prmkit.data.formats import uses_neutral_ratings
from prmkit.errors import DataError
from prmkit.kinds.registry import DEFAULT_KIND

_HINT = "prepare it again with this run's settings (prmkit prepare ... -o DIR), or give the data it was prepared from"


def is_prepared(path: Path | None) -> bool:
    return path is not None and path.is_dir() and (path / METADATA_FILE).is_file()


@dataclass
class PreparedSplit:
    """One split of a prepared directory: the rows (a `datasets.Dataset`), what prepare said of them, and its
    metadata."""

    dataset: Any
    split: str
    report: dict[str, Any]
    metadata: dict[str, Any]
    format: str


def read_metadata(spec: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{spec}: unreadable {METADATA_FILE} ({e})", hint=_HINT) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenization"), dict):
        raise DataError(f"{spec}: {METADATA_FILE} records no tokenization (not written by prmkit prepare?)", hint=_HINT)
    return meta


def load_split(source: Any, role: str) -> PreparedSplit:
    """The split ``role`` ("train" or "eval") reads from a prepared directory, its slice applied.

    ``DIR:SPLIT`` names a split; otherwise train reads ``train``, and eval reads ``eval`` (or the only split there is).
    The files are checked against the checksums prepare recorded first.
    """
    import datasets

    from prmkit.data.split_spec import row_ranges
    from prmkit.data.tokenized import verify_prepared

    spec, path = source.spec, source.path
    meta = read_metadata(spec, path)
    damage = verify_prepared(path, meta)
    if damage is not None:
        raise DataError(f"{spec}: {damage}", hint=_HINT)
    dsd = datasets.load_from_disk(str(path))
    names = list(dsd)
    split = source.split or (role if role in dsd else names[0] if len(names) == 1 else None)
    if split is None or split not in dsd:
        raise DataError(
            f"{spec}: no {source.split or role!r} split; it holds {', '.join(names)}",
            hint=f"name one: {path}:{names[0]}",
        )
    ds = dsd[split]
    if source.instruction is not None and "[" in source.instruction:
        picked = [
            i
            for a, b in row_ranges(spec, f"{split}[{source.instruction.split('[', 1)[1]}", len(ds))
            for i in range(a, b)
        ]
        ds = ds.select(picked)
    report = dict((meta.get("splits") or {}).get(split) or {})
    fmt = ((meta.get("data") or {}).get("formats") or {}).get(split) or report.get("format") or "prepared"
    return PreparedSplit(ds, split, report, meta, fmt)


def check_matches(
    spec: str,
    meta: dict[str, Any],
    *,
    tokenizer_fp: dict[str, Any] | None,
    params: dict[str, Any],
    kind: dict[str, Any] | None,
    labels: dict[str, Any] | None = None,
    user: str = "this run",
    trained_tokenizer: str | None = None,
) -> None:
    """Refuse prepared data made with another tokenizer, tokenization, PRM kind or label settings, naming the first
    difference. ``user`` names who differs ("this run", "model runs/prm"); ``trained_tokenizer`` is the fingerprint
    a model's prmkit.json records of its training tokenizer, which is as good as the one loaded now (a tokenizer can
    load back as another class, with the same ids and another fingerprint)."""
    recorded = meta.get("tokenization") or {}
    for key in params:
        if key in recorded and recorded[key] != params[key]:
            raise DataError(
                f"{spec}: prepared with data.{key}={recorded[key]!r}, but {user} uses {params[key]!r}",
                hint=f"set data.{key}={_yaml(recorded[key])} to use it as it is, or {_HINT}",
            )
    if (meta.get("kind") or None) != (kind or None):
        said = lambda k: f"kind {k.get('kind')}" if k else DEFAULT_KIND  # noqa: E731
        raise DataError(
            f"{spec}: prepared for {said(meta.get('kind'))}, but {user} trains or scores {said(kind)}", hint=_HINT
        )
    was = (meta.get("tokenizer") or {}).get("sha256")
    if tokenizer_fp is not None and was and was not in (tokenizer_fp.get("sha256"), trained_tokenizer):
        then, now = (meta.get("tokenizer") or {}).get("name_or_path"), tokenizer_fp.get("name_or_path")
        which = f"{then}, not {user}'s {now}" if then != now else f"{then}, whose ids differ from {user}'s"
        raise DataError(
            f"{spec}: prepared with another tokenizer ({which}): its token ids would mean other text", hint=_HINT
        )
    data = meta.get("data") or {}
    for key, value in (labels or {}).items():
        if key == "prm800k_neutral" and not uses_neutral_ratings((data.get("formats") or {}).values()):
            continue  # only PRM800K rows depend on it
        if key in data and data[key] != value:
            raise DataError(
                f"{spec}: prepared with data.{key}={data[key]!r}, but {user} uses {value!r}",
                hint=f"set data.{key}={_yaml(data[key])}, or {_HINT}",
            )


def _yaml(value: Any) -> str:
    return (
        "null"
        if value is None
        else json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def step_rows(ds: Any) -> tuple[list[list[int]], list[list[int]], list[list[Any]], list[int]]:
    """``(input_ids, step positions, step labels, source rows)`` of prepared rows: a step is a labelled position.

    Hard labels come back as booleans and soft ones as floats, as the text formats give them.
    """
    import numpy as np

    from prmkit.tokenization import IGNORE_INDEX

    ids_out, pos_out, labels_out = [], [], []
    soft = ds.features["labels"].feature.dtype == "float32"
    table = ds.with_format("numpy")
    for row in table:
        labels = np.asarray(row["labels"])
        where = np.flatnonzero(labels != IGNORE_INDEX)
        ids_out.append(np.asarray(row["input_ids"]).tolist())
        pos_out.append(where.tolist())
        labels_out.append([float(v) for v in labels[where]] if soft else [bool(v) for v in labels[where]])
    return ids_out, pos_out, labels_out, [int(r) for r in ds["row"]]
