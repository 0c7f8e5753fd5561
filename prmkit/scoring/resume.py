"""What lets a killed `prmkit score` resume to the same bytes: the output's companion files, the state committed at
window ends, and the journal of each forward batch of the window in progress (:class:`BatchJournal`).

All three are checked before a run continues from them, since a resumed run builds on them blindly:

- the state file carries the sha256 of its own content, so an edited state (a status, a line number, a byte count)
  is refused rather than believed;
- the state records the sha256 of the committed prefix of the partial output and of the rejects (kept as a running
  hash while they are written, :class:`HashedFile`), so a changed partial is refused rather than continued;
- every journal record carries the sha256 of its batch's scores (bound to the journal's header); a record that fails
  it, and everything after it, is scored again.

The input itself is identified by the sha256 of its whole content (the job identity in the state), and the state's
digest binds the line and byte offset a run continues from to it. These are checks against accidents and hand edits,
not against someone who recomputes the digests: there is no secret to sign with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.core.atomic import write_atomic
from prmkit.core.jsonio import as_object, dumps
from prmkit.core.redact import redact
from prmkit.errors import UsageError

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
        # Each record's digest covers the header too, so a record is only ever valid in the journal it was written to.
        self._salt = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode()).hexdigest()
        self.done = self._read()
        if self.done:
            log.info(f"reusing {len(self.done)} batches scored before the interruption ({path.name})")

    def _read(self) -> dict[int, tuple[str, list[float]]]:
        done: dict[int, tuple[str, list[float]]] = {}
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - a missing journal is no error; closed below
        except FileNotFoundError:
            return done
        with fh:
            head = fh.readline()
            if not head.endswith(b"\n") or _loads(head) != self.header:
                return done  # another window's journal (or a torn header): nothing to reuse
            size = len(head)
            for number, raw in enumerate(fh, start=2):
                if not raw.endswith(b"\n"):
                    break  # a line cut short by the kill: that batch is scored again
                entry = self._checked(raw)
                if entry is None:
                    # A whole line that is not what record() wrote: it, and anything after it, is scored again.
                    log.warning(
                        f"{self.path}: line {number} was changed outside prmkit (it fails its checksum); "
                        f"scoring the batches from there again"
                    )
                    break
                done[entry[0]] = (entry[1], entry[2])
                size += len(raw)
        self._valid_bytes = size
        return done

    def _checked(self, raw: bytes) -> tuple[int, str, list[float]] | None:
        """(batch, targets digest, scores) of a journal line that is exactly what :meth:`record` wrote, else None."""
        entry = _loads(raw)
        if not isinstance(entry, dict):
            return None
        index, targets, scores = entry.get("batch"), entry.get("targets"), entry.get("scores")
        if not (
            type(index) is int
            and isinstance(targets, str)
            and isinstance(scores, list)
            and all(type(x) is float and (0.0 <= x <= 1.0 or x != x) for x in scores)
        ):
            return None  # scores are probabilities (NaN included: the engine names it after the batch)
        if entry.get("sha256") != self._digest(index, targets, json.dumps(scores)):
            return None
        return index, targets, scores

    def _digest(self, index: int, targets: str, scores_json: str) -> str:
        return hashlib.sha256(f"{self._salt} {index} {targets} {scores_json}".encode()).hexdigest()

    def replay(self, index: int, targets: list[tuple[int, int, int]]) -> list[float] | None:
        entry = self.done.get(index)
        if entry is None or entry[0] != _targets_digest(targets) or len(entry[1]) != len(targets):
            return None
        self.replayed += 1
        return list(entry[1])

    def record(self, index: int, targets: list[tuple[int, int, int]], scores: list[float]) -> None:
        if self._fh is None:
            if self._valid_bytes:
                self._fh = open(self.path, "r+b")  # noqa: SIM115 - held across batches, closed by close()
                self._fh.truncate(self._valid_bytes)
                self._fh.seek(0, os.SEEK_END)
            else:
                self._fh = open(self.path, "wb")  # noqa: SIM115 - held across batches, closed by close()
                self._fh.write((json.dumps(self.header) + "\n").encode("utf-8"))
        digest, scores_json = _targets_digest(targets), json.dumps(scores)
        # json.dumps of {"batch", "targets", "scores", "sha256"}, spelled out so the scores are serialized once.
        self._fh.write(
            (
                f'{{"batch": {index}, "targets": "{digest}", "scores": {scores_json}, '
                f'"sha256": "{self._digest(index, digest, scores_json)}"}}\n'
            ).encode()
        )
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
        return jsonio.loads(raw)
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


START_OVER = "pass --overwrite to score from the start"
DIGEST = "sha256"


def write_state(path: Path, state: dict) -> None:
    """Write the state with the sha256 of its own content (as it will read back), so an edit to it is detected."""
    data = json.loads(dumps(redact(state)))
    data.pop(DIGEST, None)
    data[DIGEST] = _state_digest(data)
    write_atomic(path, dumps(data, indent=2) + "\n")
    fsync_dir(path.parent)


def _state_digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != DIGEST}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()


def read_state(path: Path) -> dict | None:
    """The state file's content, or None when there is none. Raises UsageError when it cannot be read or does not match
    its own digest. A state without a digest was written before prmkit checked them (see :func:`check_state`)."""
    if not path.is_file():
        return None
    try:
        state = jsonio.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UsageError(f"{path}: unreadable state file", hint=START_OVER) from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: not a scoring state (a JSON object was expected)", hint=START_OVER)
    if DIGEST in state and state[DIGEST] != _state_digest(state):
        raise UsageError(
            f"{path}: changed outside prmkit (its content does not match the sha256 it was written with)",
            hint=START_OVER,
        )
    return state


def check_state(paths: dict[str, Path], state: dict) -> dict[str, Any]:
    """The state's progress, checked: counts and offsets of the right types, and (for a state that has them) digests.

    A state written before prmkit recorded digests cannot vouch for the partial output it describes, so continuing one
    is refused (the output it would give could not be trusted); one that is complete and already renamed is left as
    it is, since nothing more is written.
    """
    where = paths["state"]
    progress = state.get("progress", {})
    if not isinstance(progress, dict):
        raise UsageError(f"{where}: progress: expected an object, got {_short(progress)}", hint=START_OVER)
    for key in ("input_line", "output_bytes", "rejects_bytes"):
        _whole(where, key, progress.get(key, 0))
    if progress.get("input_offset") is not None:
        _whole(where, "input_offset", progress["input_offset"])
    counts = progress.get("counts", {})
    if not isinstance(counts, dict):
        raise UsageError(f"{where}: progress.counts: expected an object, got {_short(counts)}", hint=START_OVER)
    for key, value in counts.items():
        _whole(where, f"counts.{key}", value)
    if DIGEST not in state:
        renamed = state.get("status") == "complete" and paths["output"].exists() and not paths["partial"].exists()
        if not renamed:
            raise UsageError(
                f"{where}: written by a prmkit that did not record checksums, so {paths['partial'].name} "
                "cannot be checked before it is used",
                hint=f"{START_OVER}, or finish it with the prmkit version that started it",
            )
    else:
        for key in ("output_sha256", "rejects_sha256"):
            if not (isinstance(progress.get(key), str) and len(progress[key]) == 64):
                raise UsageError(f"{where}: progress.{key}: missing", hint=START_OVER)
    return progress


def _whole(where: Path, key: str, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise UsageError(f"{where}: progress.{key}: expected a whole number >= 0, got {_short(value)}", hint=START_OVER)


def verified_prefix(
    path: Path, nbytes: int, digest: str, state_path: Path, whole: bool = False, must_exist: bool = False
) -> Any:
    """The running sha256 of ``path``'s first ``nbytes`` bytes, after checking it against ``digest`` (and, with
    ``whole``, that the file holds nothing more). Raises UsageError naming the file on any difference, or when it is
    missing (unless nothing of it was committed and it need not exist).

    Reading the committed prefix once per resumed run is the whole cost: the returned hash goes on as the file grows.
    """
    sha = hashlib.sha256()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - a missing file is handled apart; closed below
    except FileNotFoundError:
        if nbytes == 0 and not must_exist:
            return sha
        raise UsageError(
            f"{path}: missing, though {state_path.name} records {nbytes} bytes of it", hint=START_OVER
        ) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < nbytes or (whole and size != nbytes):
            raise UsageError(
                f"{path}: {size} bytes where {state_path.name} records {nbytes}; it was changed outside prmkit",
                hint=START_OVER,
            )
        left = nbytes
        while left:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            sha.update(block)
            left -= len(block)
    if sha.hexdigest() != digest:
        raise UsageError(
            f"{path}: its first {nbytes} bytes differ from what {state_path.name} records (sha256); it was "
            "changed outside prmkit",
            hint=START_OVER,
        )
    return sha


class HashedFile:
    """A binary output file written at its end, with a running sha256 of everything in it from byte 0.

    The state records the digest of the committed prefix at every commit; keeping the hash as bytes are written makes
    that digest free, where hashing the file at each commit would read it again and again.
    """

    def __init__(self, fh: Any, sha: Any = None):
        """``fh``: a binary file positioned at its end; ``sha``: the running hash of what it holds (None: it is
        empty)."""
        self._fh = fh
        self.sha = sha if sha is not None else hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()  # hashlib's digest does not end the hash: updates go on after it

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()


def describe_mismatch(state: dict, job: dict) -> str | None:
    if state.get("input") != job["input"]:
        was = state.get("input_spec")
        return f"it was written for another input ({was!r}, or that file has changed since)"
    # A state written before its digest could hold something else in these sections.
    old_model, new_model = as_object(state.get("model")), job["model"]
    same_model = (
        old_model.get("sha256") == new_model.get("sha256")
        if "sha256" in old_model and "sha256" in new_model
        else old_model == new_model
    )  # a local directory may move; its content decides
    if not same_model:
        return f"it was written by another model ({old_model.get('name')!r}, or its files have changed)"
    if state.get("settings") != job["settings"]:
        old, new = as_object(state.get("settings")), job["settings"]
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
    recorded = state.get("input")
    return isinstance(recorded, dict) and recorded.get("sha256") is None


def remove_unresumable(paths: dict[str, Path], why: str) -> None:
    """Remove the partial output, rejects and state of a run that can never be continued, saying why."""
    remove_journals(paths)
    there = [p for p in (paths["partial"], paths["rejects_partial"], paths["state"]) if p.exists() or p.is_symlink()]
    if there:
        remove_files(*there)
        log.warning(f"{paths['output']}: {why}; removed {', '.join(p.name for p in there)}")
