"""Every JSON file and line prmkit writes goes through here, so none of it is invalid JSON.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, and with ``ensure_ascii=False`` a string holding a lone
surrogate (from a ``"\\ud800"`` escape, or a file name that is not UTF-8) produces text that cannot be encoded as
UTF-8. Summaries and metadata turn a non-finite number into ``null`` (an undefined metric); a user's record is written
exactly as it was read or not at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
