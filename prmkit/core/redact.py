"""Secrets out of everything prmkit writes or prints: tokens, passwords, credentials inside URLs.

Two kinds of masking, used together:

- ``redact(obj)``: a copy of a config or metadata structure in which the value of every secret-named key
  (``hub_token``, ``password``, ``api_key``, ``client_secret``, ...) is replaced, and every string is passed through
  ``mask(text)``. Every file prmkit saves (prmkit_config.yaml, prmkit.json, prmkit_dataset.json, report.json, score
  state, the model card) goes through it.
- ``mask(text)``: credentials inside URLs (``https://user:pass@host``, ``?token=...``), strings shaped like Hub or
  GitHub tokens, ``Bearer ...`` headers, and every secret value seen so far in this process (the token in use, from
  ``--token``, ``HF_TOKEN``, the stored login, or a secret-named config key). The CLI's output, its logs and its
  tracebacks go through it.

Numbers, booleans and null under a secret-named key are kept: ``batch_tokens: 2048`` is a count, not a credential,
and ``use_auth_token: true`` says nothing secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

# A key names a secret when any of these occurs in it, case-insensitively ("token" but not "tokenizer", "auth" but not
# "author").
_SECRET_KEY = re.compile(
    r"token(?!i[sz])|passw|passphrase|secret|credential|api[_-]?key|private[_-]?key|"
    r"access[_-]?key|auth(?!or)|cookie|signature",
    re.I,
)
# Keys that contain "token" and name vocabulary items, never a credential: a tokenizer's special tokens, token ids,
# and plurals (reward_tokens: ["+", "-"], tokens_per_second). A credential is one value under a singular name.
_NOT_SECRET_KEY = re.compile(
    r"^(pad|bos|eos|unk|sep|cls|mask)_token$|special_tokens?|tokens?_ids?$|token_type|"
    r"tokens(_|$)",
    re.I,
)
# Query parameters that carry credentials beyond the secret key names: signed-URL signatures and keys.
_SECRET_PARAMS = {
    "sig",
    "key",
    "code",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
}
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^\s/@?#]+)@", re.I)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^\s=&#?;]+)=(?P<value>[^\s&#;\"'<>]*)")
# Shapes of tokens worth masking wherever they appear: Hugging Face user and organisation tokens, GitHub tokens,
# AWS access key ids, and bearer headers.
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16})\b|(?<=Bearer )[^\s\"',]+"
)
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")
# Shorter values would mask ordinary words ("no", "test") wherever they appear.
_MIN_SECRET_LEN = 6

_known: set[str] = set()


def is_secret_key(name: Any) -> bool:
    """Whether a config or metadata key names a credential (``hub_token``, ``db_password``, ``client_secret``...)."""
    if not isinstance(name, str):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return bool(_SECRET_KEY.search(leaf)) and not _NOT_SECRET_KEY.search(leaf)


def register_secret(value: Any) -> None:
    """Remember a secret value, so that ``mask`` hides it wherever it turns up later (errors, tracebacks, files)."""
    if isinstance(value, str) and len(value.strip()) >= _MIN_SECRET_LEN:
        _known.add(value.strip())


def known_secrets() -> set[str]:
    """The secret values this process knows: registered ones and the Hub token variables of the environment."""
    found = set(_known)
    for var in _TOKEN_ENV:
        value = os.environ.get(var, "").strip()
        if len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    return found


def _mask_userinfo(m: re.Match) -> str:
    return f"{m.group('scheme')}{MASK}@"


def _mask_param(m: re.Match) -> str:
    name = m.group("name")
    if m.group("value") and (is_secret_key(name) or name.lower() in _SECRET_PARAMS):
        return f"{m.group('sep')}{name}={MASK}"
    return m.group(0)


def mask(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, token-shaped strings and every known secret (plus ``extra``) replaced."""
    if not isinstance(text, str) or not text:
        return text
    for secret in sorted(
        {*known_secrets(), *(e for e in extra if e and len(e) >= _MIN_SECRET_LEN)}, key=len, reverse=True
    ):
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_param, text)
    return _TOKEN_SHAPES.sub(MASK, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) safe to save: secret-named keys masked, every string ``mask``-ed.

    Secret values found on the way are registered, so later messages mask them too.
    """
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            # Keys are masked too: a report keys its models by name, and a name may be a URL with credentials.
            name = mask(key) if isinstance(key, str) else key
            if is_secret_key(key) and _is_secret_value(value):
                _register_all(value)
                out[name] = _masked_value(value)
            else:
                out[name] = redact(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask(obj)
    return obj


def collect_secrets(obj: Any) -> None:
    """Register the values of every secret-named key in ``obj`` (a config as loaded), so output masks them."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if is_secret_key(key) and _is_secret_value(value):
                _register_all(value)
            else:
                collect_secrets(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            collect_secrets(value)


def _is_secret_value(value: Any) -> bool:
    # A count, a flag or null under a secret-sounding key gives nothing away; a string or a structure might.
    return not (value is None or isinstance(value, (bool, int, float)))


def _masked_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked_value(v) for v in value]
    return MASK if _is_secret_value(value) and value != "" else value


def _register_all(value: Any) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _register_all(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _register_all(v)
    else:
        register_secret(value if isinstance(value, str) else None)
