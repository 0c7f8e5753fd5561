"""Guarding what a command writes: no input inside an output, and one run at a time per output.

Both work on resolved paths (symbolic links followed), so a link cannot smuggle an input into the directory a command
is about to replace, nor let two runs write one output under two names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from prmkit.core import jsonio
from prmkit.core.jsonio import dumps
from prmkit.errors import UsageError

try:  # POSIX; elsewhere runs are not locked (and say so once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("prmkit")

LOCK_SUFFIX = ".prmkit-lock"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs inside outputs


def local_path(spec: str | os.PathLike | None) -> Path | None:
    """The local file or directory ``spec`` names, links resolved; None for a Hub id or nothing at all.

    A string names a local path only when it exists (otherwise it may be a Hub id); a ``Path`` always does, so a
    directory a run will create (a cache) counts too.
    """
    if spec is None or str(spec) in ("", "-", "<defaults>"):
        return None
    path = Path(spec).expanduser()
    if not isinstance(spec, Path) and not path.exists():
        return None
    return path.resolve()


def is_within(path: Path, directory: Path) -> bool:
    """Whether resolved ``path`` is ``directory`` or lies somewhere below it."""
    return path == directory or directory in path.parents


def refuse_inputs_inside(
    output: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    why: str,
    output_inside: bool = False,
) -> None:
    """Raise UsageError when an input (``(label, spec)`` pairs) is the output or lies inside it; with
    ``output_inside`` (an output file), when the output is an input or lies inside an input directory instead.

    ``why`` ends the sentence "..., which <why>", e.g. "--overwrite would replace".
    """
    out = Path(output).expanduser().resolve()
    for label, spec in inputs:
        path = local_path(spec)
        if path is None or not (is_within(out, path) if output_inside else is_within(path, out)):
            continue
        where = "is" if path == out else "lies inside"
        if output_inside:
            raise UsageError(
                f"the output {output} {where} the {label} {spec}, which {why}", hint="write the output somewhere else"
            )
        raise UsageError(
            f"{label} {spec} {where} the output {output}, which {why}",
            hint="move the input out of it, or choose another output",
        )


# ---------------------------------------------------------------------------------------------------------------------
# One run per output


class OutputBusy(UsageError):
    """Another live run holds the output's lock."""


class OutputLock:
    """An advisory lock (``flock``) on a file beside ``target``: ``.NAME.prmkit-lock`` in the same directory.

    The kernel drops the lock when its holder exits, however it exits, so a stale lock file (dead PID) never blocks;
    the PID, host and command in the file only name the holder in the refusal. Beside the output rather than inside it,
    the lock outlives the output being replaced and never ends up in a model directory that gets published.
    """

    def __init__(self, target: str | os.PathLike, command: str = "prmkit"):
        target = Path(target).expanduser().resolve()
        self.target = target
        self.command = command
        self.path = target.parent / f".{target.name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False) -> OutputLock:
        """Take the lock, or raise :class:`OutputBusy` naming the holder; with ``wait``, wait for it instead."""
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover - Windows
            log.warning(f"cannot lock {self.target} on this platform; make sure no other run writes there")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputBusy(
                    f"{self.target} is in use by another prmkit run ({holder})",
                    hint="wait for it to finish, or choose another output",
                ) from None
            except OSError as e:  # a file system without locks (some network mounts)
                os.close(fd)
                log.warning(f"cannot lock {self.target} ({e.strerror}); make sure no other run writes there")
                return self
            # A holder that was releasing may have unlinked the file between our open and our lock; then the lock we
            # hold is on a file nobody else will ever open. Lock the file that is there now instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        # The command's name only, never its arguments: a command line can hold a token.
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.write(fd, (dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Unlinked while still held, so nobody can lock this file after us; see the inode check in acquire.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        info = jsonio.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return "PID unknown"
    if not isinstance(info, dict):
        return "PID unknown"
    text = f"{info['command']}, " if info.get("command") else ""
    text += f"PID {info.get('pid')}"
    if info.get("host") and info.get("host") != socket.gethostname():
        text += f" on {info['host']}"
    if info.get("started"):
        text += f", started {info['started']}"
    return text
