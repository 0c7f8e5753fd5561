"""`prmkit score`'s reader: the input's records in windows of whole records, each checked and converted to the
solutions it holds.

A window holds about ``window_rows`` solutions (the engine sorts a window by length before batching it), and always
whole records, so a run resumed after line N reads exactly the windows an uninterrupted run read from there, and
batches them the same way. A bad record stops the job with its line number and reason before its window is scored,
unless ``skip_invalid`` keeps it as a reject.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from prmkit.data.formats import Options, RowError, check_format
from prmkit.data.sources import SourceRecord
from prmkit.errors import DataError
from prmkit.scoring.groups import GroupOrder, GroupSpec, key_of
from prmkit.scoring.source import SCORE_SIGNATURES, InputSource, detect_score_format, rows_to_score

log = logging.getLogger("prmkit")

Rows = list[tuple[dict, str, list[str]]]
"""A record's solutions: (the object written out, prompt, steps)."""


@dataclass
class Window:
    entries: list[tuple[SourceRecord, Rows | None, tuple[str, str] | None]]
    """Each record with its solutions, or None and its problem (field, reason) when it is rejected."""
    keys: dict[int, str] = field(default_factory=dict)
    """``--group-by``: each scored record's group key, by line number."""

    @property
    def items(self) -> list[tuple[str, list[str]]]:
        """The solutions to score, in input order: (prompt, steps)."""
        return [(prompt, steps) for _, rows, _ in self.entries for _, prompt, steps in rows or ()]

    @property
    def last(self) -> SourceRecord:
        return self.entries[-1][0]


class WindowReader:
    """The records of ``src`` after ``after_line`` (at byte ``after_offset``), a window at a time.

    ``fmt_used`` is the format the records are read as: the one given, the one detected when the output was started
    (``fmt_detected``), or detected from the first record read.
    """

    def __init__(
        self,
        src: InputSource,
        fmt: str,
        *,
        window_rows: int,
        skip_invalid: bool,
        after_line: int = 0,
        after_offset: int | None = None,
        fmt_detected: str | None = None,
        group: GroupSpec | None = None,
    ):
        self.src = src
        self.fmt = fmt
        self.window_rows = window_rows
        self.skip_invalid = skip_invalid
        self.group = group
        self.fmt_used = fmt_detected
        self._origin = "the format given" if fmt != "auto" else "the format detected when this output was started"
        self._opts = Options(is_eval=True)
        self._order: GroupOrder | None = None
        if group is not None:
            self._order = GroupOrder(group.field)
            if after_line:
                self._order.replay(src.records(), after_line, src.where)
        self._after = (after_line, after_offset)
        self._records: Iterator[SourceRecord] | None = None
        self._exhausted = False

    def next_window(self) -> Window | None:
        """The next window, or None when the input is done."""
        if self._exhausted:
            return None
        if self._records is None:
            self._records = self.src.records(*self._after)
        window = Window([])
        n_rows = 0
        while n_rows < self.window_rows:
            rec = next(self._records, None)
            if rec is None:
                self._exhausted = True
                break
            rows, problem = self._read(rec, window)
            window.entries.append((rec, rows, problem))
            n_rows += len(rows or ())
        return window if window.entries else None

    def _read(self, rec: SourceRecord, window: Window) -> tuple[Rows | None, tuple[str, str] | None]:
        src = self.src
        problem: tuple[str, str] | None = ("row", rec.problem) if rec.problem is not None else None
        rows = None
        if problem is None and self._order is not None:
            self._order.see(rec.record, rec.number, src.where)  # a group seen again stops the run here
        if problem is None:
            if self.fmt_used is None and isinstance(rec.record, dict):
                self._detect(rec)
            try:
                if self.fmt_used is not None:
                    check_format(self.fmt_used, rec.record, self._origin, SCORE_SIGNATURES)
                rows = rows_to_score(self.fmt_used, rec.record, src.unit, rec.number, self._opts)
                if self.group is not None:
                    window.keys[rec.number] = key_of(rec.record, self.group.field)
            except RowError as e:
                problem = (e.field, e.reason)
        if problem is not None and not self.skip_invalid:
            # Stop before scoring anything more; what is committed stays, resumable with --skip-invalid.
            raise DataError(
                f"{src.where(rec.number)}: {problem[0]}: {problem[1]}",
                hint="fix the line and re-run with --overwrite, or pass --skip-invalid to write bad lines "
                "to a rejects file and go on",
            )
        return rows, problem

    def _detect(self, rec: SourceRecord) -> None:
        src, fmt = self.src, self.fmt
        self.fmt_used = fmt if fmt != "auto" else detect_score_format(rec.record, src.where(rec.number))
        if fmt == "auto":
            self._origin = f"the format detected from {src.unit} {rec.number}"
            log.info(f"{src.name}: scoring {self.fmt_used} records (detected from {src.unit} {rec.number})")
