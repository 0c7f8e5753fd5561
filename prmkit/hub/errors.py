"""Hub and network failures as one-line PrmkitErrors; the token never appears in any of them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from prmkit.errors import PrmkitError, UsageError


def resolve_token(token: str | None = None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PrmkitError("not logged in to the Hugging Face Hub",
                          hint="run `hf auth login`, or set HF_TOKEN to a token with write access")
    return found


def hub_error(exc: BaseException, repo_id: str | None = None, token: str | None = None,
              revision: str | None = None) -> PrmkitError | None:
    """The one-line PrmkitError for a huggingface_hub or network failure; None for anything else (a bug)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    repo = repo_id or "the repo"
    err: PrmkitError | None = None
    if isinstance(exc, LocalTokenNotFoundError):
        err = PrmkitError("not logged in to the Hugging Face Hub",
                          hint="run `hf auth login`, or set HF_TOKEN to a token with write access")
    elif isinstance(exc, OfflineModeIsEnabled):
        err = PrmkitError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        server = " ".join(str(exc.server_message or "").split()).rstrip(".")
        said = f": {server}" if server else ""
        if status == 401 and not isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError("the Hub rejected the token (401 Unauthorized): it is invalid, expired or revoked",
                              hint="create a token with write access at https://huggingface.co/settings/tokens, "
                                   "then `hf auth login` or set HF_TOKEN")
        elif isinstance(exc, RevisionNotFoundError):
            err = PrmkitError(f"{repo}: branch {revision!r} not found",
                              hint="create it on the Hub, or push without --revision" if revision else None)
        elif isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError(f"{repo}: repository not found, or this token cannot see it")
        elif status == 403:
            err = PrmkitError(f"no write access to {repo} (403 Forbidden){said}",
                              hint="use a token with write permission for this namespace (a fine-grained token needs "
                                   "'write' on the repo or organisation)")
        elif status == 409:
            err = PrmkitError(f"{repo} exists but this token cannot see it (409 Conflict){said}")
        elif status == 429:
            err = PrmkitError(f"the Hub rate-limited this request (429){said}", hint="wait a minute and push again")
        elif status is not None and status >= 500:
            err = PrmkitError(f"the Hub failed ({status}){said}", hint="try again later")
        else:
            err = PrmkitError(f"the Hub refused the request ({status}){said}")
    elif type(exc).__name__ == "HFValidationError":
        err = UsageError(f"invalid repo id or revision: {first_line(exc)}")
    elif isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        # The Hub validates the card's YAML before any upload; only a user's own README.md can fail it.
        detail = " ".join(str(exc).split("README.md.", 1)[-1].split())
        err = PrmkitError(f"the Hub rejects README.md's metadata: {detail}",
                          hint="fix the YAML front matter, or pass --overwrite-card to push a generated card")
    elif _is_network_error(exc):
        err = PrmkitError(f"cannot reach the Hub at {constants.ENDPOINT}: {first_line(exc)}",
                          hint="check the network connection, proxy settings and HF_ENDPOINT")
    if err is not None and token:
        err.message = err.message.replace(token, "***")
    return err


def _is_network_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"}) or isinstance(
        exc, (ConnectionError, TimeoutError))


@contextlib.contextmanager
def hub_errors(repo_id: str, token: str | None, revision: str | None) -> Iterator[None]:
    try:
        yield
    except PrmkitError:
        raise
    except Exception as exc:
        err = hub_error(exc, repo_id, token, revision)
        if err is None:
            raise
        raise err from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
