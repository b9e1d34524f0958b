"""``queuebert serve``: an HTTP gateway that is only a producer.

Stateless: every request becomes jobs in Redis through :class:`~producer.async_client.AsyncClient`
and waits for their results there, so any number of replicas can stand behind a load balancer and
a worker can die mid-request without losing anything (its jobs are recovered like any other).

Routes:

- text-embeddings-inference's, so TEI clients work unchanged (:mod:`producer.tei` holds their
  shapes and rules): ``POST /predict``, ``POST /rerank``, ``POST /`` (and ``/invocations``),
  dispatched as TEI dispatches it for the model the workers serve, ``GET /health``, ``GET /info``;
- queuebert's own, for streams: ``POST /runs`` (a JSONL body, read line by line as it arrives and
  enqueued with backpressure), ``GET /runs/{id}`` (progress), ``GET /runs/{id}/results`` (JSONL in
  input order, streamed as results arrive), ``GET /runs/{id}/events`` (Server-Sent Events in
  completion order, resumable with ``Last-Event-ID``);
- ``GET /metrics``: Prometheus.

Pressure: a request that would queue behind more than ``max_queue_depth`` jobs gets 429 with
``Retry-After``; one whose results do not come within ``request_timeout`` gets 504, and its jobs
carry that deadline, so a worker drops them instead of computing answers nobody waits for.
One-text requests are gathered into shared jobs by the client (:class:`~producer.async_client.AsyncClient`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from rq import Queue, worker_registration
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from queuebert import keys
from queuebert.schema import ItemResult
from queuebert.settings import GatewaySettings

from . import readers, tei
from .async_client import AsyncClient
from .jobs import new_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Seconds a queue depth (LLEN) or the served model (/info) is reused before it is read again:
#: under load a gateway answers many requests a millisecond, and either changes slowly.
DEPTH_EVERY = 0.05
MODEL_EVERY = 2.0


class Metrics:
    """The gateway's Prometheus series, in a registry of its own (several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("queuebert_gateway_requests_total", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("queuebert_gateway_request_seconds", "Time from request to response, by route.",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.items = Counter("queuebert_gateway_items_total", "Items sent to the queue, by route.", ["route"],
                             registry=self.registry)


class Auth:
    """Bearer-token auth (``--api-key``, as TEI's): the token compared in constant time. ``/health``
    stays open, for load balancers' probes."""

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            await JSONResponse({"error": "Unauthorized", "error_type": "Unauthorized"}, status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Cached(Generic[T]):
    """A value read from Redis at most once per ``every`` seconds, however many requests ask at
    once: the first one past the age reads it, the others await that same read (without this,
    every request in flight when the value expires sends its own read)."""

    def __init__(self, read: Callable[[], Awaitable[T]], every: float, keep_none: bool = True):
        self.read = read
        self.every = every
        #: False: a None read is not kept (asked again at the next call).
        self.keep_none = keep_none
        self._at = -float("inf")
        self._value: T | None = None
        self._reading: asyncio.Future[T] | None = None

    async def get(self) -> T:
        fresh = time.monotonic() - self._at <= self.every and (self.keep_none or self._value is not None)
        if fresh:
            return self._value  # type: ignore[return-value]
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._reading)  # a cancelled request does not cancel the read

    async def _refresh(self) -> T:
        try:
            value = await self.read()
            self._value, self._at = value, time.monotonic()
            return value
        finally:
            self._reading = None


