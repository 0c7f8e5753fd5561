"""What lets a killed `prmkit score` resume to the same bytes: the output's companion files, the state committed at
window ends, and the journal of each forward batch of the window in progress (:class:`BatchJournal`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prmkit.atomic import write_atomic
from prmkit.errors import UsageError
from prmkit.jsonio import dumps
from prmkit.redact import redact

log = logging.getLogger("prmkit")

STATE_SUFFIX = ".prmkit-state.json"
PARTIAL_SUFFIX = ".partial"
REJECTS_SUFFIX = ".rejects.jsonl"
BATCHES_SUFFIX = ".prmkit-batches"
GROUP_SUFFIX = ".prmkit-group"
JOURNAL_SYNC_SECONDS = 1.0


def output_paths(output: str | Path) -> dict[str, Path]:
    out = Path(output)
    return {
        "output": out,
        "partial": out.with_name(out.name + PARTIAL_SUFFIX),
        "state": out.with_name(out.name + STATE_SUFFIX),
        "rejects": out.with_name(out.name + REJECTS_SUFFIX),
        "rejects_partial": out.with_name(out.name + REJECTS_SUFFIX + PARTIAL_SUFFIX),
        "batches": out.with_name(out.name + BATCHES_SUFFIX),
        "group": out.with_name(out.name + GROUP_SUFFIX),
    }


def journal_path(paths: dict[str, Path], rank: int) -> Path:
    """Each process keeps its own batch journal (its share of every window's batches)."""
    base = paths["batches"]
    return base if rank == 0 else base.with_name(f"{base.name}.{rank}")


def remove_journals(paths: dict[str, Path]) -> None:
    """The batch journals and the kept open group (``--group-by``): what a window in progress leaves behind."""
    for base in (paths["batches"], paths["group"]):
        for p in base.parent.glob(base.name + "*"):
            p.unlink(missing_ok=True)


class BatchJournal:
    """The scores of each forward batch of the window being scored, appended as the batch finishes.

    Output lines are committed at window ends only: they go out in input order, and a window is sorted by length
    before it is batched, so its first lines are often among the last scored. Without the journal a killed run
    would lose up to a whole window of work (2,048 rows; minutes on a CPU). Each batch's scores are written here as
    soon as it finishes (flushed at once, so kill -9 loses at most the batch in progress; fsync'd at least every
    second against a power cut), and a resumed run scoring the same window takes them from here instead of running
    those batches again.

    Replaying is exact: the header must match (the same window of input lines, budget, packing and processes, so the
    engine plans the same batches), each batch must score the very (solution, step, position) targets it recorded,
    and the floats come back from JSON bit for bit. The finished output is the bytes an uninterrupted run writes.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.replayed = 0
        self._fh: Any = None
        self._valid_bytes = 0
        self._synced = time.monotonic()
        self.done = self._read()
        if self.done:
            log.info(f"reusing {len(self.done)} batches scored before the interruption ({path.name})")

    def _read(self) -> dict[int, tuple[str, list[float]]]:
        done: dict[int, tuple[str, list[float]]] = {}
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return done
        with fh:
            head = fh.readline()
            if not head.endswith(b"\n") or _loads(head) != self.header:
                return done  # another window's journal (or a torn header): nothing to reuse
            size = len(head)
            for raw in fh:
                entry = _loads(raw) if raw.endswith(b"\n") else None
                if not (isinstance(entry, dict) and isinstance(entry.get("batch"), int)
                        and isinstance(entry.get("targets"), str) and isinstance(entry.get("scores"), list)):
                    break  # a line cut short by the kill, and anything after it
                done[entry["batch"]] = (entry["targets"], entry["scores"])
                size += len(raw)
        self._valid_bytes = size
        return done

    def replay(self, index: int, targets: list[tuple[int, int, int]]) -> list[float] | None:
        entry = self.done.get(index)
        if entry is None or entry[0] != _targets_digest(targets) or len(entry[1]) != len(targets):
            return None
        self.replayed += 1
        return [float(x) for x in entry[1]]

    def record(self, index: int, targets: list[tuple[int, int, int]], scores: list[float]) -> None:
        if self._fh is None:
            if self._valid_bytes:
                self._fh = open(self.path, "r+b")
                self._fh.truncate(self._valid_bytes)
                self._fh.seek(0, os.SEEK_END)
            else:
                self._fh = open(self.path, "wb")
                self._fh.write((json.dumps(self.header) + "\n").encode("utf-8"))
        entry = {"batch": index, "targets": _targets_digest(targets), "scores": scores}
        self._fh.write((json.dumps(entry) + "\n").encode("utf-8"))
        self._fh.flush()
        now = time.monotonic()
        if now - self._synced >= JOURNAL_SYNC_SECONDS:
            os.fsync(self._fh.fileno())
            self._synced = now

    def close(self) -> None:
        # No fsync: after a whole window its output is committed (and fsync'd) instead; after a crash what was flushed
        # survives a killed process, and record() has synced it within the last second against a power cut.
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _targets_digest(targets: list[tuple[int, int, int]]) -> str:
    return hashlib.sha256(json.dumps(targets).encode()).hexdigest()[:24]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_state(path: Path, state: dict) -> None:
    write_atomic(path, dumps(redact(state), indent=2) + "\n")
    fsync_dir(path.parent)


def read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}: unreadable state file", hint="pass --overwrite to start over") from None


def describe_mismatch(state: dict, job: dict) -> str | None:
    if state.get("input") != job["input"]:
        was = state.get("input_spec")
        return f"it was written for another input ({was!r}, or that file has changed since)"
    old_model, new_model = state.get("model") or {}, job["model"]
    same_model = (old_model.get("sha256") == new_model.get("sha256") if "sha256" in old_model and "sha256" in new_model
                  else old_model == new_model)  # a local directory may move; its content decides
    if not same_model:
        return f"it was written by another model ({state.get('model', {}).get('name')!r}, or its files have changed)"
    if state.get("settings") != job["settings"]:
        old, new = state.get("settings", {}), job["settings"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        changes = "; ".join(f"{k}: {_short(old.get(k))}, now {_short(new.get(k))}" for k in keys[:4])
        return f"it was written with other settings ({changes}{'; ...' if len(keys) > 4 else ''})"
    return None


def _short(value: Any) -> str:
    text = "not recorded" if value is None else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def remove_files(*paths: Path) -> None:
    for p in paths:
        if p.exists() or p.is_symlink():
            p.unlink()


def from_stdin(state: dict) -> bool:
    return (state.get("input") or {}).get("sha256") is None


def remove_unresumable(paths: dict[str, Path], why: str) -> None:
    """Remove the partial output, rejects and state of a run that can never be continued, saying why."""
    remove_journals(paths)
    there = [p for p in (paths["partial"], paths["rejects_partial"], paths["state"]) if p.exists() or p.is_symlink()]
    if there:
        remove_files(*there)
        log.warning(f"{paths['output']}: {why}; removed {', '.join(p.name for p in there)}")


