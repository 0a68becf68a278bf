"""The Ray Serve deployment: one `Predictor` per replica behind a FastAPI app, requests batched.

Concurrent `POST /v1/recommend` calls on a replica meet in `rank` (`@serve.batch`), which runs one
forward pass for the whole batch in a worker thread so the event loop keeps accepting requests.
`max_batch_size` and `batch_wait_timeout_s` come from `user_config` and change live in
`reconfigure`. Each replica records Serve metrics (requests, latency, batch size) and logs one
line per request with Serve's request id (also returned as the `X-Request-ID` header).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rec_serve.predictor import (
    NotFoundError,
    Predictor,
    PreparedRequest,
    RecommendRequest,
    RecommendResponse,
    RequestError,
)
from rec_serve.retrieval import IndexParams
from rec_serve.schemas import (
    MAX_ID_LENGTH,
    BatchArgs,
    ErrorBody,
    EventsBody,
    EventsResponseBody,
    HealthBody,
    ItemBody,
    ModelBody,
    RecommendBody,
    RecommendResponseBody,
    ServeArgs,
    ServingStats,
    SimilarBody,
    SimilarResponseBody,
)
from rec_serve.user_state import open_store

logger = logging.getLogger("ray.serve")

API_KEY_HEADER = "x-api-key"
OPEN_PATHS = ("/healthz",)  # for probes; with an API key set, every other path needs it, /docs included
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorBody, "description": "unknown user or item"},
    413: {"model": ErrorBody, "description": "request body too large"},
    422: {"model": ErrorBody, "description": "malformed request; the message says what to fix"},
}


def error(
    status: int, message: str, request_id: str | None, details: list[str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=message, details=details or [], request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status)


def request_id(request: Request) -> str | None:
    """Serve's proxy gives every request an id (the client's X-Request-ID when sent)."""
    return request.headers.get("x-request-id")


def describe_validation(exc: RequestValidationError) -> tuple[str, list[str]]:
    """Pydantic's errors as one summary line plus one line per field: `body.k: ... (got 0)`."""
    details = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return (
                f"the body is not valid JSON ({ctx.get('error', 'parse error')}); send a JSON object such as"
                ' {"user_id": "42", "k": 10} with Content-Type: application/json',
                [],
            )
        got = e.get("input")
        shown = json.dumps(got, default=str)[:80] if e.get("type") != "missing" else None
        details.append(f"{where}: {e.get('msg')}" + (f" (got {shown})" if shown is not None else ""))
    return "invalid request: " + "; ".join(details), details


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(scope, receive, send)
            return
        # Read the whole (small) body first so a chunked upload over the limit is refused too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body over {self.limit} bytes; send a shorter history or fewer ids"
        request_id = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode() or None
        await error(413, message, request_id)(scope, receive, send)


