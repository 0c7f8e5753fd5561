"""Training checkpoints are complete or recognisably not, and are checked before a run resumes from one.

transformers writes ``checkpoint-N/`` file by file, so a run killed meanwhile leaves a directory that looks like a
checkpoint. prmkit writes :data:`MARKER` into it last, listing every file with its size, after every process has
written its part (see ``StepTrainer._save_checkpoint`` in :mod:`prmkit.training.trainer`). Before resuming, the files
are
checked against the marker, safetensors headers are parsed and torch files must be whole zip archives; the newest
checkpoint that passes is used and newer ones are named with the reason they were skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

from prmkit.core import jsonio
from prmkit.core.atomic import write_atomic
from prmkit.core.jsonio import dumps
from prmkit.errors import PrmkitError, write_failure

MARKER = "prmkit_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
INCOMPLETE_PREFIX = "incomplete-"
"""A checkpoint found incomplete is renamed so: out of the way of transformers (resume, rotation), not deleted."""

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a directory on some file systems
        pass
    finally:
        os.close(fd)


def mark_complete(path: str | Path) -> None:
    """Record ``path`` as a complete checkpoint: flush its files to disk, then write the marker listing them."""
    path = Path(path)
    files: dict[str, int] = {}
    for item in sorted(path.rglob("*")):
        if item.is_file() and item.name != MARKER:
            _fsync(item)
            files[item.relative_to(path).as_posix()] = item.stat().st_size
    write_atomic(path / MARKER, dumps({"format": 1, "files": files}, indent=1) + "\n")
    _fsync(path)


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, unreadable header), or None; reads only its header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"{path.name} is truncated (its header alone needs {8 + n} bytes, it has {size})"
            header = jsonio.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has no valid safetensors header"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} has no valid safetensors header"
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from, in a few words, or None when it is a complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    marker = path / MARKER
    if marker.is_file():
        try:
            recorded = jsonio.loads(marker.read_text(encoding="utf-8"))["files"]
            items = [(str(k), int(v)) for k, v in recorded.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"its {MARKER} is unreadable"
        for rel, size in items:
            item = path / rel
            if not item.is_file():
                return f"{rel} is missing"
            if item.stat().st_size != size:
                return f"{rel} has {item.stat().st_size} bytes, not the {size} it was written with"
    elif not (path / TRAINER_STATE).is_file():
        # transformers writes trainer_state.json last; prmkit's marker comes after it.
        return f"no {TRAINER_STATE} and no completion marker: the run stopped while writing it"
    return _content_problem(path, has_marker=marker.is_file())


def _content_problem(path: Path, has_marker: bool) -> str | None:
    try:
        jsonio.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is not valid JSON"
    weights = False
    for item in sorted(path.rglob("*")):
        if not item.is_file():
            continue
        rel = item.relative_to(path).as_posix()
        if item.suffix == ".safetensors":
            weights = True
            problem = safetensors_problem(item)
            if problem:
                return problem.replace(item.name, rel, 1)
        elif item.suffix in _TORCH_SUFFIXES:
            weights = weights or item.name != "training_args.bin"
            if not zipfile.is_zipfile(item):  # torch.save writes a zip archive; its directory comes last
                return f"{rel} is truncated"
        elif item.name.endswith(".safetensors.index.json"):
            try:
                shards = set(jsonio.loads(item.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return f"{rel} is not valid JSON"
            missing = sorted(s for s in shards if not (item.parent / s).is_file())
            if missing:
                return f"{missing[0]} (listed in {rel}) is missing"
    if not weights and not has_marker:
        return "it holds no model weights"
    return None


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir``, newest (highest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def latest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``output_dir`` (or None), and each newer one skipped with the reason."""
    skipped: list[tuple[Path, str]] = []
    for path in find_checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def set_aside(path: Path) -> Path:
    """Rename an incomplete checkpoint to ``incomplete-checkpoint-N``, so the run can write that step afresh."""
    dest = path.with_name(INCOMPLETE_PREFIX + path.name)
    if dest.exists():  # an earlier failed attempt at the same step
        shutil.rmtree(dest)
    os.replace(path, dest)
    return dest


def save_failure(exc: Exception, what: str, output_dir: Path) -> PrmkitError | None:
    """A failed write of safetensors or torch (a full disk) as one line naming what was being saved, with how to
    go on; None for any other error."""
    why = write_failure(exc)
    if why is None:
        return None
    last, _ = latest_complete_checkpoint(output_dir)
    resume = (
        f"run the same command with --resume: it continues from {last.name}"
        if last
        else "run the same command with --overwrite (no checkpoint is complete)"
    )
    return PrmkitError(f"{what}: {why}", hint=f"free some space (or lower train.save_total_limit), then {resume}")
