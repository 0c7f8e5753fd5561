"""`datasets`' split syntax on local sources: ``data/rows.jsonl[:300]``, ``saved_dir:test[:10%]``.

Parsed by `datasets`' own ``ReadInstruction`` so a local slice and a Hub slice mean the same rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prmkit.errors import DataError

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


FILE_SPLIT = "train"


@dataclass(frozen=True)
class LocalPart:
    """A local path with the split and rows asked for: ``instruction`` is a `datasets` split spec (``train[:300]``)."""

    path: str
    split: str | None
    instruction: str


def local_part(spec: str, local_suffixes) -> LocalPart | None:
    """``PATH[slice]``, ``PATH:SPLIT`` or ``PATH:SPLIT[slice]`` (``+``-joined as `datasets` allows) when PATH is
    local, else None (a Hub id, or a path without split syntax).

    An existing PATH wins; failing that, one that can only be a file (a data suffix, or starting with ``.``, ``/``
    or ``~``): a missing local file with a slice is then "not found", never a Hub lookup.
    """
    cuts = [i for i, ch in enumerate(spec) if ch in ":[" and i > 0]
    for test in (_exists, lambda base: _file_like(base, local_suffixes)):
        for i in cuts:
            base, rest = spec[:i], spec[i:]
            if not test(base):
                continue
            if rest.startswith("["):
                return LocalPart(base, None, FILE_SPLIT + rest)
            splits = {piece.split("[", 1)[0] for piece in rest[1:].split("+")}
            if len(splits) == 1 and _SPLIT_NAME.match(next(iter(splits))):
                return LocalPart(base, next(iter(splits)), rest[1:])
    return None


def _exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _file_like(path: str, local_suffixes) -> bool:
    return Path(path).suffix.lower() in local_suffixes or path.startswith((".", "/", "~"))


def check_instruction(spec: str, instruction: str) -> None:
    """Refuse a slice `datasets` would not read, in one line naming it."""
    from datasets import ReadInstruction

    try:
        ReadInstruction.from_spec(instruction)
    except (ValueError, AssertionError) as e:
        raise DataError(
            f"{spec}: cannot read the split {instruction!r} ({e})",
            hint="slices look like [:300], [10%:20%] or [-100:]; a saved dataset's split: DIR:test[:10%]",
        ) from None


def row_ranges(spec: str, instruction: str, total: int) -> list[tuple[int, int]]:
    """The 0-based ``[start, stop)`` row ranges ``instruction`` selects from ``total`` rows, as `datasets` computes
    them."""
    from datasets import ReadInstruction

    ri = ReadInstruction.from_spec(instruction)
    split = instruction.split("[", 1)[0]
    try:
        return [(a.from_, a.to) for a in ri.to_absolute({split: total})]
    except (ValueError, AssertionError) as e:
        raise DataError(f"{spec}: {e}") from None
