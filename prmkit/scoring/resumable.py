"""The output side of a `prmkit score` job: the scored lines, the rejects and the commits that make a run resumable.

A file output ``OUT`` is built in ``OUT.partial`` (and ``OUT.rejects.jsonl.partial``) beside a state file
(:mod:`prmkit.scoring.resume`). :meth:`ResumableOutput.open` truncates a partial file to its last commit (a
half-written line goes with it), :meth:`~ResumableOutput.commit` fsyncs both files and then writes the state, and
:meth:`~ResumableOutput.finish` commits the final state and renames the files into place. The output ``-`` is a text
stream: lines go there as they come, and nothing is committed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prmkit.core.jsonio import dumps
from prmkit.core.version import __version__
from prmkit.data.sources import SourceRecord, reject_entry
from prmkit.scoring.resume import HashedFile, fsync_dir, remove_journals, remove_unresumable, write_state
from prmkit.scoring.source import InputSource

log = logging.getLogger("prmkit")


class ResumableOutput:
    """Where process 0 writes a job's lines: a text stream (``paths`` None), or ``OUT.partial`` with its rejects and
    state file, committed window by window.

    ``job`` is the job's identity (:func:`prmkit.scoring.claim.job_identity`), recorded in every state. ``group`` (a
    :class:`prmkit.scoring.groups.GroupWriter`, set by the job) keeps its open group at each commit. ``save_state``
    writes the state file (:func:`prmkit.scoring.resume.write_state`).
    """

    def __init__(
        self,
        paths: dict[str, Path] | None,
        job: dict[str, Any],
        src: InputSource,
        *,
        stream: Any = None,
        on_reject: Callable[[str], None] | None = None,
        save_state: Callable[[Path, dict], None] = write_state,
    ):
        self.paths = paths
        self.job = job
        self.src = src
        self.stream = stream
        self.on_reject = on_reject
        self.save_state = save_state
        self.group: Any = None
        self._out: Any = None
        self._rejects: Any = None

    def open(self, plan: dict[str, Any], hashes: dict[str, Any], counts: Any, fmt_used: str | None) -> None:
        """Start the output fresh, or cut the partial files to what ``plan`` (the state) says was committed."""
        if self.paths is None:
            self._out = self.stream
            return
        paths = self.paths
        if not plan.get("output_bytes") and not plan.get("input_line", 0):
            # The state goes first: a partial file without one would be refused as somebody else's.
            self._out = HashedFile(open(paths["partial"], "wb"))  # noqa: SIM115 - open until close()
            self.commit(0, 0 if self.src.source.kind == "jsonl" else None, counts, fmt_used)
            log.info(
                f"writing {paths['partial']}, renamed to {paths['output'].name} when complete; "
                "if interrupted, run the same command again to resume"
            )
        else:
            self._out = HashedFile(cut(paths["partial"], plan["output_bytes"]), hashes["output"])
        if paths["rejects_partial"].exists():
            self._rejects = HashedFile(cut(paths["rejects_partial"], plan.get("rejects_bytes", 0)), hashes["rejects"])

    def write(self, text: str) -> None:
        self._out.write(text if self.paths is None else text.encode("utf-8"))

    def reject(self, rec: SourceRecord, field_name: str, reason: str) -> None:
        """A bad line: to the rejects file, or (for the output ``-``) to ``on_reject``."""
        if self.paths is None:
            if self.on_reject is not None:
                self.on_reject(f"{self.src.where(rec.number)}: {field_name}: {reason}")
            return
        if self._rejects is None:
            self._rejects = HashedFile(open(self.paths["rejects_partial"], "wb"))  # noqa: SIM115 - open until close()
        entry = reject_entry(self.src.name, self.src.unit, rec, field_name, reason)
        self._rejects.write((dumps(entry) + "\n").encode("utf-8"))

    def commit(self, line: int, offset: int | None, counts: Any, fmt_used: str | None, final: bool = False) -> None:
        """Everything up to input ``line`` (at byte ``offset``) is written: make it durable, then record it."""
        out, rej = self._out, self._rejects
        out.flush()
        if self.paths is None:
            return
        os.fsync(out.fileno())
        if rej is not None:
            rej.flush()
            os.fsync(rej.fileno())
        kept = self.group.keep() if self.group is not None else None
        self.save_state(
            self.paths["state"],
            {
                "prmkit_version": __version__,
                "status": "complete" if final else "running",
                **self.job,
                "format_detected": fmt_used,
                "progress": {
                    "input_line": line,
                    "input_offset": offset,
                    "output_bytes": out.tell(),
                    "output_sha256": out.hexdigest(),
                    "rejects_bytes": rej.tell() if rej is not None else 0,
                    "rejects_sha256": (rej.hexdigest() if rej is not None else hashlib.sha256().hexdigest()),
                    "counts": counts.to_dict(),
                    **({"group": kept} if kept else {}),
                },
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        if self.group is not None:
            self.group.tidy(kept["file"] if kept else None)

    def finish(self, line: int, offset: int | None, counts: Any, fmt_used: str | None) -> None:
        """The last commit, saying complete; then the partial files become ``OUT`` and its rejects."""
        if self.paths is None:
            self._out.flush()
            return
        self.commit(line, offset, counts, fmt_used, final=True)
        self._out.close()
        self._out = None
        if self._rejects is not None:
            self._rejects.close()
            self._rejects = None
        finish_files(self.paths)

    def abandon_stdin(self) -> None:
        """After a failure: a run that read stdin can never be continued, so its partial files and state go."""
        if self.paths is None or not self.src.stdin:
            return
        for fh in (self._out, self._rejects):
            if fh is not None:
                fh.close()
        self._out = self._rejects = None
        remove_unresumable(self.paths, "scoring stdin cannot be resumed (give the input as a file for that)")

    def close(self) -> None:
        """Close the files still open (never the stream: it is the caller's)."""
        if self.paths is not None and self._out is not None:
            self._out.close()
        if self._rejects is not None:
            self._rejects.close()


def cut(path: Path, size: int) -> Any:
    """``path`` opened to append after its first ``size`` bytes (the committed ones; a half-written line goes)."""
    fh = open(path, "r+b")  # noqa: SIM115 - the caller keeps it open
    fh.truncate(size)
    fh.seek(0, os.SEEK_END)
    return fh


def finish_files(paths: dict[str, Path]) -> None:
    # The state already says complete; renaming is idempotent, so a crash in between is finished by the next run.
    if paths["rejects_partial"].exists():
        os.replace(paths["rejects_partial"], paths["rejects"])
    if paths["partial"].exists():
        os.replace(paths["partial"], paths["output"])
    remove_journals(paths)
    fsync_dir(paths["output"].parent)
