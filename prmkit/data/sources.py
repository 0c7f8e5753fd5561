"""Reading a data source: local files (JSONL, JSON, Parquet, CSV), save_to_disk directories and Hub ids.

Every record keeps where it came from (file, line), so a bad row is named by file, line and field, and skipped rows
go to a rejects file with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.filenames import METADATA_FILE
from prmkit.core.jsonio import nonfinite_field
from prmkit.core.redact import mask
from prmkit.data.formats import Options, RowError, check_format, convert, detect_format
from prmkit.data.split_spec import FILE_SPLIT, check_instruction, local_part, row_ranges
from prmkit.errors import DataError, UsageError, named_first_line

log = logging.getLogger(__name__)


LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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
        raise DataError(
            "-: reading data from stdin works only for `prmkit score`",
            hint="save it to a file first (e.g. `... > rows.jsonl`) and pass that path",
        )
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
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            return Source(spec, "disk", path, instruction=instruction, split=part.split if part else None)
        raise DataError(f"{spec}: a directory, but not one written by datasets' save_to_disk")
    suffix = path.suffix.lower()
    if suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise DataError(f"{spec}: file not found" + (f" ({path})" if part is not None else ""))
        if path.stat().st_size == 0:
            raise DataError(f"{spec}: the file is empty")
        if part is not None and part.split not in (None, FILE_SPLIT):
            raise DataError(
                f"{spec}: a file holds one split, {FILE_SPLIT!r}, not {part.split!r}",
                hint=f"slice it as {part.path}[...] (a saved dataset directory can hold several splits)",
            )
        kind = "jsonl" if suffix == ".jsonl" else suffix[1:]
        if kind != "parquet":
            with open(path, "rb") as fh:
                check_encoding(fh.read(4), spec)
        return Source(spec, kind, path, unit="line" if kind == "jsonl" else "row", instruction=instruction)
    if part is not None:
        raise DataError(f"{spec}: no such file or directory ({path.resolve()})")
    if path.exists():
        raise DataError(
            f"{spec}: unsupported file type {suffix or '(none)'}", hint="use .jsonl, .json, .parquet or .csv"
        )
    from prmkit.core.locate import locate

    try:
        locate(_hub_split(spec)[0], "dataset", repo_type="dataset")
    except UsageError as e:
        raise DataError(e.message, hint=e.hint) from None
    return Source(spec, "hub")


UTF8_BOM = b"\xef\xbb\xbf"


_OTHER_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32LE"),
    (b"\x00\x00\xfe\xff", "UTF-32BE"),
    (b"\xff\xfe", "UTF-16LE"),
    (b"\xfe\xff", "UTF-16BE"),
)


def check_encoding(head: bytes, name: str) -> None:
    """Refuse text that is UTF-16 or UTF-32 (told by its first bytes) with the encoding named; UTF-8 passes.

    Line numbers, byte offsets for resuming and the rejects file all assume UTF-8, so such a file is converted once
    by the user rather than decoded here.
    """
    found = next((enc for bom, enc in _OTHER_BOMS if head.startswith(bom)), None)
    if found is None and len(head) == 4:
        # JSON and CSV start with an ASCII character; without a byte-order mark, zeros beside it tell the encoding.
        zeros = tuple(b == 0 for b in head)
        by_zeros: dict[tuple[bool, ...], str] = {
            (False, True, True, True): "UTF-32LE",
            (True, True, True, False): "UTF-32BE",
            (False, True, False, True): "UTF-16LE",
            (True, False, True, False): "UTF-16BE",
        }
        found = by_zeros.get(zeros)
    if found is not None:
        raise DataError(
            f"{name}: the text is encoded in {found}, not UTF-8",
            hint=f"convert it once: iconv -f {found} -t UTF-8 IN > OUT (a leading byte-order mark is fine in UTF-8)",
        )


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
        problem: str | None = f"not UTF-8 ({e.reason} at byte {e.start + skip})"
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
        raise DataError(
            f"{source.spec}: a `prmkit prepare` output holds token ids, not text rows; only train and eval read it",
            hint="give the data it was prepared from (its prmkit_dataset.json names it)",
        )
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
            raise DataError(
                f"{source.spec}: line {e.lineno}: malformed JSON (extra data; is it JSON Lines? name it .jsonl)"
            ) from None
        raise DataError(f"{source.spec}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    expected = "expected a JSON array of rows (objects), or an object holding one such array"
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]} wrappers, as datasets' json loader's `field` would take them.
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) != 1:
            found = (
                f"one object with keys {sorted(data)}"
                if not lists
                else f"an object with several arrays of rows ({', '.join(sorted(lists))})"
            )
            hint = (
                "a single row needs to be in an array: [{...}], or one object per line in a .jsonl file"
                if not lists
                else "keep one array of rows in the file"
            )
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
        type(value), "null" if value is None else type(value).__name__
    )


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
        raise DataError(
            f"{source.spec}: could not load ({named_first_line(e)})",
            hint="a Hub dataset needs network access; local files need a .jsonl, .json, .parquet or .csv suffix",
        ) from None


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

    def take(self, indexes: list[int]) -> StepRows:
        return StepRows(
            [self.prompts[i] for i in indexes],
            [self.completions[i] for i in indexes],
            [self.labels[i] for i in indexes],
            [self.first_errors[i] for i in indexes],
            [self.rows[i] for i in indexes],
        )


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
    spec: str, fmt: str, opts: Options, separator: str, skip_invalid: bool, rejects: list[dict] | None = None
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
            log.info(
                f"{source.spec}: detected format {fmt} from {source.unit} {rec.number} "
                f"(columns {', '.join(sorted(rec.record))})"
            )
            return fmt, rec.number, _chain(seen, records)
        if len(seen) >= DETECT_SCAN:
            break
    if not seen:
        raise DataError(f"{source.spec}: no rows")
    raise DataError(
        f"{source.spec}: cannot detect the data format: none of the first {len(seen)} {source.unit}s is a JSON object",
        problems=[
            f"{source.where(r.number)}: {r.problem or 'a JSON ' + _json_kind(r.record) + ', expected an object'}"
            for r in seen
        ],
        hint='each row is one JSON object, e.g. {"prompt": ..., "completions": [...], "labels": [...]}',
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


def sliced_records(source: Any, read_all: Callable[[Any], Iterator[Any]]) -> Iterator[Any]:
    """The records of a local source that its split syntax selects (``read_all(source)``: every record, in order)."""
    for start, stop in row_ranges(source.spec, source.instruction, _count_records(source)):
        if start >= stop:
            continue
        for index, rec in enumerate(read_all(source)):
            if index >= stop:
                break
            if index >= start:
                yield rec


def _count_records(source: Any) -> int:
    """Rows of a local source, for a slice's percentages and negative indexes; a JSONL file is counted, not parsed."""
    from prmkit.data.sources import UTF8_BOM, _iter_json, _load_with_datasets

    if source.kind == "jsonl":
        n = 0
        with open(source.path, "rb") as fh:
            for raw in fh:
                n += bool(raw.strip()) and raw.strip() != UTF8_BOM  # the lines read_jsonl yields
        return n
    if source.kind == "json":
        return sum(1 for _ in _iter_json(source))
    return len(_load_with_datasets(source))
