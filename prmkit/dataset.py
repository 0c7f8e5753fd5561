"""Load step-labelled data, validate every row, tokenize it and cache the result.

`prepare`, `train` and `eval` all come through :func:`prepare_splits`, so running `prepare` first is optional: the
same inputs give the same cache key and the work is done once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prmkit import __version__
from prmkit.atomic import check_manifest, make_temp_dir, manifest, remove_leftovers, swap_in
from prmkit.errors import DataError, UsageError, first_line
from prmkit.formats import Options, RowError, check_format, convert, detect_format
from prmkit import jsonio
from prmkit.jsonio import dumps, nonfinite_field
from prmkit.outputs import refuse_inputs_inside
from prmkit.redact import mask, redact
from prmkit.splits import FILE_SPLIT, check_instruction, local_part, sliced_records
from prmkit.tokenization import (
    TokenizationParams,
    TokenizedBatch,
    encode_batches,
    has_soft_labels,
    label_tokens,
    step_label_array,
    tokenizer_fingerprint,
)

log = logging.getLogger("prmkit")

METADATA_FILE = "prmkit_dataset.json"
REJECTS_FILE = "rejects.jsonl"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_PROBLEMS = 10
CHUNK_ROWS = 2048


# ---------------------------------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class Source:
    """Where rows come from, and how to name a row in a message (`file:line 7` or `dataset row 7`)."""

    spec: str
    kind: str  # jsonl | json | parquet | csv | disk | prepared | hub
    path: Path | None = None
    unit: str = "row"
    instruction: str | None = None
    """A local source's split and rows as `datasets` spells them (``train[:300]``); None: every row of the file."""
    split: str | None = None
    """The split named after the path (``saved:test``); None: a file's one split, or a saved dataset's only one."""

    def where(self, number: int) -> str:
        return f"{self.spec}: {self.unit} {number}"


def resolve_source(spec: str) -> Source:
    if spec == "-":
        # prepare, train and eval read a source more than once (fingerprint, rows, extras), and a launched training
        # run's processes share no stdin: only `prmkit score` streams it.
        raise DataError("-: reading data from stdin works only for `prmkit score`",
                        hint="save it to a file first (e.g. `... > rows.jsonl`) and pass that path")
    path = Path(spec).expanduser()
    part = None if path.exists() else local_part(spec, LOCAL_SUFFIXES)
    if part is not None:
        # `rows.jsonl[:300]`, `saved:test[10%:20%]`: a local source with `datasets`' split syntax; never the Hub.
        path = Path(part.path).expanduser()
        check_instruction(spec, part.instruction)
    instruction = part.instruction if part is not None else None
    if path.is_dir():
        if (path / METADATA_FILE).is_file():  # prepare's output: train and eval read its token ids as they are
            return Source(spec, "prepared", path, instruction=instruction, split=part.split if part else None)
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return Source(spec, "disk", path, instruction=instruction, split=part.split if part else None)
        raise DataError(f"{spec}: a directory, but not one written by datasets' save_to_disk")
    suffix = path.suffix.lower()
    if suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise DataError(f"{spec}: file not found" + (f" ({path})" if part is not None else ""))
        if path.stat().st_size == 0:
            raise DataError(f"{spec}: the file is empty")
        if part is not None and part.split not in (None, FILE_SPLIT):
            raise DataError(f"{spec}: a file holds one split, {FILE_SPLIT!r}, not {part.split!r}",
                            hint=f"slice it as {part.path}[...] (a saved dataset directory can hold several splits)")
        kind = "jsonl" if suffix == ".jsonl" else suffix[1:]
        if kind != "parquet":
            with open(path, "rb") as fh:
                check_encoding(fh.read(4), spec)
        return Source(spec, kind, path, unit="line" if kind == "jsonl" else "row", instruction=instruction)
    if part is not None:
        raise DataError(f"{spec}: no such file or directory ({path.resolve()})")
    if path.exists():
        raise DataError(f"{spec}: unsupported file type {suffix or '(none)'}", hint="use .jsonl, .json, .parquet or .csv")
    from prmkit.locate import locate

    try:
        locate(_hub_split(spec)[0], "dataset", repo_type="dataset")
    except UsageError as e:
        raise DataError(e.message, hint=e.hint) from None
    return Source(spec, "hub")


UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
               (b"\xfe\xff", "UTF-16BE"))


def check_encoding(head: bytes, name: str) -> None:
    """Refuse text that is UTF-16 or UTF-32 (told by its first bytes) with the encoding named; UTF-8 passes.

    Line numbers, byte offsets for resuming and the rejects file all assume UTF-8, so such a file is converted once
    by the user rather than decoded here.
    """
    found = next((enc for bom, enc in _OTHER_BOMS if head.startswith(bom)), None)
    if found is None and len(head) == 4:
        # JSON and CSV start with an ASCII character; without a byte-order mark, zeros beside it tell the encoding.
        zeros = tuple(b == 0 for b in head)
        found = {(False, True, True, True): "UTF-32LE", (True, True, True, False): "UTF-32BE",
                 (False, True, False, True): "UTF-16LE", (True, False, True, False): "UTF-16BE"}.get(zeros)
    if found is not None:
        raise DataError(f"{name}: the text is encoded in {found}, not UTF-8",
                        hint=f"convert it once: iconv -f {found} -t UTF-8 IN > OUT (a leading byte-order mark is "
                             "fine in UTF-8)")


@dataclass(slots=True)
class SourceRecord:
    """One record as read: its 1-based line or row number, and the parsed record or the reason it has none.

    ``raw`` is a JSONL line's text, kept so a rejects file can hold a line that JSON cannot write back (malformed, or
    holding NaN) for fixing and replay; ``offset`` is the byte offset just after the line, for resuming with a seek.
    """

    number: int
    record: Any
    problem: str | None = None
    raw: str | None = None
    offset: int | None = None


def parse_jsonl_line(raw: bytes) -> tuple[Any, str | None, str]:
    """(record, problem, text) of one JSONL line. A UTF-8 byte-order mark and CRLF line ends are accepted."""
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    nul = raw.find(b"\x00")
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 ({e.reason} at byte {e.start + skip})"
        text = raw[skip:].decode("utf-8", "backslashreplace")
    else:
        problem = None
    if nul >= 0:
        problem = f"a NUL byte at byte {nul}: not text (a binary or UTF-16 file?)"
    text = text.rstrip("\r\n")
    if problem is not None:
        return None, problem, text
    try:
        return jsonio.loads(text), None, text
    except jsonio.NestingError as e:
        return None, f"JSON {e.msg} (at column {e.colno})", text
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})", text


def read_jsonl(fh, name: str, number: int = 0, offset: int = 0) -> Iterator[SourceRecord]:
    """Records of a binary JSONL stream (a file, or stdin), numbered after ``number``; blank lines are skipped."""
    for raw in fh:
        if offset == 0:
            check_encoding(raw[:4], name)
        number += 1
        offset += len(raw)
        if not raw.strip() or raw.strip() == UTF8_BOM:
            continue
        record, problem, text = parse_jsonl_line(raw)
        yield SourceRecord(number, record, problem, text, offset)


def iter_records(source: Source) -> Iterator[SourceRecord]:
    """Every record of a source, in order (those its slice selects). A record that cannot be parsed has a problem
    instead. Records keep their number in the whole file, so a message names the line an editor shows."""
    if source.instruction is None or source.kind == "prepared":
        yield from _iter_all(source)
    else:
        yield from sliced_records(source, _iter_all)


def _iter_all(source: Source) -> Iterator[SourceRecord]:
    if source.kind == "prepared":
        raise DataError(f"{source.spec}: a `prmkit prepare` output holds token ids, not text rows; only train and eval "
                        "read it", hint="give the data it was prepared from (its prmkit_dataset.json names it)")
    if source.kind == "jsonl":
        assert source.path is not None
        with open(source.path, "rb") as fh:
            yield from read_jsonl(fh, source.spec)
    elif source.kind == "json":
        yield from _iter_json(source)
    else:
        ds = _load_with_datasets(source)
        number = 0
        for batch in ds.iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                number += 1
                yield SourceRecord(number, dict(zip(keys, values)))


