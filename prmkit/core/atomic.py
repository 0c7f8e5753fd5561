"""prmkit's own files: written atomically (readers, and a run that crashes half-way, never see a half-written file),
read back with a clear error when one was damaged anyway, and no temporary file left behind for long.

Temporary names are hidden and carry the writing process (``.NAME.PID@HOST.XXXX.tmp``), so the next run can remove
what a killed one left without touching the files of one still running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from prmkit.core import jsonio
from prmkit.errors import UsageError

TEMP_SUFFIX = ".tmp"
OLD_MARK = "old"
""":func:`swap_in` moves a directory aside as ``.NAME.PID@HOST.old.tmp`` (mkdtemp's random part has 8 characters)."""
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary names for ``name`` (pass it with ``TEMP_SUFFIX`` to tempfile)."""
    return f".{name}.{os.getpid()}@{_HOST}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def leftovers(directory: str | Path, name: str) -> list[Path]:
    """Temporary files and directories for ``name`` in ``directory`` whose process (on this machine) has ended."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)@([A-Za-z0-9-]+)\..*{re.escape(TEMP_SUFFIX)}")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and match[2] == _HOST and not _alive(int(match[1])):
            found.append(Path(entry.path))
    return sorted(found)


def remove_leftovers(directory: str | Path, name: str) -> tuple[int, int]:
    """Remove :func:`leftovers`; returns how many went and their bytes. A read-only directory keeps them quietly.

    First, where ``name`` is missing and a killed :func:`swap_in` left the directory it replaced, that one goes back
    (the new one never got in place), so no kill point loses both.
    """
    found = leftovers(directory, name)
    target = Path(directory) / name
    moved_aside = [p for p in found if p.name.endswith(f".{OLD_MARK}{TEMP_SUFFIX}")]
    if moved_aside and not (target.exists() or target.is_symlink()):
        with contextlib.suppress(OSError):
            os.rename(moved_aside[-1], target)
            found.remove(moved_aside[-1])
    count = size = 0
    for path in found:
        try:
            if path.is_dir() and not path.is_symlink():
                size += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
                shutil.rmtree(path)
            else:
                size += path.lstat().st_size
                path.unlink()
            count += 1
        except OSError:
            continue
    return count, size


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_temp_dir(directory: str | Path, name: str) -> Path:
    """A new temporary directory for ``name`` in ``directory``, under a :func:`leftovers` name.

    mkdtemp makes it private (0700); an output built in it and renamed into place is as shareable as anything else
    the user writes, so it gets the mode the umask gives a new directory.
    """
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=TEMP_SUFFIX, dir=directory))
    os.chmod(path, 0o777 & ~_umask())
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the system,
    its C library or the file system cannot, and nothing was done. Other failures raise OSError."""
    global _renameat2
    if sys.platform != "linux":
        return False
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _renameat2 = libc.renameat2  # glibc 2.28 and later
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(a), None, os.fsdecode(b))


def swap_in(new: str | Path, target: str | Path) -> None:
    """Put directory ``new`` (a :func:`make_temp_dir` beside ``target``) in ``target``'s place, then delete the old one.

    Where the system can, both change places in one atomic step. Elsewhere the old one is renamed aside first; a
    kill between that and the second rename leaves ``target`` missing and the old one under a leftover name, which
    :func:`remove_leftovers` puts back. So at every kill point ``target`` is the old directory or the new one, whole.
    """
    new, target = Path(new), Path(target)
    if not (target.exists() or target.is_symlink()):
        os.rename(new, target)
        return
    if exchange(new, target):
        old = new  # the old directory, now under the new one's leftover name
    else:
        old = target.with_name(f"{temp_prefix(target.name)}{OLD_MARK}{TEMP_SUFFIX}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, target)
            raise
    try:
        remove_path(old)
    except OSError:
        pass  # named as a leftover: the next run removes it


def remove_path(path: str | Path) -> None:
    """Remove a file, a link or a directory tree, whichever ``path`` is."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file: OpenSSL's runs at GB/s where the CPU has SHA extensions (blake2b has none)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def manifest(directory: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``directory`` (names in ``exclude`` aside), by relative path."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in exclude:
            files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return files


def check_manifest(directory: str | Path, files: dict[str, dict[str, Any]]) -> str | None:
    """What differs from a :func:`manifest`, or None.

    Sizes are checked first (a truncated or missing file costs nothing to find), then checksums (zeroed or altered
    bytes).
    """
    directory = Path(directory)
    for rel, expected in files.items():
        try:
            size = (directory / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != expected.get("size"):
            return f"{rel} has {size} bytes, but {expected.get('size')} were written"
    for rel, expected in files.items():
        if file_digest(directory / rel) != expected.get("sha256"):
            return f"{rel} does not match the checksum recorded when it was written"
    return None


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, fsync it, and rename it over ``path`` (atomic on one filesystem).

    Temporary files an earlier, killed writer of ``path`` left are removed afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes files private; outputs are as shareable as anything else the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    remove_leftovers(path.parent, path.name)  # what a killed writer of this file left


def read_json(path: str | Path, hint: str | None = None) -> Any:
    """Parse a JSON file; a damaged one is a one-line :class:`UsageError` naming the file, the place and the reason."""
    path = Path(path)
    try:
        return jsonio.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", hint=hint) from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})", hint=hint) from None