@serve.deployment(name="Recommender", health_check_period_s=5, graceful_shutdown_timeout_s=30)
@serve.ingress()
class Recommender:
    """A replica: loads the model once, batches recommendation requests, serves the HTTP API."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self.predictor = Predictor.load(
            self.args.model,
            explain_items=self.args.explain_items,
            user_tower=self.args.user_tower,
            retrieval=self.args.retrieval,
            index_params=IndexParams(nprobe=self.args.nprobe, ef_search=self.args.ef_search),
            state_cache_mb=self.args.state_cache_mb,
        )
        self.events = open_store(self.args.events, self.args.max_user_events)
        self.api_key: bytes | None = None
        if self.args.api_key_env:
            key = os.environ.get(self.args.api_key_env)
            if not key:
                raise RuntimeError(
                    f"api_key_env is {self.args.api_key_env!r} but that environment variable is empty on the"
                    " replica; set it (e.g. runtime_env env_vars or a Kubernetes secret) or drop api_key_env"
                )
            self.api_key = key.encode()
        self.batch = BatchArgs()  # replaced by `reconfigure` with the deployment's user_config
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.requests = 0
        self.batches = 0
        self.batched_requests = 0
        self.max_batch_seen = 0
        self.request_counter = Counter(
            "rayrec_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.latency = Histogram(
            "rayrec_request_latency_ms",
            description="time from request to response in the replica",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route",),
        )
        self.batch_size = Histogram(
            "rayrec_batch_size",
            description="requests per forward pass",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        logger.info("loaded model %s (version %s)", self.predictor.source, self.predictor.model_version)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `user_config` (`max_batch_size`, `batch_wait_timeout_s`) without a restart."""
        self.batch = BatchArgs.model_validate(user_config)
        self.rank.set_max_batch_size(self.batch.max_batch_size)
        self.rank.set_batch_wait_timeout_s(self.batch.batch_wait_timeout_s)
        logger.info("batching: max_batch_size=%d batch_wait_timeout_s=%s", *self.batch.model_dump().values())

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def rank(self, prepared: list[PreparedRequest]) -> list[RecommendResponse]:
        self.batches += 1
        self.batched_requests += len(prepared)
        self.max_batch_seen = max(self.max_batch_seen, len(prepared))
        self.batch_size.observe(len(prepared))
        return await asyncio.to_thread(self.predictor.recommend_prepared, prepared)

    def stats(self) -> ServingStats:
        return ServingStats(
            replica=self.replica,
            requests=self.requests,
            batches=self.batches,
            mean_batch_size=self.batched_requests / self.batches if self.batches else 0.0,
            max_batch_size_seen=self.max_batch_seen,
            max_batch_size=self.batch.max_batch_size,
            batch_wait_timeout_s=self.batch.batch_wait_timeout_s,
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return BodySizeLimit(build_api(self), self.args.max_body_bytes)


def build_api(replica: Recommender) -> FastAPI:
    """The FastAPI app of one replica (routes close over its predictor and settings)."""
    predictor = replica.predictor
    api = FastAPI(
        title="rayrec",
        version=predictor.model_version,
        description="Sequential recommendations from a rayrec model. Send X-API-Key when the server asks for it.",
    )

    @api.middleware("http")
    async def guard_and_measure(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))  # below the route prefix
        route = path if path.startswith("/v1/") else "other"
        route = "/v1/items" if route.startswith("/v1/items/") else route
        if replica.api_key is not None and path not in OPEN_PATHS:
            sent = request.headers.get(API_KEY_HEADER, "").encode()
            if not hmac.compare_digest(sent, replica.api_key):
                response = error(401, "missing or wrong X-API-Key header", request_id(request))
                replica.request_counter.inc(tags={"route": route, "status": "401"})
                return response
        response = await call_next(request)
        elapsed_ms = (time.perf_counter() - start) * 1000
        replica.requests += 1
        replica.request_counter.inc(tags={"route": route, "status": str(response.status_code)})
        replica.latency.observe(elapsed_ms, tags={"route": route})
        logger.info(
            "request_id=%s %s %s -> %d in %.1f ms",
            request_id(request),
            request.method,
            request.url.path,
            response.status_code,
            elapsed_ms,
        )
        return response

    @api.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = describe_validation(exc)
        return error(422, message, request_id(request), details)

    @api.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        hint = {404: "; see /docs for the routes", 405: "; see /docs for the methods each route takes"}
        return error(exc.status_code, f"{exc.detail}{hint.get(exc.status_code, '')}", request_id(request))

    @api.exception_handler(NotFoundError)
    async def on_not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return error(404, str(exc), request_id(request))

    @api.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(422, str(exc), request_id(request))

    @api.post("/v1/recommend", response_model=RecommendResponseBody, responses=ERRORS)
    async def recommend(body: RecommendBody) -> RecommendResponseBody:
        """Top-k items for a user (known to the model, or known by their POST /v1/events) and/or a history
        of item ids: the trained history, then the user's events, then `history`."""
        events = await replica.events.recent(body.user_id) if body.user_id and replica.events else []
        request = RecommendRequest(**body.model_dump(), events=events)
        response = await replica.rank(predictor.prepare(request))
        return RecommendResponseBody.model_validate(response, from_attributes=True)

    @api.post("/v1/events", response_model=EventsResponseBody, responses=ERRORS)
    async def events(body: EventsBody) -> EventsResponseBody:
        """Append interactions to users' histories; the next recommendation for each user reads them."""
        if replica.events is None:
            raise NotFoundError("this endpoint keeps no events (deployed with events=none)")
        unknown = sorted({e.item_id for e in body.events if e.item_id not in predictor.item_index})
        if unknown:
            raise RequestError(
                f"{len(unknown)} item ids are not in model {predictor.model_version} (first: {unknown[0]!r}); "
                "nothing was stored: send events for known items (GET /v1/items/{item_id})"
            )
        ordered = list(body.events)
        if all(e.timestamp is not None for e in ordered):
            ordered.sort(key=lambda e: e.timestamp)  # stable: ties keep the order sent
        await replica.events.append([(e.user_id, e.item_id) for e in ordered])
        users = len({e.user_id for e in ordered})
        return EventsResponseBody(accepted=len(ordered), users=users, store=replica.events.kind)

    @api.post("/v1/similar-items", response_model=SimilarResponseBody, responses=ERRORS)
    async def similar_items(body: SimilarBody) -> SimilarResponseBody:
        """Items closest to `item_id` in the model's item embedding space."""
        items = predictor.similar_items(body.item_id, body.k)
        return SimilarResponseBody.model_validate(
            {"item_id": body.item_id, "items": items, "model_version": predictor.model_version},
            from_attributes=True,
        )

    @api.get("/v1/items/{item_id}", response_model=ItemBody, responses=ERRORS)
    async def item(item_id: str) -> ItemBody:
        """Title and popularity of one item."""
        if len(item_id) > MAX_ID_LENGTH:
            raise RequestError(f"item_id is longer than {MAX_ID_LENGTH} characters")
        return ItemBody(**predictor.item(item_id))

    @api.get("/v1/model", response_model=ModelBody, responses=ERRORS)
    async def model() -> ModelBody:
        """Model version, training metrics and this replica's batching statistics."""
        events = replica.events.kind if replica.events is not None else "none"
        return ModelBody(**predictor.describe(), events=events, serving=replica.stats())

    @api.get("/healthz", response_model=HealthBody)
    async def healthz() -> HealthBody:
        return HealthBody(status="ok", model_version=predictor.model_version)

    return api
