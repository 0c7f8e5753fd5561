"""Hub and network failures as one-line PrmkitErrors; the token never appears in any of them."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from prmkit.core.redact import mask, register_secret
from prmkit.errors import PrmkitError, UsageError, first_line


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else the login huggingface_hub finds; remembered so output masks it."""
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise PrmkitError(
            "not logged in to the Hugging Face Hub",
            hint="run `hf auth login`, or set HF_TOKEN to a token with write access",
        )
    register_secret(token)
    return token


def hub_error(
    exc: BaseException, repo_id: str | None = None, token: str | None = None, revision: str | None = None
) -> PrmkitError | None:
    """The one-line PrmkitError for a huggingface_hub or network failure; None for anything else (a bug)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = repo_id or "the repo"
    err: PrmkitError | None = None
    if isinstance(exc, LocalTokenNotFoundError):
        err = PrmkitError(
            "not logged in to the Hugging Face Hub",
            hint="run `hf auth login`, or set HF_TOKEN to a token with write access",
        )
    elif isinstance(exc, OfflineModeIsEnabled):
        err = PrmkitError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE to push")
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        server = " ".join(str(exc.server_message or "").split()).rstrip(".")
        said = f": {server}" if server else ""
        if status == 401 and not isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError(
                "the Hub rejected the token (401 Unauthorized): it is invalid, expired or revoked",
                hint="create a token with write access at https://huggingface.co/settings/tokens, "
                "then `hf auth login` or set HF_TOKEN",
            )
        elif isinstance(exc, RevisionNotFoundError):
            err = PrmkitError(
                f"{repo}: branch {revision!r} not found",
                hint="create it on the Hub, or push without --revision" if revision else None,
            )
        elif isinstance(exc, RepositoryNotFoundError):
            err = PrmkitError(f"{repo}: repository not found, or this token cannot see it")
        elif status == 403:
            err = PrmkitError(
                f"no write access to {repo} (403 Forbidden){said}",
                hint="use a token with write permission for this namespace (a fine-grained token needs "
                "'write' on the repo or organisation)",
            )
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
        err = PrmkitError(
            f"the Hub rejects README.md's metadata: {detail}",
            hint="fix the YAML front matter, or pass --overwrite-card to push a generated card",
        )
    elif _is_network_error(exc):
        err = PrmkitError(
            f"cannot reach the Hub at {constants.ENDPOINT}: {first_line(exc)}",
            hint="check the network connection, proxy settings and HF_ENDPOINT",
        )
    elif isinstance(exc, json.JSONDecodeError) or (
        isinstance(exc, (KeyError, TypeError, AttributeError)) and _raised_in_huggingface_hub(exc)
    ):
        what = "is not JSON" if isinstance(exc, json.JSONDecodeError) else "is not what the Hub sends"
        err = PrmkitError(
            f"the Hub at {constants.ENDPOINT} sent a response that {what} ({type(exc).__name__}: {first_line(exc)})",
            hint="a proxy, a login page or a wrong HF_ENDPOINT may have answered instead of the Hub; "
            "check HF_ENDPOINT and proxy settings, or try again later",
        )
    if err is None:
        return None
    # The Hub's own words may quote the token back; the message, its args and so any traceback hide it.
    return type(err)(mask(err.message, [token] if token else []), hint=err.hint)


def _raised_in_huggingface_hub(exc: BaseException) -> bool:
    """Whether ``exc`` came from huggingface_hub's own code (reading an answer), not from prmkit's."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and f"{os.sep}huggingface_hub{os.sep}" in last


def _is_network_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"}) or isinstance(
        exc, (ConnectionError, TimeoutError)
    )


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
