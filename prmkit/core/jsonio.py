"""Every JSON file and line prmkit writes goes through here, so none of it is invalid JSON; and every JSON text it
reads that it did not write (:func:`loads`), so none of it can nest deep enough to exhaust the stack.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, and with ``ensure_ascii=False`` a string holding a lone
surrogate (from a ``"\\ud800"`` escape, or a file name that is not UTF-8) produces text that cannot be encoded as
UTF-8. Summaries and metadata turn a non-finite number into ``null`` (an undefined metric); a user's record is written
exactly as it was read or not at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_DEPTH = 100
"""Arrays and objects nested deeper than this are refused when read. Python's decoder recurses once per level (about
990 levels exhaust the interpreter's stack, even inside one string field's siblings), and so does everything that walks
a record after it; no PRM row nests more than a handful."""

_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings, skipped whole, and brackets


class NestingError(json.JSONDecodeError):
    """A JSON text nested deeper than :data:`MAX_DEPTH`: what every ``except json.JSONDecodeError`` already catches."""


def loads(text: str | bytes | bytearray, *, nesting: bool = True) -> Any:
    """``json.loads`` for text prmkit did not write (input rows, model and run files): deep nesting is a
    :class:`NestingError` (a ``json.JSONDecodeError``, so a ``ValueError``), never a ``RecursionError``.

    ``nesting=False`` refuses only what the decoder cannot read, for a file of rows that are checked one by one
    (:func:`nested_too_deep`).
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # a UnicodeDecodeError is a ValueError too, as json.loads raises
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(text) from None
    if nesting and text_too_deep(text):
        raise _too_deep(text)
    return value


def text_too_deep(text: str) -> bool:
    """Whether a JSON text nests more than :data:`MAX_DEPTH` arrays/objects deep anywhere."""
    # Fewer brackets than the limit cannot nest past it: one count in C, and no walk, for nearly every text.
    return text.count("[") + text.count("{") > MAX_DEPTH and first_too_deep(text) is not None


def nested_too_deep(value: Any) -> bool:
    """Whether a parsed value nests more than :data:`MAX_DEPTH` arrays/objects deep (walked without recursing)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def first_too_deep(text: str) -> int | None:
    """The index of the first bracket that opens level ``MAX_DEPTH + 1``, or None."""
    depth = 0
    for found in _NESTING.finditer(text):
        c = found.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return found.start()
        elif c in "]}":
            depth -= 1
    return None


def _too_deep(text: str) -> NestingError:
    at = first_too_deep(text)
    return NestingError(f"nested more than {MAX_DEPTH} arrays/objects deep", text, at if at is not None else 0)


def as_object(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else ``{}``: an optional section of a record prmkit wrote (an older
    version, or a damaged file, may hold something else or nothing there)."""
    return value if isinstance(value, dict) else {}


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None, numpy values as Python ones and paths as strings."""
    if isinstance(obj, Mapping):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return finite(obj.tolist())  # numpy scalar or array
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _encodable(obj: Any, **kwargs: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: \\u escapes keep it, and the text reads back to the same string.
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, **kwargs)
    return text


def dumps(obj: Any, indent: int | None = None) -> str:
    """Metadata, state and summaries: non-finite numbers become null; anything else unknown becomes its str()."""
    return _encodable(finite(obj), indent=indent, default=str)


def dumps_record(obj: Any) -> str:
    """One user record as a JSON line's text (no newline), unchanged. Raises ValueError on a non-finite number:
    check records with :func:`nonfinite_field` before doing work for them."""
    return _encodable(obj, default=str)


def nonfinite_field(obj: Any, path: str = "") -> str | None:
    """The path (``a.b[2]``) of the first NaN or infinite number in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "value")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = nonfinite_field(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = nonfinite_field(value, f"{path}[{i}]")
            if found:
                return found
    return None
