"""The FastAPI application of `prmkit serve`: routes, the API-key and drain gate, errors as one-line JSON.

:func:`create_app` takes a ``load`` function that returns the engine; it runs on a thread once the server is up, so
``GET /health`` answers 503 while the model loads and 200 once it is ready. Every scoring request goes through the
:class:`~prmkit.serve.batcher.Batcher`; the endpoints' logic is in :mod:`prmkit.serve.endpoints`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prmkit.core.version import __version__
from prmkit.errors import DataError, PrmkitError, first_line
from prmkit.kinds.registry import DEFAULT_KIND
from prmkit.serve import endpoints
from prmkit.serve.batcher import TIMING, Batcher, QueueFull, ShuttingDown
from prmkit.serve.metrics import Metrics
from prmkit.serve.policy import response_separator
from prmkit.serve.schemas import (
    ErrorResponse,
    ModelInfo,
    PoolingRequest,
    PoolingResponse,
    RequestError,
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
    parse_json,
    request_body,
)

log = logging.getLogger("prmkit")

OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
"""Paths answered without the API key: a load balancer's health check, and the API's documentation."""
LOADING_RETRY_S = 5


class ServeState:
    """Where the server stands (loading, ready, draining, failed), and the loaded service."""

    def __init__(
        self,
        settings: Any,
        threshold: float,
        api_key: str | None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self.settings = settings
        self.threshold = threshold
        self.api_key = api_key
        self.on_fatal = on_fatal
        self.metrics = Metrics()
        self.service: endpoints.Service | None = None
        self.status = "loading"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.draining = False
        self.busy = 0
        """Requests in progress, health checks and metrics aside: what a drain waits for."""
        self.loader: threading.Thread | None = None

    def start_loading(self, load: Callable[[], Any]) -> None:
        self.loader = threading.Thread(target=self._load, args=(load,), name="prmkit-load", daemon=True)
        self.loader.start()

    def _load(self, load: Callable[[], Any]) -> None:
        try:
            scorer = load()
            self.service = build_service(scorer, self.settings, self.threshold, self.metrics)
            self.service.batcher.start()
            self.status = "ready"
            self.metrics.ready.set(1)
            log.info(f"ready: {self.service.name} ({self.service.kind}); steps cut at {self.service.separator!r}")
        except BaseException as e:  # the server cannot serve without its model: it stops
            self.status = "failed"
            self.exception = e
            self.error = e.message if isinstance(e, PrmkitError) else f"{type(e).__name__}: {first_line(e)}"
            if self.on_fatal is not None:
                self.on_fatal(e)

    def ready_service(self) -> endpoints.Service:
        if self.draining:
            raise RequestError(503, "the server is shutting down", {"Retry-After": str(LOADING_RETRY_S)})
        if self.status != "ready" or self.service is None:
            if self.status == "failed":
                raise RequestError(503, f"the model failed to load: {self.error}")
            raise RequestError(503, "the model is loading", {"Retry-After": str(LOADING_RETRY_S)})
        return self.service


def build_service(scorer: Any, settings: Any, threshold: float, metrics: Metrics) -> endpoints.Service:
    """The endpoints' view of a loaded engine under the serve settings."""
    encoder = getattr(scorer, "kind_encoder", None)
    separator, strip = response_separator(scorer, settings.step_separator)
    tokenizer = scorer.tokenizer
    specials = {t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if isinstance(t, str) and t}
    batcher = Batcher(scorer, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, metrics=metrics)
    return endpoints.Service(
        scorer=scorer,
        batcher=batcher,
        metrics=metrics,
        name=str(scorer.identity.get("name", "prm")),
        kind=encoder.kind if encoder is not None else DEFAULT_KIND,
        separator=separator,
        strip=strip,
        aggregate=settings.aggregate,
        policy=settings.truncated,
        threshold=threshold,
        max_request_tokens=settings.max_request_tokens,
        specials=sorted(specials, key=len, reverse=True),
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # One line: a message a log shows whole, in the shape OpenAI-style clients read ({"error": {"message": ...}}).
    return JSONResponse(
        {"error": {"message": " ".join(message.split()), "code": status}}, status_code=status, headers=headers
    )


class Gate:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on every request): the API key, then the drain."""

    def __init__(self, app: Any, state: ServeState):
        self.app = app
        self.state = state
        self._expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._expected is not None and path not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                self.state.metrics.errors.labels("unauthorized").inc()
                await error_response(
                    401, "missing or wrong API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
                )(scope, receive, send)
                return
        counted = path not in ("/health", "/metrics")
        if counted and self.state.draining:
            self.state.metrics.errors.labels("draining").inc()
            await error_response(
                503, "the server is shutting down", {"Retry-After": str(LOADING_RETRY_S), "Connection": "close"}
            )(scope, receive, send)
            return
        if counted:
            self.state.busy += 1
        self.state.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.metrics.in_flight.dec()
            if counted:
                self.state.busy -= 1


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared)} bytes, more than serve.max_body_mb allows ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is more than serve.max_body_mb allows ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    load: Callable[[], Any],
    settings: Any,
    *,
    threshold: float = 0.5,
    api_key: str | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app. ``settings`` is the config's serve section (:class:`prmkit.config.ServeConfig`).

    (Over 100 lines: one short declaration per route, which FastAPI reads from the closure.)
    """
    state = ServeState(settings, threshold, api_key, on_fatal)
    body_limit = int(settings.max_body_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading(load)
        yield
        if state.service is not None:
            await state.service.batcher.stop(timeout=1.0)

    app = FastAPI(
        title="prmkit serve",
        version=__version__,
        lifespan=lifespan,
        description="Process rewards online: per-step scores of a process reward model, batched across "
        'requests. Errors are {"error": {"message": ..., "code": ...}}.',
    )
    app.state.prmkit = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def handle(
        request: Request, endpoint: str, work: Callable[[endpoints.Service, Any], Awaitable[dict]]
    ) -> Response:
        started = time.perf_counter()
        status, response = 200, None
        timing: dict[str, float] = {}
        TIMING.set(timing)
        try:
            svc = state.ready_service()
            obj = parse_json(await read_body(request, body_limit))
            response = JSONResponse(await work(svc, obj))
            if timing:
                # Where a request's time went, in the standard header browsers and proxies show (milliseconds).
                response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timing.items())
        except RequestError as e:
            status, response = e.status, error_response(e.status, e.message, e.headers)
        except QueueFull as e:
            status, response = 503, error_response(503, str(e), {"Retry-After": str(e.retry_after)})
        except ShuttingDown as e:
            status, response = 503, error_response(503, str(e), {"Retry-After": str(LOADING_RETRY_S)})
        except DataError as e:  # the engine's checks: a step holding the tag, a truncated item under `error`, ...
            status, response = 422, error_response(422, e.message)
        except PrmkitError as e:
            # The engine's own failures, this request's alone: out of memory on one sequence is its size's fault.
            status = 413 if "out of" in e.message and "memory" in e.message else 500
            response = error_response(status, e.message)
        except Exception as e:  # a bug: the request fails, the server goes on
            log.exception(f"{endpoint}: internal error")
            status, response = 500, error_response(500, f"internal error: {type(e).__name__}: {first_line(e)}")
        finally:
            if status >= 400:
                state.metrics.errors.labels(str(status)).inc()
            state.metrics.requests.labels(endpoint, str(status)).inc()
            state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    }

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=errors,
        openapi_extra=request_body(ScoreRequest),
        summary="Score every step of each solution (prmkit's own API)",
    )
    async def score(request: Request) -> Response:
        return await handle(request, "/v1/score", endpoints.score)

    @app.post(
        "/get_reward",
        response_model=RewardResponse,
        responses=errors,
        openapi_extra=request_body(RewardRequest),
        summary="OpenRLHF's remote reward model",
    )
    async def get_reward(request: Request) -> Response:
        return await handle(request, "/get_reward", endpoints.get_reward)

    @app.post(
        "/pooling",
        response_model=PoolingResponse,
        responses=errors,
        openapi_extra=request_body(PoolingRequest),
        summary="vLLM's pooling API, task token_classify",
    )
    async def pooling(request: Request) -> Response:
        return await handle(request, "/pooling", endpoints.pooling)

    @app.get("/health", summary="200 when the model is loaded and the server takes work, else 503")
    async def health() -> JSONResponse:
        status = "draining" if state.draining else state.status
        body: dict[str, Any] = {"status": status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/model", response_model=ModelInfo, responses=errors, summary="What is served, and how")
    async def model_info() -> Response:
        try:
            svc = state.ready_service()
        except RequestError as e:
            return error_response(e.status, e.message, e.headers)
        return JSONResponse(describe(svc))

    return app


def describe(svc: endpoints.Service) -> dict[str, Any]:
    scorer = svc.scorer
    encoder = getattr(scorer, "kind_encoder", None)
    tokenization = (
        scorer.params.to_dict() if encoder is None else {**encoder.settings.to_dict(), "max_length": encoder.max_length}
    )
    return json.loads(
        json.dumps(
            {
                "model": svc.name,
                "kind": svc.kind,
                "step_separator": svc.separator,
                "tokenization": tokenization,
                "aggregate": svc.aggregate,
                "truncated": svc.policy,
                "max_request_tokens": svc.max_request_tokens,
                "device": str(scorer.device),
                "dtype": str(scorer.dtype).removeprefix("torch."),
                "batch_tokens": scorer.batch_tokens,
                "prmkit_version": __version__,
            },
            default=str,
        )
    )
