"""Where a model, tokenizer or dataset name points: a local path or a Hub repository, decided at once.

transformers and datasets try the Hub for any name that is not an existing path, and retry an unreachable Hub for
a minute and more before saying "couldn't connect": a mistyped local path then looks like a network failure.
:func:`locate` answers first, in well under a second:

- an existing path is used as it is;
- a name that can only be a path (absolute, starting with ``.`` or ``~``, a backslash, more than one ``/``, or not a
  valid Hub id) and does not exist is refused at once, with the absolute path that was looked for;
- a name that could be either (``runs/prm`` is a valid ``namespace/name``) is looked up on the Hub once, without
  retries, and refused naming both places when it is in neither (or when the Hub cannot be reached and its cache has
  no copy). With ``HF_HUB_OFFLINE`` set, the Hub cache alone decides, for models and tokenizers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prmkit.errors import UsageError, named_first_line

log = logging.getLogger("prmkit")

_FOUND: set[tuple[str, str, str | None]] = set()


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path, never a Hub repository id."""
    if not name.strip():
        return True
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.endswith("/"):
        return True
    if os.altsep and os.altsep in name and os.altsep != "/":
        return True
    if name.count("/") > 1:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def locate(name: str, what: str, repo_type: str = "model", revision: str | None = None) -> str:
    """``name`` when it exists locally or on the Hub; otherwise a :class:`UsageError` saying where it was looked for.

    ``what`` names the thing in the message ("model", "tokenizer", "dataset"); ``repo_type`` is the Hub's
    ("model" or "dataset"). Returns the name unchanged (an existing local path with ``~`` expanded).
    """
    local = Path(name).expanduser()
    if local.exists():
        return str(local) if name.startswith("~") else name
    key = (name, repo_type, revision)
    if key in _FOUND:  # the CLI and the library may both ask; the Hub is asked once
        return name
    where = local.resolve()
    if looks_like_path(name):
        raise UsageError(
            f"{what} {name!r}: no such file or directory ({where})",
            hint="check the path; a Hub id has the form namespace/name",
        )
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        if repo_type == "dataset" or _in_hub_cache(name, repo_type):
            return name  # datasets keeps its own offline cache as well; let it look there
        raise UsageError(
            f"{what} {name!r}: no local path {where}, and HF_HUB_OFFLINE is set and the Hub cache has "
            f"no copy of {name}",
            hint="check the path, or unset HF_HUB_OFFLINE to download it",
        )
    found, problem = _on_hub(name, repo_type, revision)
    if found:
        _FOUND.add(key)
        return name
    endpoint = constants.ENDPOINT
    if problem is None:
        raise UsageError(
            f"{what} {name!r}: tried both a local path and the Hub: no {where}, and {endpoint} has no "
            f"{repo_type} repository {name!r} (or it is private)",
            hint=f"check the spelling; writing a local path as ./{name} skips the Hub",
        )
    if _in_hub_cache(name, repo_type):
        log.warning(f"{what} {name!r}: the Hub is unreachable ({problem}); using the copy in the Hub cache")
        return name
    raise UsageError(
        f"{what} {name!r}: tried both a local path and the Hub: no {where}, and {endpoint} could not be "
        f"reached ({problem})",
        hint="check the path; for a Hub repository check the network (HF_ENDPOINT, proxy), or set "
        "HF_HUB_OFFLINE=1 to use the Hub cache",
    )


def _on_hub(name: str, repo_type: str, revision: str | None) -> tuple[bool, str | None]:
    """(exists, problem): one request, no retries. ``problem`` says why the Hub could not answer, if it could not."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().repo_info(name, repo_type=repo_type, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        return True, None  # it exists; loading it says what access it needs
    except RepositoryNotFoundError:
        return False, None
    except HfHubHTTPError:
        return True, None  # the Hub answered something else (a server error, a rate limit): let the loader say more
    except Exception as e:  # connection refused, DNS, timeouts, proxies: many types, one meaning here
        return False, named_first_line(e)
    return True, None


def _in_hub_cache(name: str, repo_type: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type=repo_type) / "snapshots").is_dir()
