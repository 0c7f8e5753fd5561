"""`prmkit serve`: process rewards over HTTP, for RL loops and test-time search (prmkit.serve)."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Annotated

import typer

from prmkit.cli._errors import handle_errors
from prmkit.cli._options import ConfigOpt, DeviceOpt, DtypeOpt, SetOpt, StepSeparatorOpt, unescape
from prmkit.cli._output import Output, attach_logging
from prmkit.config.load import load_config
from prmkit.errors import PrmkitError, UsageError

INSTALL = "pip install 'prmkit[serve]'"
MODEL_HELP = "A prmkit output directory, a transformers model directory, or a Hub id."
PORT_HELP = "Port (serve.port; default 8000; 0 picks a free one)."
KEY_HELP = "Require Authorization: Bearer KEY on every request but /health and /docs (never written anywhere)."
BATCH_HELP = "Token budget of one forward batch (score.batch_tokens)."


@handle_errors
def serve(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (serve.host; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help=PORT_HELP)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="PRMKIT_API_KEY", show_envvar=True, help=KEY_HELP)
    ] = None,
    step_separator: StepSeparatorOpt = None,
    batch_tokens: Annotated[int | None, typer.Option("--batch-tokens", help=BATCH_HELP)] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Serve a PRM's step scores over HTTP, batching concurrent requests into the engine `prmkit score` uses.

    Endpoints: POST /v1/score (prmkit's own), POST /get_reward (OpenRLHF's remote reward model), POST /pooling
    (vLLM's, for qwen-prm and lm-tag models), GET /health, /metrics (Prometheus), /v1/model, /docs.
    SIGTERM drains: requests in flight finish, new ones get 503, and the process exits 0 within serve.drain_s.

    Examples:

      prmkit serve runs/prm

      prmkit serve Qwen/Qwen2.5-Math-PRM-7B --host 0.0.0.0 --port 8000 --api-key "$KEY" --set serve.aggregate=last

      curl -s localhost:8000/v1/score -d '{"items": [{"prompt": "1 + 1?", "steps": ["1 + 1 = 2.", "So 2."]}]}'
    """
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"prmkit serve needs the serve extra ({e.name} is not installed): {INSTALL}") from None
    out = Output()
    attach_logging(out)
    cfg = load_config(
        config,
        set_,
        {
            "serve.host": host,
            "serve.port": port,
            "score.batch_tokens": batch_tokens,
            "score.dtype": dtype,
            "score.device": device,
        },
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("prmkit serve runs as one process", hint="start it without accelerate launch or torchrun")
    settings = cfg.serve
    if settings.step_separator == "":
        raise UsageError("serve.step_separator is empty", hint="leave it null to use the model's")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", hint="give a key, or leave --api-key and PRMKIT_API_KEY unset")
    if api_key:
        from prmkit.core.redact import register_secret

        register_secret(api_key)  # masked wherever it could turn up: logs, errors, tracebacks
    elif not _loopback(settings.host):
        out.warn(
            f"serving on {settings.host} without an API key: anyone who can reach this address can use the "
            "model; set --api-key (or PRMKIT_API_KEY)"
        )
    _check_port(settings.host, settings.port)

    from prmkit.scoring.settings import ScorerSettings
    from prmkit.serve.app import create_app
    from prmkit.serve.runner import run

    separator = unescape(step_separator)

    def load():
        # On the server's loading thread: torch and the model load while /health already answers 503.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return ScorerSettings.from_config(cfg, "score").load(model, step_separator=separator)

    app = create_app(load, settings, threshold=cfg.score.threshold, api_key=api_key or None)
    out.info(f"loading {model} (serve.aggregate {settings.aggregate}, serve.truncated {settings.truncated})")
    code = run(app, settings.host, settings.port, settings.drain_s)
    state = app.state.prmkit
    if state.exception is not None:
        if isinstance(state.exception, PrmkitError):
            raise state.exception
        raise PrmkitError(f"the model failed to load: {state.error}")
    if code:
        raise typer.Exit(code)
    out.info("stopped")


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def _check_port(host: str, port: int) -> None:
    """Refuse a port already taken now, in one line, rather than after the model loads."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise UsageError(
            f"cannot listen on {host}:{port}: {e.strerror or e}",
            hint="choose another --port, or stop what listens there",
        ) from None
