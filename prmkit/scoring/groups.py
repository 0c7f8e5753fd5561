"""`prmkit score --group-by FIELD [--select best]`: Best-of-N while streaming.

The candidates of a group (the lines sharing ``FIELD``'s value) must lie together in the input, so one group at a
time is held: memory grows with the largest group, not with the file. A group seen again after another one started
is a one-line error naming both places (sort the input by the field first). Each candidate's value is its
``aggregates[AGG]`` (:func:`prmkit.metrics.aggregate`); the best is the highest, the first in input order on ties,
and a candidate with no scored step loses to any scored one, as in eval's Best-of-N (:func:`prmkit.metrics.best_of_n`).

Resuming stays exact: the windows are those of a run without grouping, and the group still open when a window is
committed is kept beside the output (``OUT.prmkit-group.N``, N its first line) with its length in the state file, so
a resumed run takes it back instead of scoring its lines again. The groups already finished are found again by
reading the input up to the commit (their keys only: nothing is scored twice).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prmkit.core.jsonio import dumps_record
from prmkit.data.formats import RowError
from prmkit.errors import DataError, UsageError
from prmkit.metrics import AGGREGATES

SELECT = ("best",)


@dataclass(frozen=True)
class GroupSpec:
    field: str
    select: str | None = None
    aggregate: str = "min"

    def __post_init__(self) -> None:
        if not self.field:
            raise UsageError("--group-by: expected a field name")
        if self.select not in (None, *SELECT):
            raise UsageError(f"--select: expected {' or '.join(SELECT)}, got {self.select!r}")
        if self.aggregate not in AGGREGATES:
            raise UsageError(f"--aggregate: expected one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "select": self.select, "aggregate": self.aggregate}


def group_spec(group_by: str | None, select: str | None, aggregate: str | None) -> GroupSpec | None:
    """The grouping asked for, or None; --select and --aggregate mean nothing without --group-by."""
    if group_by is None:
        for flag, value in (("--select", select), ("--aggregate", aggregate)):
            if value is not None:
                raise UsageError(
                    f"{flag} needs --group-by FIELD (the field that names each candidate's group)",
                    hint="e.g. --group-by problem_id --select best",
                )
        return None
    return GroupSpec(group_by, select, aggregate or "min")


def key_of(record: Any, field: str) -> str:
    """The group key of a record: its field's value as canonical JSON (so 1 and "1" are different groups)."""
    if not isinstance(record, dict) or field not in record:
        raise RowError(field, "missing (--group-by needs it on every line)")
    return json.dumps(record[field], sort_keys=True, ensure_ascii=False)


class GroupOrder:
    """The reading side, on every process: each group's lines must be contiguous.

    Finished groups are remembered by a 16-byte digest of their key and their first and last line (about 150 bytes
    each), enough to name where a group came before when it comes back.
    """

    def __init__(self, field: str):
        self.field = field
        self.done: dict[bytes, tuple[int, int]] = {}
        self.key: str | None = None
        self.first = self.last = 0

    def see(self, record: Any, number: int, where: Callable[[int], str]) -> None:
        """Note a record's key (a record without the field is the caller's to reject); refuse a group seen again."""
        if not isinstance(record, dict) or self.field not in record:
            return
        key = key_of(record, self.field)
        if key == self.key:
            self.last = number
            return
        digest = _digest(key)
        if digest in self.done:
            first, last = self.done[digest]
            raise DataError(
                f"{where(number)}: {self.field}: group {_short(key)} appears again after another group; its lines "
                f"{first}-{last} came earlier (--group-by needs each group's lines together)",
                hint=f"sort the input by {self.field} first, e.g. jq -c -s 'sort_by(.{self.field})[]' IN > SORTED "
                "(reads it whole), or group the lines when writing them",
            )
        if self.key is not None:
            self.done[_digest(self.key)] = (self.first, self.last)
        self.key, self.first, self.last = key, number, number

    def replay(self, records: Iterable[Any], upto: int, where: Callable[[int], str]) -> None:
        """See again the records a resumed run has committed (up to line ``upto``), reading only their keys."""
        for rec in records:
            if rec.number > upto:
                break
            if rec.problem is None:
                self.see(rec.record, rec.number, where)


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _short(key: str) -> str:
    return key if len(key) <= 60 else key[:57] + "..."


