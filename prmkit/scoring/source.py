"""What `prmkit score` reads: a JSONL file or stdin line by line with byte offsets (so a resumed run seeks straight
to where it stopped), or any source `prepare` reads; and the solutions each record holds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from prmkit.core.jsonio import nonfinite_field
from prmkit.data.formats import FORMATS, Options, RowError, convert, detect_format, get_format, validate
from prmkit.data.sources import SourceRecord


class InputSource:
    """A score input: a JSONL file or stdin read line by line with byte offsets, or any source `prepare` reads."""

    def __init__(self, spec: str):
        from prmkit.data.sources import Source, resolve_source

        self.spec = spec
        self.stdin = spec == "-"
        self.source = Source("<stdin>", "jsonl", None, unit="line") if self.stdin else resolve_source(spec)
        self.unit = self.source.unit

    @property
    def name(self) -> str:
        return self.source.spec

    def where(self, number: int) -> str:
        return self.source.where(number)

    def fingerprint(self) -> str | None:
        """A hash of the content (not the path, so the same file named from elsewhere still matches)."""
        from prmkit.data.sources import fingerprint_source

        if self.stdin:
            return None
        path = self.source.path
        if path is not None and path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            if self.source.instruction is not None:  # another slice of the file is another input
                h.update(f"\0rows {self.source.instruction}".encode())
            return h.hexdigest()
        return fingerprint_source(self.source)

    def total(self) -> int | None:
        """Number of lines when cheap to know (a JSONL file: counts newlines), else None."""
        if self.source.kind != "jsonl" or self.source.path is None or self.source.instruction is not None:
            return None
        n = 0
        last = b"\n"
        with open(self.source.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                n += block.count(b"\n")
                last = block[-1:]
        return n + (last != b"\n")

    def records(self, after_line: int = 0, after_offset: int | None = None) -> Iterator[SourceRecord]:
        from prmkit.data.sources import iter_records, read_jsonl

        if self.source.kind != "jsonl" or self.source.instruction is not None:
            # A slice is read from its start: a byte offset says nothing about which rows the slice holds.
            for rec in iter_records(self.source):
                if rec.number > after_line:
                    yield rec
            return
        if self.stdin:
            import sys

            yield from read_jsonl(sys.stdin.buffer, self.name)
            return
        assert self.source.path is not None
        with open(self.source.path, "rb") as fh:
            if after_offset is not None:
                fh.seek(after_offset)
                yield from read_jsonl(fh, self.name, after_line, after_offset)
            else:
                for rec in read_jsonl(fh, self.name):
                    if rec.number > after_line:
                        yield rec


def score_signatures() -> dict[str, tuple[str, ...]]:
    """What each format needs to be scored: labels are optional, so a format scored as it is needs only its prompt and
    steps columns (stepwise: prompt + completions)."""
    return {name: fmt.score_columns[:2] if fmt.score_columns else fmt.signature for name, fmt in FORMATS.items()}


SCORE_SIGNATURES = score_signatures()


def detect_score_format(record: dict, source: str) -> str:
    """The format of records to score: a format scored as it is, by its prompt and steps columns, else detected."""
    keys = set(record)
    for name, fmt in FORMATS.items():
        if fmt.score_columns and set(fmt.score_columns[:2]) <= keys:
            return name
    return detect_format(keys, source)


def rows_to_score(
    fmt: str | None, record: Any, unit: str, number: int, opts: Options
) -> list[tuple[dict, str, list[str]]]:
    """(output object, prompt, steps) for each solution in a record. Raises RowError.

    Stepwise and ProcessBench records are scored as they are and written back whole; formats that need conversion
    (math-shepherd, prm800k) are written as their converted stepwise rows with the source line or row number.
    ``fmt`` is None only for a record that is not a JSON object (refused before any format is read).
    Labels are optional, but when a record has them (not null) they are checked as `eval` checks them, and a record
    holding a number that JSON cannot write (NaN, Infinity) is refused, since its line could not be written back.
    """
    if not isinstance(record, dict):
        raise RowError("row", f"expected a JSON object, got {'null' if record is None else type(record).__name__}")
    spec = get_format(fmt)
    if spec.score_columns is None:
        rows = convert(spec.name, record, opts)
        return [
            (
                {"prompt": r["prompt"], "completions": r["completions"], "labels": r["labels"], unit: number},
                r["prompt"],
                r["completions"],
            )
            for r in rows
        ]
    prompt_key, steps_key, labels_key = spec.score_columns
    for key in (prompt_key, steps_key):
        if key not in record:
            raise RowError(key, "missing")
    prompt, steps, labels = record[prompt_key], record[steps_key], record.get(labels_key)
    try:
        if labels is None:
            validate(
                {
                    "prompt": prompt,
                    "completions": steps,
                    "labels": [None] * len(steps) if isinstance(steps, list) else None,
                },
                allow_unlabelled=True,
            )
        else:  # checked as the format's converter checks them (a first-error index, step labels)
            convert(spec.name, {prompt_key: prompt, steps_key: steps, labels_key: labels}, opts)
    except RowError as e:
        # Name the field as the record spells it.
        head = e.field.split("[")[0]
        name = {"prompt": prompt_key, "completions": steps_key}.get(head, head)
        raise RowError(name + e.field[len(head) :], e.reason) from None
    bad = nonfinite_field(record)
    if bad is not None:
        raise RowError(bad, "NaN or Infinity is not valid JSON, so the scored line could not be written")
    return [(record, prompt, steps)]
