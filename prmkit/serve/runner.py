"""Run the app under uvicorn, with prmkit's drain on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once (a new request is refused, not answered) and then
raises the signal again once it is done, so the process ends by the signal, not with exit status 0. Here the first
SIGTERM or SIGINT starts a drain: new requests get 503 with Retry-After, the ones in flight finish, and the process
exits 0 within ``serve.drain_s``. A second signal stops at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("prmkit")

SHUTDOWN_MARGIN_S = 1.5
"""What uvicorn's shutdown and the batcher's stop may take after the drain, so the whole stays within drain_s."""


def run(app: Any, host: str, port: int, drain_s: float) -> int:
    """Serve ``app`` until a signal (or a failed model load); the process's exit status."""
    import uvicorn

    state = app.state.prmkit

    class Server(uvicorn.Server):
        drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded in _captured_signals: uvicorn would raise it again on the way out, and exit by it.
            if self.drain_deadline is not None or state.status != "ready":
                self.should_exit = True
                if self.drain_deadline is not None:
                    self.force_exit = True
                return
            state.draining = True
            self.drain_deadline = time.monotonic() + max(0.0, drain_s - SHUTDOWN_MARGIN_S)
            log.info(f"draining: {state.busy} request(s) in flight, up to {drain_s:g} s; new requests get 503")

        async def on_tick(self, counter: int) -> bool:
            deadline = self.drain_deadline
            if deadline is not None and not self.should_exit and (state.busy == 0 or time.monotonic() >= deadline):
                if state.busy:
                    log.warning(f"drain time is up: {state.busy} request(s) still in flight are cancelled")
                self.should_exit = True
            return await super().on_tick(counter)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    name = sock.getsockname()
                    log.info(
                        f"listening on http://{_url_host(name[0])}:{name[1]} (GET /health is 200 once the model "
                        "is loaded; /docs shows the API)"
                    )

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
        server_header=False,
    )
    server = Server(config)

    def fatal(error: BaseException) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    if state.status == "failed":
        return 1
    return 0 if server.started or state.draining else 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