class Gateway:
    """The routes' shared state: the client, the settings, the cached queue depth and model."""

    def __init__(self, client: AsyncClient, settings: GatewaySettings):
        self.client = client
        self.settings = settings
        self.metrics = Metrics()
        self._depth = Cached(self._read_depth, DEPTH_EVERY)
        self._served = Cached(self._read_served, MODEL_EVERY, keep_none=False)
        #: Requests waiting for results, answered 503 just before a stop would cut them off.
        self._waiting: set[asyncio.Future[Any]] = set()
        self._cut = False

    def begin_stop(self) -> None:
        """A stop signal arrived (in the event loop's thread): requests still waiting for results
        when the stop's grace is nearly over get a 503 (retry elsewhere) instead of a dropped
        connection. Their jobs stay queued, so a retry finds the work done or under way."""
        asyncio.get_running_loop().call_later(max(0.0, self.settings.stop_timeout - 1.0), self._cut_waiting)

    def _cut_waiting(self) -> None:
        self._cut = True
        for waiting in list(self._waiting):
            waiting.cancel()

    # -- shared checks ----------------------------------------------------------------------------

    async def queue_depth(self) -> int:
        return await self._depth.get()

    async def _read_depth(self) -> int:
        return int(await self.client.connection.llen(Queue.redis_queue_namespace_prefix + self.settings.queue))

    async def admit(self) -> None:
        """429 while the queue is deeper than allowed: the caller retries later (Retry-After)."""
        limit = self.settings.max_queue_depth
        if limit and await self.queue_depth() >= limit:
            raise tei.overloaded()

    async def served(self) -> tuple[tei.ModelInfo, int] | None:
        """The model the queue's workers say they serve (cached for MODEL_EVERY seconds; while no
        worker says, read again at each call)."""
        return await self._served.get()

    async def _read_served(self) -> tuple[tei.ModelInfo, int] | None:
        """On the client's own connection: the queue's workers as RQ registers them, then the
        fields each publishes (a worker whose hash expired gives none and is left out)."""
        conn = self.client.connection
        worker_keys = await conn.smembers(worker_registration.WORKERS_BY_QUEUE_KEY % self.settings.queue)
        async with conn.pipeline(transaction=False) as pipe:
            for key in worker_keys:
                pipe.hmget(key, *keys.WORKER_MODEL_FIELDS)
            rows = await pipe.execute()
        return tei.served_model([dict(zip(keys.WORKER_MODEL_FIELDS, row)) for row in rows])

    async def results(self, handles: list[Any]) -> list[ItemResult]:
        """Every handle's result, or 504 once ``request_timeout`` has passed (the jobs carry the
        same deadline, so none of them runs late for nobody)."""
        timeout = self.settings.request_timeout
        waiting = asyncio.gather(*(h.result(timeout=timeout) for h in handles))
        self._waiting.add(waiting)
        try:
            got = await asyncio.wait_for(waiting, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise tei.timed_out(timeout) from None
        except asyncio.CancelledError:
            if self._cut:
                raise tei.stopping() from None
            raise
        finally:
            self._waiting.discard(waiting)
        if any(r is None for r in got):
            raise tei.timed_out(timeout)
        return got  # type: ignore[return-value]

    async def submit(self, items: tuple[Any, ...] | list[Any], route: str, top_k: int | None = None,
                     function_to_apply: str | None = None) -> list[ItemResult]:
        """One input through the coalescing ``submit``; several as one job of their own."""
        await self.admit()
        self.metrics.items.labels(route).inc(len(items))
        options = {"top_k": top_k, "function_to_apply": function_to_apply}
        if len(items) == 1:
            handles = [await self.client.submit(dict(items[0]), **options)]
        else:
            handles = await self.client.submit_many([dict(i) for i in items], chunk_size=len(items), **options)
        return await self.results(handles)

    # -- TEI routes ---------------------------------------------------------------------------------

    async def _body(self, request: Request) -> Any:
        tei.check_content_type(request.headers.get("content-type"))
        raw = await request.body()
        if len(raw) > self.settings.max_body_bytes:
            raise tei.TEIError(413, f"body of {len(raw)} bytes, more than {self.settings.max_body_bytes}",
                               tei.VALIDATION)
        return tei.decode_body(raw)

    async def predict(self, request: Request) -> Response:
        parsed = tei.parse_predict(await self._body(request), max_client_batch_size=self.settings.max_client_batch_size)
        return await self._predict(parsed, "/predict")

    async def _predict(self, parsed: tei.PredictRequest, route: str) -> Response:
        results = await self.submit(parsed.items, route, None, parsed.function_to_apply)
        served = await self.served()
        labels = served[0].labels if served else None
        return JSONResponse(tei.predict_response(parsed, results, labels))

    async def rerank(self, request: Request) -> Response:
        served = await self.served()
        parsed = tei.parse_rerank(await self._body(request), max_client_batch_size=self.settings.max_client_batch_size,
                                  model=served[0] if served else None)
        return await self._rerank(parsed, "/rerank")

    async def _rerank(self, parsed: tei.RerankRequest, route: str) -> Response:
        results = await self.submit(parsed.items, route, None, parsed.function_to_apply)
        return JSONResponse(tei.rerank_response(parsed, results))

    async def root(self, request: Request) -> Response:
        served = await self.served()
        parsed = tei.parse_root(await self._body(request), max_client_batch_size=self.settings.max_client_batch_size,
                                model=served[0] if served else None)
        if isinstance(parsed, tei.RerankRequest):
            return await self._rerank(parsed, "/")
        results = await self.submit(parsed.items, "/", parsed.top_k, parsed.function_to_apply)
        return JSONResponse(tei.predict_response(parsed, results, served[0].labels if served else None))

    async def health(self, request: Request) -> Response:
        """200 when Redis answers and a worker serves the queue; else TEI's 503."""
        try:
            await self.client.connection.ping()
        except Exception:
            raise tei.unhealthy() from None
        if await self.served() is None:
            raise tei.unhealthy()
        return Response(status_code=200)

    async def info(self, request: Request) -> Response:
        return JSONResponse(tei.info_body(await self.served(), max_client_batch_size=self.settings.max_client_batch_size,
                                          max_concurrent_requests=self.settings.max_concurrent_requests))

    # -- runs ---------------------------------------------------------------------------------------

    async def create_run(self, request: Request) -> Response:
        """A JSONL body, enqueued as one run while it is read (never held whole). Lines are read
        as ``queuebert enqueue`` reads them (:func:`producer.readers.record_from_json_line`), with
        its options as query parameters (``text_field``, ``id_field``, ``text_pair_field``): a bare
        string is a text, other fields go to ``meta``. An unreadable line is skipped and reported;
        a client that disconnects mid-body gets the run sealed with what arrived, so its results
        can still be read in full."""
        await self.admit()
        params = request.query_params
        run_id = params.get("run_id") or new_id()
        fields = {"text_field": params.get("text_field") or "text", "id_field": params.get("id_field") or "id",
                  "text_pair_field": params.get("text_pair_field") or None}
        bad: list[dict[str, Any]] = []

        async def items() -> AsyncIterator[dict[str, Any]]:
            n = 0
            buffer = b""
            async for chunk in request.stream():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    n += 1
                    item = _jsonl_item(line, n, bad, fields)
                    if item is not None:
                        yield item
            if buffer.strip():
                item = _jsonl_item(buffer, n + 1, bad, fields)
                if item is not None:
                    yield item

        try:
            run = await self.client.enqueue_stream(items(), run_id=run_id)
        except ClientDisconnect:
            total = await self.client.seal(run_id)
            log.warning("client disconnected during its upload: run sealed with what arrived", run=run_id, items=total)
            return Response(status_code=499)
        self.metrics.items.labels("/runs").inc(run.enqueued)
        return JSONResponse({"run_id": run_id, "enqueued": run.enqueued, "unreadable_lines": bad}, status_code=201)

    async def _known(self, run_id: str) -> dict[str, int]:
        progress = await self.client.run_progress(run_id)
        if not progress["jobs"] and not progress["sealed"]:
            raise tei.TEIError(404, f"no run {run_id}", "NotFound")
        return progress

    async def run_progress(self, request: Request) -> Response:
        return JSONResponse(await self._known(request.path_params["run_id"]))

    async def run_results(self, request: Request) -> Response:
        """JSONL in input order, each line sent as soon as the results before it are in."""
        run_id = request.path_params["run_id"]
        await self._known(run_id)

        async def lines() -> AsyncIterator[bytes]:
            async for result in self.client.ordered_results(run_id):
                yield json.dumps(result, ensure_ascii=False).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def run_events(self, request: Request) -> Response:
        """Server-Sent Events, one per item result in completion order. Each event's id is
        ``<stream entry id>/<index in the entry>``: a client that reconnects with Last-Event-ID gets
        exactly the results after that one, also when it dropped in the middle of an entry."""
        run_id = request.path_params["run_id"]
        await self._known(run_id)
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or ""
        entry_id, _, index = last.partition("/")
        skip = int(index) + 1 if index.isdigit() else 0
        start = _previous_id(entry_id) if entry_id and skip else (entry_id or "0-0")

        async def events() -> AsyncIterator[dict[str, Any]]:
            subscription = self.client.subscribe(run_id, last_id=start)
            async for stream_id, _job, results in subscription.entries():
                first = skip if stream_id == entry_id else 0
                for i, result in enumerate(results[first:], first):
                    yield {"id": f"{stream_id}/{i}", "event": "result", "data": json.dumps(result, ensure_ascii=False)}
            yield {"event": "end", "data": json.dumps(await self.client.run_progress(run_id))}

        return EventSourceResponse(events(), ping=15)

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _jsonl_item(line: bytes, n: int, bad: list[dict[str, Any]], fields: dict[str, Any]) -> dict[str, Any] | None:
    """One line of a run's body as an item, or None (blank, or reported in ``bad``)."""
    if not line.strip():
        return None
    try:
        return readers.record_from_json_line(line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line, n, **fields)
    except readers.InputError as exc:
        bad.append({"line": n, "error": str(exc)})
        return None


def _previous_id(entry_id: str) -> str:
    """The stream id just before ``entry_id``, so XREAD returns that entry again."""
    ms, _, seq = entry_id.partition("-")
    if seq.isdigit() and int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-18446744073709551615" if ms.isdigit() and int(ms) > 0 else "0-0"


def create_app(settings: GatewaySettings, client: AsyncClient | None = None) -> Starlette:
    """The ASGI app; ``client`` defaults to one on ``settings.redis_url`` whose jobs carry the
    request timeout as their deadline."""
    client = client or AsyncClient.from_url(settings.redis_url, queue=settings.queue,
                                            job_ttl=settings.request_timeout)
    gw = Gateway(client, settings)

    def route(path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except tei.TEIError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status,
                                        headers={"Retry-After": "1"} if exc.status in (429, 503) else None)
            gw.metrics.requests.labels(path, str(response.status_code)).inc()
            gw.metrics.seconds.labels(path).observe(time.perf_counter() - started)
            return response

        return Route(path, endpoint, methods=methods)

    routes = [
        route("/predict", gw.predict, ["POST"]),
        route("/rerank", gw.rerank, ["POST"]),
        route("/", gw.root, ["POST"]),
        route("/invocations", gw.root, ["POST"]),
        route("/health", gw.health, ["GET"]),
        route("/info", gw.info, ["GET"]),
        route("/runs", gw.create_run, ["POST"]),
        route("/runs/{run_id}", gw.run_progress, ["GET"]),
        route("/runs/{run_id}/results", gw.run_results, ["GET"]),
        route("/runs/{run_id}/events", gw.run_events, ["GET"]),
        route("/metrics", gw.metrics_page, ["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        try:
            # Bounded: closing sends nothing, but a stop must not hang on a Redis that is frozen.
            await asyncio.wait_for(client.aclose(), timeout=5)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("closing the Redis client timed out at shutdown")

    app = Starlette(routes=routes, middleware=[Middleware(Auth, api_key=settings.api_key)], lifespan=lifespan)
    app.state.gateway = gw
    return app


def serve(settings: GatewaySettings) -> int:
    """Run the gateway with uvicorn until stopped (SIGINT/SIGTERM)."""
    import uvicorn

    log.info("gateway listening", host=settings.host, port=settings.port, queue=settings.queue,
             auth=bool(settings.api_key))
    app = create_app(settings)
    gw: Gateway = app.state.gateway

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                gw.begin_stop()
            super().handle_exit(sig, frame)

    # A stop lets requests in flight finish for stop_timeout seconds (those still waiting then get
    # a 503 a second before), then closes what is left, so the process ends within its grace.
    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on",
                          access_log=False, timeout_graceful_shutdown=settings.stop_timeout)).run()
    return 0

