"""What may leave the machine: no secret, and no local path, in anything push uploads.

- prmkit's own metadata (``prmkit.json``, ``prmkit_config.yaml``) and ``adapter_config.json`` go up rewritten when
  they need it: secrets redacted, and local paths made relative to the model directory, or reduced to their file
  names when they lie outside it. The files in the model directory keep the full paths, which score, eval and
  LoRA loading use locally.
- Every other file is scanned, in bounded chunks, for the token in use; one that holds it is refused, by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from prmkit.config.load import load_yaml
from prmkit.core import jsonio
from prmkit.core.redact import MASK, redact, register_secret
from prmkit.errors import UsageError
from prmkit.hub.files import read_text_capped

# Files rewritten on the way up, by how they are parsed.
REWRITTEN_JSON = ("prmkit.json", "adapter_config.json")
REWRITTEN_YAML = ("prmkit_config.yaml",)
# Keys whose values are text to tokenize, never paths, however they look (a separator may well be "/").
_NOT_PATHS = {"tokenization", "step_separator"}
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_SCAN_CHUNK = 1 << 20


def secrets_in_use(token: str | None = None) -> list[str]:
    """The Hub tokens no upload may hold: ``token`` (the one pushing), and the login huggingface_hub would use."""
    from huggingface_hub import get_token

    found = {token, get_token()}
    for value in found:
        register_secret(value)  # so that the redaction of metadata masks them too
    return sorted((v for v in found if v and len(v) >= 6), key=len, reverse=True)


def public_path(value: str, root: Path) -> str:
    """A local path as it may be published: relative to the model directory ``root``, else just its name.

    Hub ids, URLs and plain relative names are returned as they are: they say nothing about this machine.
    """
    text = value.strip()
    if not text or "\n" in text or "://" in text:
        return value
    if _WINDOWS_ABSOLUTE.match(text):
        return PureWindowsPath(text).name or value
    path = Path(text)
    if not (path.is_absolute() or text.startswith("~") or ".." in path.parts):
        return value
    real = (Path.cwd() / path.expanduser()).resolve()
    if real == root:
        return "."
    if real.is_relative_to(root):
        return real.relative_to(root).as_posix()
    return path.name or value


def publishable(obj: Any, root: Path, key: str | None = None) -> Any:
    """``obj`` with every local path made publishable (see ``public_path``) and every secret redacted."""
    return redact(_paths(obj, root, key))


def _paths(obj: Any, root: Path, key: str | None) -> Any:
    if key in _NOT_PATHS:
        return obj
    if isinstance(obj, dict):
        return {k: _paths(v, root, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_paths(v, root, key) for v in obj]
    if isinstance(obj, str):
        return public_path(obj, root)
    return obj


def _changes(old: Any, new: Any, prefix: str = "") -> Iterable[tuple[str, bool]]:
    """(dotted key, whether a secret was redacted) for every value that differs between ``old`` and ``new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            yield from _changes(old[k], new.get(k), f"{prefix}{k}.")
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _changes(a, b, f"{prefix}{i}.")
    elif old != new:
        yield prefix.rstrip("."), MASK in json.dumps(new, ensure_ascii=False, default=str)


def rewrite_for_upload(name: str, path: Path, root: Path) -> tuple[bytes | None, list[str], list[str]]:
    """The bytes to upload instead of ``path`` (None: upload it as it is), keys with paths made public, secret keys.

    A file that does not parse is not rewritten; the scan for the token still covers it.
    """
    try:
        text = read_text_capped(path)
        data = load_yaml(text) if name in REWRITTEN_YAML else jsonio.loads(text)
    except (ValueError, yaml.YAMLError):  # UnicodeDecodeError is a ValueError
        return None, [], []
    if not isinstance(data, dict):
        return None, [], []
    public = publishable(data, root)
    if public == data:
        return None, [], []
    changes = list(_changes(data, public))
    secret = sorted(k for k, is_secret in changes if is_secret)
    paths = sorted(k for k, is_secret in changes if not is_secret)
    if name in REWRITTEN_YAML:
        out = yaml.safe_dump(public, sort_keys=False, allow_unicode=True)
    else:
        out = json.dumps(public, indent=2, ensure_ascii=False) + "\n"
    return out.encode("utf-8"), paths, secret


def holds_secret(path: Path, secrets: list[str], header_only: bool = False) -> bool:
    """Whether the file at ``path`` contains one of ``secrets``; read in 1 MB chunks, never whole.

    ``header_only``: a safetensors file, where only the JSON header (its ``__metadata__``) can hold text.
    """
    if not secrets:
        return False
    needles = [s.encode("utf-8") for s in secrets]
    if header_only:
        from prmkit.models.files import read_safetensors_header

        header = json.dumps(read_safetensors_header(path).get("__metadata__") or {}, ensure_ascii=False).encode()
        return any(n in header for n in needles)
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def refuse_secret_files(names: list[str], model_dir: Path) -> None:
    if names:
        raise UsageError(
            f"{model_dir}: {', '.join(names)} contain{'s' if len(names) == 1 else ''} your Hub token: "
            "refusing to upload",
            hint="remove the token from the file, then push again",
        )