def ranks(values: list[float | None]) -> list[int]:
    """1-based rank of each value: highest first, input order on ties, no value last (eval's Best-of-N rule)."""
    order = sorted(range(len(values)), key=lambda i: (values[i] is None, -(values[i] or 0.0), i))
    out = [0] * len(values)
    for place, i in enumerate(order, start=1):
        out[i] = place
    return out


class GroupWriter:
    """The writing side, on the process that writes: holds the open group, writes it ranked when the next begins.

    ``emit(obj, line)`` writes one output object (``line``: its input line, for messages). ``base`` is the path
    the open group is kept under at each commit (None for stdout, which is never resumed).
    """

    def __init__(self, spec: GroupSpec, emit: Callable[[dict, int], None], base: Path | None = None):
        self.spec = spec
        self.emit = emit
        self.base = base
        self.key: str | None = None
        self.items: list[tuple[int, dict]] = []
        self.kept = 0  # of self.items, how many the group file holds
        self.kept_bytes = 0
        self.groups = 0
        self.max_buffered = 0

    def add(self, key: str, line: int, obj: dict) -> None:
        if key != self.key:
            self.flush()
            self.key = key
        self.items.append((line, obj))
        self.max_buffered = max(self.max_buffered, len(self.items))

    def flush(self) -> None:
        """Write the open group: every candidate with its rank, or (--select best) the best one."""
        if not self.items:
            return
        values = [(obj.get("aggregates") or {}).get(self.spec.aggregate) for _, obj in self.items]
        placed = ranks(values)
        size = len(self.items)
        for (line, obj), rank in zip(self.items, placed):
            if self.spec.select is None or rank == 1:
                self.emit({**obj, "rank": rank, "group_size": size}, line)
        self.groups += 1
        self.items, self.key, self.kept, self.kept_bytes = [], None, 0, 0

    # -- resuming -------------------------------------------------------------------------------------------------

    def _path(self) -> Path:
        assert self.base is not None
        return self.base.with_name(f"{self.base.name}.{self.items[0][0]}")

    def keep(self) -> dict[str, Any] | None:
        """Append the open group's new candidates to its file and fsync it; what the state file records of it.

        Called before the state is written: a crash in between leaves a longer file than the state says, which the
        resumed run cuts back (or a new group's file, which it removes).
        """
        if self.base is None or not self.items:
            return None
        path = self._path()
        with open(path, "ab" if self.kept else "wb") as fh:
            if not self.kept:
                fh.write((json.dumps({"group": self.key}) + "\n").encode("ascii"))
            for line, obj in self.items[self.kept :]:
                fh.write((dumps_record({"line": line, "object": obj}) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            self.kept_bytes = fh.tell()
        self.kept = len(self.items)
        return {"file": path.name, "rows": self.kept, "bytes": self.kept_bytes}

    def tidy(self, keep: str | None) -> None:
        """Remove group files other than ``keep`` (after the state that no longer names them is written)."""
        if self.base is None:
            return
        for p in self.base.parent.glob(self.base.name + ".*"):
            if p.name != keep:
                p.unlink(missing_ok=True)

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take back the group a committed window left open (``state``: what :meth:`keep` returned then)."""
        if not state:
            self.tidy(None)
            return
        assert self.base is not None
        path = self.base.with_name(state["file"])
        try:
            with open(path, "r+b") as fh:
                fh.truncate(int(state["bytes"]))
                lines = fh.read().splitlines()
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{path}: the open group of the interrupted run cannot be read back ({e})",
                hint="pass --overwrite to start over",
            ) from None
        if len(lines) != int(state["rows"]) + 1:
            raise UsageError(
                f"{path}: holds {len(lines) - 1} candidates, the state file says {state['rows']}",
                hint="pass --overwrite to start over",
            )
        self.key = json.loads(lines[0])["group"]
        self.items = [(entry["line"], entry["object"]) for entry in map(json.loads, lines[1:])]
        self.kept, self.kept_bytes = len(self.items), int(state["bytes"])
        self.max_buffered = len(self.items)
        self.tidy(path.name)