def _iter_json(source: Source) -> Iterator[SourceRecord]:
    assert source.path is not None
    raw = source.path.read_bytes()
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        text = raw[skip:].decode("utf-8")
        data = jsonio.loads(text, nesting=False)  # too deep to read at all; a row too deep is rejected below
    except UnicodeDecodeError as e:
        raise DataError(f"{source.spec}: not UTF-8 ({e.reason} at byte {e.start + skip})") from None
    except jsonio.NestingError as e:
        raise DataError(f"{source.spec}: line {e.lineno}: JSON {e.msg} (at column {e.colno})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise DataError(f"{source.spec}: line {e.lineno}: malformed JSON (extra data; is it JSON Lines? name it .jsonl)") from None
        raise DataError(f"{source.spec}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    expected = "expected a JSON array of rows (objects), or an object holding one such array"
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]} wrappers, as datasets' json loader's `field` would take them.
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) != 1:
            found = (f"one object with keys {sorted(data)}" if not lists
                     else f"an object with several arrays of rows ({', '.join(sorted(lists))})")
            hint = ("a single row needs to be in an array: [{...}], or one object per line in a .jsonl file"
                    if not lists else "keep one array of rows in the file")
            raise DataError(f"{source.spec}: found {found}; {expected}", hint=hint)
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{source.spec}: found a JSON {_json_kind(data)}; {expected}")
    if not data:
        raise DataError(f"{source.spec}: no rows (an empty JSON array)")
    deep = jsonio.text_too_deep(text)
    for number, record in enumerate(data, start=1):
        if deep and jsonio.nested_too_deep(record):
            yield SourceRecord(number, None, f"JSON nested more than {jsonio.MAX_DEPTH} arrays/objects deep")
        else:
            yield SourceRecord(number, record)


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _load_with_datasets(source: Source):
    import datasets

    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(str(source.path))
            named = source.split
            if isinstance(ds, datasets.DatasetDict):
                if named is not None and named not in ds:
                    raise DataError(f"{source.spec}: no split {named!r}; it holds {', '.join(ds)}")
                if named is None and len(ds) != 1 and "train" not in ds:
                    raise DataError(f"{source.spec}: holds splits {list(ds)}; name one as {source.path}:SPLIT")
                ds = ds[named or "train"] if (named or "train") in ds else next(iter(ds.values()))
            elif named not in (None, FILE_SPLIT):
                raise DataError(f"{source.spec}: a saved single dataset holds one split, {FILE_SPLIT!r}, not {named!r}")
            return ds
        if source.kind in ("parquet", "csv"):
            return datasets.load_dataset(source.kind, data_files=str(source.path), split="train")
        name, split = _hub_split(source.spec)
        return datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{source.spec}: not found ({e})") from None
    except Exception as e:  # datasets raises many types for an unreachable or missing dataset
        raise DataError(f"{source.spec}: could not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                        hint="a Hub dataset needs network access; local files need a .jsonl, .json, .parquet or .csv suffix") from None


def _hub_split(spec: str) -> tuple[str, str]:
    # `org/name:train[:10%]` or `org/name[:10%]`-style split syntax; default split is train.
    if ":" in spec and "[" not in spec.split(":", 1)[0]:
        name, split = spec.split(":", 1)
        return name, split or "train"
    if "[" in spec:
        name, rest = spec.split("[", 1)
        return name, "train[" + rest
    return spec, "train"


def fingerprint_source(source: Source) -> str:
    """A hash that changes whenever the source's content does."""
    h = hashlib.sha256(source.spec.encode())
    if source.instruction is not None:
        h.update(f"\0rows {source.instruction}".encode())  # stated, not left to the spelling of the spec
    if source.path is not None and source.path.is_file():
        with open(source.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    elif source.path is not None and source.path.is_dir():
        for p in sorted(source.path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(source.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(_load_with_datasets(source)._fingerprint.encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Converting and validating


@dataclass
class SplitReport:
    source: str
    format: str = ""
    rows_in: int = 0
    rows_rejected: int = 0
    rows_converted: int = 0
    rows_kept: int = 0
    rows_dropped_truncated: int = 0
    steps: int = 0
    steps_lost_to_truncation: int = 0
    steps_with_separator: int = 0
    labels_positive: int = 0
    labels_negative: int = 0
    labels_soft: int = 0
    soft_label_mean: float | None = None
    tokens_p50: int | None = None
    tokens_p95: int | None = None
    tokens_max: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("problems")
        return d


@dataclass
class StepRows:
    """Validated stepwise rows of one split, in columns, with the source row each came from."""

    prompts: list[str] = field(default_factory=list)
    completions: list[list[str]] = field(default_factory=list)
    labels: list[list[Any]] = field(default_factory=list)
    first_errors: list[int | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indexes: list[int]) -> "StepRows":
        return StepRows(*([column[i] for i in indexes] for column in (self.prompts, self.completions, self.labels,
                                                                       self.first_errors, self.rows)))


def tally_rows(report: SplitReport, rows: StepRows, separator: str) -> None:
    """Steps and labels of ``rows`` into ``report`` (what prepare's table shows)."""
    soft_sum = 0.0
    report.rows_converted = len(rows)
    report.steps = sum(len(c) for c in rows.completions)
    report.steps_with_separator = sum(separator in s for c in rows.completions for s in c) if separator else 0
    report.labels_positive = report.labels_negative = report.labels_soft = 0
    for labels in rows.labels:
        for label in labels:
            if label is None:
                continue
            if isinstance(label, float):
                report.labels_soft += 1
                soft_sum += label
            elif label:
                report.labels_positive += 1
            else:
                report.labels_negative += 1
    report.soft_label_mean = soft_sum / report.labels_soft if report.labels_soft else None


def read_step_rows(
    spec: str,
    fmt: str,
    opts: Options,
    separator: str,
    skip_invalid: bool,
    rejects: list[dict] | None = None,
) -> tuple[StepRows, SplitReport]:
    """Read a source, convert it to stepwise rows and validate each; collect or raise on bad rows."""
    source = resolve_source(spec)
    report = SplitReport(source=spec)
    out = StepRows()
    records = iter_records(source)
    if fmt == "auto":
        fmt, number, records = _detect(source, records)
        origin = f"the format detected from {source.unit} {number}"
    else:
        origin = "the format given"
    report.format = fmt
    problems: list[str] = []
    for rec in records:
        number, record = rec.number, rec.record
        report.rows_in += 1
        try:
            if rec.problem is not None:
                raise RowError("row", rec.problem)
            check_format(fmt, record, origin)
            rows = convert(fmt, record, opts)
        except RowError as e:
            report.rows_rejected += 1
            line = f"{source.where(number)}: {e.field}: {e.reason}"
            if len(problems) < 1000:
                problems.append(line)
            if rejects is not None:
                rejects.append(reject_entry(spec, source.unit, rec, e.field, e.reason))
            continue
        for row in rows:
            out.prompts.append(row["prompt"])
            out.completions.append(row["completions"])
            out.labels.append(row["labels"])
            out.first_errors.append(row.get("first_error"))
            out.rows.append(number)
    tally_rows(report, out, separator)
    report.problems = problems
    if problems and not skip_invalid:
        raise DataError(
            f"{spec}: {report.rows_rejected} of {report.rows_in} rows are invalid",
            problems=problems,
            hint="fix them, or pass --skip-invalid to write them to a rejects file and go on",
        )
    if report.rows_in == 0:
        raise DataError(f"{spec}: no rows")
    if report.steps_with_separator:
        log.warning(
            f"{spec}: {report.steps_with_separator} of {report.steps} steps contain the separator {separator!r}, so "
            "the model sees it inside a step as well as after one. Harmless where steps span lines on purpose "
            "(labels and scores sit only after each step); otherwise pick a data.step_separator the steps lack"
        )
    return out, report


DETECT_SCAN = 100


def _detect(source: Source, records: Iterator[SourceRecord]) -> tuple[str, int, Iterator[SourceRecord]]:
    """The format, from the first record that is a JSON object (bad lines before it are left for the caller)."""
    seen: list[SourceRecord] = []
    for rec in records:
        seen.append(rec)
        if rec.problem is None and isinstance(rec.record, dict):
            fmt = detect_format(rec.record.keys(), source.where(rec.number))
            log.info(f"{source.spec}: detected format {fmt} from {source.unit} {rec.number} "
                     f"(columns {', '.join(sorted(rec.record))})")
            return fmt, rec.number, _chain(seen, records)
        if len(seen) >= DETECT_SCAN:
            break
    if not seen:
        raise DataError(f"{source.spec}: no rows")
    raise DataError(
        f"{source.spec}: cannot detect the data format: none of the first {len(seen)} {source.unit}s is a JSON object",
        problems=[f"{source.where(r.number)}: {r.problem or 'a JSON ' + _json_kind(r.record) + ', expected an object'}"
                  for r in seen],
        hint="each row is one JSON object, e.g. {\"prompt\": ..., \"completions\": [...], \"labels\": [...]}",
    )


def reject_entry(spec: str, unit: str, rec: SourceRecord, field_name: str, reason: str) -> dict[str, Any]:
    """A rejects-file line: where, why, the record, and the line's own text when the record cannot say it (a line
    that could not be parsed has record null; NaN would be written as null)."""
    entry = {"source": mask(spec), unit: rec.number, "field": field_name, "reason": reason, "record": rec.record}
    if rec.raw is not None and (rec.problem is not None or nonfinite_field(rec.record) is not None):
        entry["raw"] = rec.raw
    return entry


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing and caching


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


def tokenize_step_rows(rows: StepRows, tokenizer, params: TokenizationParams, is_eval: bool, num_proc: int | None = None,
                       report: SplitReport | None = None, on_rows: Callable[[int, int], None] | None = None,
                       kind_encoder: Any = None):
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
        encoded = encode_batches(tokenizer, ((rows.prompts[a:b], rows.completions[a:b]) for a, b in chunks), params,
                                 processes=processes)
    else:  # another PRM kind's layout (prmkit.kinds): the same function score uses for that kind
        from prmkit.tokenization import EncodedBatch

        encoded = (EncodedBatch.from_rows(kind_encoder.encode(
            list(zip(rows.prompts[a:b], rows.completions[a:b])), [f"row {n}" for n in rows.rows[a:b]]))
            for a, b in chunks)
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
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(batch.input_ids, type=schema.field("input_ids").type.value_type)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(batch.labels.astype(schema.field("labels").type.value_type.to_pandas_dtype()))),
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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load only the tokenizer (never weights); a directory holding just tokenizer files works."""
    from transformers import AutoTokenizer

    from prmkit.locate import locate

    name_or_path = locate(name_or_path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"tokenizer {name_or_path!r} could not be loaded: {str(e).splitlines()[0]}",
                         hint="set model.tokenizer (or model.name_or_path) to a local directory or a reachable Hub id") from None
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json fails with whatever the parser meets first
        raise UsageError(f"tokenizer {name_or_path!r} could not be loaded: {first_line(e)}",
                         hint="its tokenizer files are damaged: restore them, or save the tokenizer again") from None


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


def cache_root(cfg_cache_dir: str | None) -> Path:
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser()
    if os.environ.get("PRMKIT_CACHE"):
        return Path(os.environ["PRMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prmkit"


def _train_kind_encoder(cfg, tokenizer):
    """The lm-tag kind's tokenization when ``train.kind`` asks for it (None: TRL's token classification)."""
    train = getattr(cfg, "train", None)
    if train is None or getattr(train, "kind", "token-classification") != "lm-tag":
        return None
    from prmkit import kinds

    settings = kinds.KindSettings.from_sources({**cfg.model.kind_settings(), "kind": kinds.LM_TAG}, None)
    kinds.ensure_tag_token(tokenizer, settings.tag())  # as train does (a no-op there): `prepare` alone works too
    return kinds.KindEncoder(kinds.LM_TAG, tokenizer, settings, cfg.data.max_length)


def cache_key(tok_fp: dict, params: TokenizationParams, data_cfg, sources: dict[str, str],
              kind: dict[str, Any] | None = None, held_out: dict[str, Any] | None = None) -> str:
    material = {
        **({"kind": kind} if kind else {}),
        **({"eval_fraction": held_out} if held_out else {}),
        "prmkit": __version__,
        "tokenizer": tok_fp["sha256"],
        "params": params.to_dict(),
        "format": data_cfg.format,
        "prm800k_neutral": data_cfg.prm800k_neutral,
        "label_threshold": data_cfg.label_threshold,
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def prepare_splits(
    cfg,
    tokenizer,
    output: str | Path | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Prepared:
    """Prepare `data.train` (split `train`) and `data.eval` (split `eval`) into a cached DatasetDict.

    With ``output`` the result goes there (a prepared directory with other inputs is rebuilt; any other existing
    directory is refused unless ``overwrite``); without it, into the cache under ``data.cache_dir``.
    ``on_progress(split, rows_done, rows_total)`` follows tokenization.
    """
    import datasets

    from prmkit.splits import build_splits, check_eval_fraction, prepared_inputs, split_seed

    data = cfg.data
    check_eval_fraction(data)
    skip_invalid = skip_invalid or data.skip_invalid
    specs = {name: spec for name, spec in (("train", data.train), ("eval", data.eval)) if spec}
    if not specs:
        raise UsageError("no data: set data.train (and optionally data.eval)", hint="e.g. --set data.train=rows.jsonl")
    params = TokenizationParams.from_data_config(data)
    # Before the fingerprint: lm-tag may add its step tag to the tokenizer, which changes its ids.
    kind_encoder = _train_kind_encoder(cfg, tokenizer)
    kind = kind_encoder.settings.to_dict() if kind_encoder is not None else None
    tok_fp = tokenizer_fingerprint(tokenizer)
    resolved = {name: resolve_source(spec) for name, spec in specs.items()}
    held = {"fraction": data.eval_fraction, "seed": split_seed(cfg)} if data.eval_fraction is not None else None
    given = prepared_inputs(resolved, tok_fp, params, kind, data, held)
    if given.as_it_is is not None and output is None:
        return given.as_it_is  # one prepared directory, whole, as prepare wrote it: nothing to copy
    sources = {name: fingerprint_source(src) for name, src in resolved.items()}
    key = cache_key(tok_fp, params, data, sources, kind, held)
    target = Path(output) if output else cache_root(data.cache_dir) / "prepared" / key
    if output:
        # A rebuild replaces the whole directory: an input inside it would be deleted with it.
        refuse_inputs_inside(target, [("data.train", data.train), ("data.eval", data.eval),
                                      ("tokenizer", cfg.tokenizer_name), ("--config", getattr(cfg, "source", None))],
                             "prepare replaces")

    removed, size = remove_leftovers(target.parent, target.name)
    if removed:
        log.info(f"removed {removed} temporary director{'y' if removed == 1 else 'ies'} ({size / 1e6:.1f} MB) left in "
                 f"{target.parent} by an interrupted prepare")
    existing = _read_metadata(target)
    if existing is not None and existing.get("cache_key") == key and not overwrite:
        damage = verify_prepared(target, existing)
        if damage is None:
            log.info(f"reusing prepared data in {target} (inputs unchanged)")
            reports = {n: SplitReport(**r) for n, r in existing.get("splits", {}).items()}
            rejects = target / REJECTS_FILE
            return Prepared(target, existing, reports, cache_hit=True, rejects_path=rejects if rejects.exists() else None)
        log.warning(f"{target}: {damage}; rebuilding it")
    elif existing is None and (target.is_file() or target.is_symlink() or (target.is_dir() and any(target.iterdir()))):
        if output is not None and not overwrite:
            raise UsageError(f"{target} exists and is not a prmkit prepared dataset (no readable {METADATA_FILE})",
                             hint="pass --overwrite to replace it, or choose another output directory")
        if output is None:
            # The cache is prmkit's own: an entry without its metadata is what an interrupted or damaged write leaves.
            log.warning(f"{target}: cache entry without a readable {METADATA_FILE}; rebuilding it")
    elif existing is not None and not overwrite:
        log.info(f"rebuilding {target}: inputs changed since it was prepared")

    # The build directory comes first: an unwritable output fails now, not after every row has been tokenized.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        rejects: list[dict] = []
        splits, reports, held_record = build_splits(cfg, specs, given.splits, held, tokenizer, params, kind_encoder,
                                                    skip_invalid, rejects, on_progress)
        metadata = {
            "prmkit_version": __version__,
            "cache_key": key,
            "tokenizer": tok_fp,
            "tokenization": params.to_dict(),
            **({"kind": kind} if kind else {}),
            "data": {
                "format": data.format,
                "formats": {n: r.format for n, r in reports.items()},
                "prm800k_neutral": data.prm800k_neutral,
                "label_threshold": data.label_threshold,
                "sources": specs,
                "fingerprints": sources,
                **({"eval_split": held_record} if held_record else {}),
            },
            "splits": {n: r.to_dict() for n, r in reports.items()},
        }
        _write_into(tmp, datasets.DatasetDict(splits), metadata, rejects)
        _swap_in(tmp, target)
        rejects_path = target / REJECTS_FILE
        return Prepared(target, metadata, reports, cache_hit=False, rejects_path=rejects_path if rejects else None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_rows_left(split: str, report: SplitReport, params: TokenizationParams) -> None:
    """An empty split is an error here, not a dataset that train or eval trips over later."""
    if report.rows_kept:
        return
    spec = report.source
    if report.rows_converted == 0 and report.rows_rejected:
        raise DataError(f"{spec}: no {split} rows left: all {report.rows_rejected} rows were rejected",
                        problems=report.problems, hint="fix the rows listed above")
    if report.rows_converted == 0:
        raise DataError(f"{spec}: no {split} rows left: {report.rows_in} rows gave no labelled solution",
                        hint="check data.format and data.prm800k_neutral")
    limits = ", ".join(f"data.{k}={getattr(params, k)}" for k in ("max_length", "max_prompt_length", "max_completion_length"))
    raise DataError(f"{spec}: no {split} rows left: all {report.rows_converted} rows lost every labelled step to "
                    f"truncation ({limits})",
                    hint="raise data.max_length (or data.max_completion_length / lower data.max_prompt_length), "
                         "or set it to null")


def _read_metadata(target: Path) -> dict | None:
    meta = target / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        return jsonio.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def verify_prepared(target: Path, metadata: dict) -> str | None:
    """What is wrong with a prepared directory's files, or None when each has the size and checksum it was written with."""
    files = metadata.get("files")
    if not isinstance(files, dict) or not files:
        return f"{METADATA_FILE} records no checksums (written by an older prmkit)"
    return check_manifest(target, files)


def _write_into(tmp: Path, dsd, metadata: dict, rejects: list[dict]) -> None:
    dsd.save_to_disk(str(tmp / "data"))
    for item in (tmp / "data").iterdir():
        item.rename(tmp / item.name)
    (tmp / "data").rmdir()
    if rejects:
        with open(tmp / REJECTS_FILE, "w", encoding="utf-8") as fh:
            for r in rejects:
                fh.write(dumps(r) + "\n")
    metadata["files"] = manifest(tmp, exclude=(METADATA_FILE,))
    (tmp / METADATA_FILE).write_text(dumps(redact(metadata), indent=2), encoding="utf-8")


def _swap_in(tmp: Path, target: Path) -> None:
    # Built beside the target and swapped into place, so an interrupted prepare never leaves a half-written dataset
    # and never loses the previous one (see swap_in).
    swap_in(tmp, target)
