"""Stepwise rows to a tokenized ``datasets.Dataset`` (in worker processes for large data), and the checks that
verify a prepared directory before it is used."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.atomic import check_manifest
from prmkit.core.filenames import METADATA_FILE
from prmkit.data.sources import SplitReport, StepRows
from prmkit.errors import DataError
from prmkit.tokenization import (
    TokenizationParams,
    TokenizedBatch,
    encode_batches,
    has_soft_labels,
    label_tokens,
    step_label_array,
)

CHUNK_ROWS = 2048


def _features(soft: bool):
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            # Explicit features stop Dataset.map from casting labels back to bool (-100 -> True, TRL's PR #2127 bug).
            "labels": Sequence(Value("float32" if soft else "int64")),
            "num_tokens": Value("int32"),
            "steps_lost": Value("int32"),
            "row": Value("int64"),
        }
    )


def tokenize_step_rows(
    rows: StepRows,
    tokenizer,
    params: TokenizationParams,
    is_eval: bool,
    num_proc: int | None = None,
    report: SplitReport | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    kind_encoder: Any = None,
):
    """Tokenize validated rows into a `datasets.Dataset` with columns input_ids, labels, num_tokens, steps_lost, row.

    Rows that lost every label to truncation are dropped and counted; token-length percentiles and truncation losses
    go into ``report``. Rows go through :func:`encode_batches` in chunks; with more than one process the pre-split
    runs in workers while this process stitches rows together (``num_proc``: None means every available core).
    ``on_rows(done, total)`` is called after each chunk.
    """
    import numpy as np
    import pyarrow as pa

    soft = has_soft_labels(rows.labels)
    features = _features(soft)
    processes = _processes(num_proc, len(rows))
    chunks = [(start, min(start + CHUNK_ROWS, len(rows))) for start in range(0, len(rows), CHUNK_ROWS)]
    if kind_encoder is None:
        encoded = encode_batches(
            tokenizer, ((rows.prompts[a:b], rows.completions[a:b]) for a, b in chunks), params, processes=processes
        )
    else:  # another PRM kind's layout (prmkit.kinds.spec): the same function score uses for that kind
        from prmkit.tokenization import EncodedBatch

        encoded = (
            EncodedBatch.from_rows(
                kind_encoder.encode(
                    list(zip(rows.prompts[a:b], rows.completions[a:b])), [f"row {n}" for n in rows.rows[a:b]]
                )
            )
            for a, b in chunks
        )
    batches, lengths, lost, dropped = [], [], 0, 0
    for (a, b), enc in zip(chunks, encoded):
        batch = label_tokens(enc, step_label_array(rows.labels[a:b]), soft, params.train_on_last_step_only, is_eval)
        record = _record_batch(batch, np.asarray(rows.rows[a:b], dtype=np.int64), features.arrow_schema)
        lengths.append(batch.num_tokens)
        lost += int(batch.steps_lost.sum())
        has_label = batch.labels_kept > 0
        if not has_label.all():
            dropped += int((~has_label).sum())
            record = record.filter(pa.array(has_label))
        batches.append(record)
        if on_rows is not None:
            on_rows(b, len(rows))
    if report is not None:
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        if len(all_lengths):
            report.tokens_p50 = int(np.percentile(all_lengths, 50))
            report.tokens_p95 = int(np.percentile(all_lengths, 95))
            report.tokens_max = int(all_lengths.max())
        report.steps_lost_to_truncation = lost
        report.rows_dropped_truncated = dropped
    table = pa.Table.from_batches(batches, schema=features.arrow_schema)
    return _dataset_from_table(table, features)


def _processes(num_proc: int | None, n_rows: int) -> int:
    """Worker processes for tokenizing: ``num_proc``, or every available core when the input is worth it."""
    if num_proc is not None:
        return max(1, int(num_proc))
    if n_rows < 4 * CHUNK_ROWS:
        return 1  # starting workers would cost more than they save
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _record_batch(batch: TokenizedBatch, row_numbers, schema):
    """One Arrow record batch straight from the flat arrays: no Python list per row, no per-element conversion."""
    import pyarrow as pa

    offsets = pa.array(batch.offsets.astype("int32"), type=pa.int32())
    columns = {
        "input_ids": pa.ListArray.from_arrays(
            offsets, pa.array(batch.input_ids, type=schema.field("input_ids").type.value_type)
        ),
        "labels": pa.ListArray.from_arrays(
            offsets, pa.array(batch.labels.astype(schema.field("labels").type.value_type.to_pandas_dtype()))
        ),
        "num_tokens": pa.array(batch.num_tokens.astype("int32")),
        "steps_lost": pa.array(batch.steps_lost.astype("int32")),
        "row": pa.array(row_numbers),
    }
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _dataset_from_table(table, features):
    """A Dataset over an in-memory Arrow table.

    `Dataset.from_dict` would convert nested Python lists element by element and hash the whole table for a
    fingerprint; prmkit keys its own cache, so a random fingerprint is right here.
    """
    import uuid

    import datasets

    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=uuid.uuid4().hex)


@dataclass
class Prepared:
    """What `prepare` made: the DatasetDict's directory, its metadata, and one report per split."""

    path: Path
    metadata: dict[str, Any]
    reports: dict[str, SplitReport]
    cache_hit: bool
    rejects_path: Path | None = None

    def load(self):
        import datasets

        return datasets.load_from_disk(str(self.path))


def _check_rows_left(split: str, report: SplitReport, params: TokenizationParams) -> None:
    """An empty split is an error here, not a dataset that train or eval trips over later."""
    if report.rows_kept:
        return
    spec = report.source
    if report.rows_converted == 0 and report.rows_rejected:
        raise DataError(
            f"{spec}: no {split} rows left: all {report.rows_rejected} rows were rejected",
            problems=report.problems,
            hint="fix the rows listed above",
        )
    if report.rows_converted == 0:
        raise DataError(
            f"{spec}: no {split} rows left: {report.rows_in} rows gave no labelled solution",
            hint="check data.format and data.prm800k_neutral",
        )
    limits = ", ".join(
        f"data.{k}={getattr(params, k)}" for k in ("max_length", "max_prompt_length", "max_completion_length")
    )
    raise DataError(
        f"{spec}: no {split} rows left: all {report.rows_converted} rows lost every labelled step to "
        f"truncation ({limits})",
        hint="raise data.max_length (or data.max_completion_length / lower data.max_prompt_length), or set it to null",
    )


def _read_metadata(target: Path) -> dict | None:
    meta = target / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        return jsonio.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def verify_prepared(target: Path, metadata: dict) -> str | None:
    """What is wrong with a prepared directory's files, or None when each has the size and checksum it was written
    with."""
    files = metadata.get("files")
    if not isinstance(files, dict) or not files:
        return f"{METADATA_FILE} records no checksums (written by an older prmkit)"
    return check_manifest(target, files)
