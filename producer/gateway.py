"""``queuebert serve``: an HTTP gateway that is only a producer.

Stateless: every request becomes jobs in Redis through :class:`~producer.async_client.AsyncClient`
and waits for their results there, so any number of replicas can stand behind a load balancer and
a worker can die mid-request without losing anything (its jobs are recovered like any other).

Routes:

- text-embeddings-inference's, so TEI clients work unchanged (:mod:`producer.tei` holds their
  shapes and rules): ``POST /predict``, ``POST /rerank``, ``POST /`` (and ``/invocations``),
  dispatched as TEI dispatches it for the model the workers serve, ``GET /health``, ``GET /info``;
- Infinity's and Cohere's, each naming its model (:mod:`producer.peers` holds their shapes):
  ``POST /classify``, ``POST /rerank`` with ``documents`` (and both under ``/v1``), Cohere's
  ``POST /v2/rerank``, and ``GET /v1/models`` (and ``/models``) listing what is served;
- queuebert's own, for streams: ``POST /runs`` (a JSONL body, read line by line as it arrives and
  enqueued with backpressure), ``GET /runs/{id}`` (progress), ``GET /runs/{id}/results`` (JSONL in
  input order, streamed as results arrive), ``GET /runs/{id}/events`` (Server-Sent Events in
  completion order, resumable with ``Last-Event-ID``);
- ``GET /metrics``: Prometheus.

Many models: each model has its own queue, and a request goes to the queue of the model it names
(:mod:`producer.catalog`: names learned from the registered workers, plus ``QUEUEBERT_MODELS`` for
models whose workers scale to zero). A request that names none goes to ``--queue``, the default
model; TEI's routes take an optional ``model`` body field (or a ``Queuebert-Model`` header),
``/info`` and ``/health`` a ``?model=``, ``POST /runs`` a ``?model=``. A model whose queue has no
live worker still takes requests: they wait in its queue until a worker starts or their timeout.

Pressure: a request that would queue behind more than ``max_queue_depth`` jobs gets 429 with
``Retry-After``; one whose results do not come within ``request_timeout`` gets 504, and its jobs
carry that deadline, so a worker drops them instead of computing answers nobody waits for. A run
(``POST /runs``) is read later by whoever asks, so its jobs have no deadline unless its caller
asks for one (``?job_ttl=``).
One-text requests are gathered into shared jobs by the client (:class:`~producer.async_client.AsyncClient`).
Result streams (``/runs/{id}/events``, ``/runs/{id}/results``) have a Redis connection pool of their
own, ``max_streams`` connections, one per open stream, and past it a new stream gets 429: however
many clients subscribe, the TEI routes and ``/health`` keep their connections.

What a TEI request leaves in Redis: once its answer is in hand, or nobody waits for it any more
(504, the client went away), its handles are released (:meth:`AsyncClient.release`): a job still
queued that no other request of the job waits for is taken off the queue unstarted (as TEI drops
the queued work of a client that disconnected), a finished one is deleted with its run; what a
worker is computing expires ``answer_ttl`` after it finishes.

Outages: whatever Redis does (refuses, drops, freezes), a TEI request ends within
``request_timeout`` (504, or 503 once Redis has failed), and ``/health`` and ``/info`` within
``redis_timeout`` (503): every command has a socket timeout, and each request a bound of its own
over all of its commands and their retries.

Errors: whatever fails, the client gets TEI's ``{"error", "error_type"}`` body with a status that
says whose fault it is (:func:`http_error`), and the request is counted; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from rq import Queue, worker_registration
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from queuebert import keys
from queuebert.schema import OPTION_NAMES, ItemResult, JobError, JobOptions
from queuebert.settings import ClientSettings, GatewaySettings

from . import jobs, peers, readers, tei
from .async_client import AsyncClient, AsyncHandle
from .catalog import Catalog, ModelError, Target, build_catalog, parse_model_map
from .client import RedisFull
from .jobs import LostWrites, ResumeError, new_id
from .pairs import RerankError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Seconds a queue depth (LLEN) or the served models (the catalog: /info, routing) are reused
#: before they are read again: under load a gateway answers many requests a millisecond, and
#: either changes slowly. While the default queue has no live worker the catalog is read again
#: after MODEL_RETRY_EVERY, so a worker that starts is seen (/health, /info) within it.
DEPTH_EVERY = 0.05
MODEL_EVERY = 2.0
MODEL_RETRY_EVERY = 0.1

#: Header naming the model of a TEI request, for TEI clients that can add a header but not a body
#: field (huggingface_hub's ``InferenceClient(headers=...)``); a ``model`` body field wins over it.
MODEL_HEADER = "queuebert-model"

#: What a run id given to the gateway may hold (``?run_id=`` and the ``/runs/{id}`` routes): what
#: :func:`~producer.jobs.new_id` makes (32 hex digits) and what people name runs
#: (``reviews-2024-06``, ``batch_7.retry``), but nothing that reads as a path (``/``, a leading
#: ``.``), a Redis key's separator or hash tag (``:``, ``{``, ``}``), whitespace or control characters.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: An event id as ``GET /runs/{id}/events`` sends it: ``<stream entry id>/<index in the entry>``;
#: a bare entry id resumes after that whole entry. Parts are Redis's unsigned 64-bit numbers.
EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})(?:/(\d{1,9}))?")
MAX_STREAM_PART = 2**64 - 1


#: Longest ``?job_ttl=`` a run may ask for (ten years): a bound keeps ``time.time() + job_ttl`` a
#: Unix time a worker can compare (``1e400`` parses as infinity).
MAX_JOB_TTL = 10 * 365 * 86_400.0


def check_job_ttl(raw: str | None) -> float | None:
    """The ``?job_ttl=`` of ``POST /runs``: seconds each of the run's jobs may wait before a worker
    drops it (``deadline_exceeded``); absent or empty: no deadline. Anything but a positive number
    of seconds is 422, so a typo never silently drops a whole run."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_JOB_TTL:  # also false for nan and inf
        raise tei.TEIError.of(tei.VALIDATION, f"{tei.VALIDATION_PREFIX}job_ttl {json.dumps(raw)[:40]} must be a "
                                              f"number of seconds above 0 and at most {MAX_JOB_TTL:g}")
    return value


def query_options(params: Mapping[str, str]) -> JobOptions:
    """The job options a ``POST /runs`` asks for as query parameters named as the options
    (``?top_k=2&function_to_apply=sigmoid``). A value is read as JSON where it parses (numbers),
    else as the string sent; a bad one is 422 naming the parameter, never silently ignored."""
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        raw = params.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
    try:
        return JobOptions(**values)
    except JobError as exc:  # its message starts with the option's name
        raise tei.TEIError.of(tei.VALIDATION, f"{tei.VALIDATION_PREFIX}{exc}") from None


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is one a run may have (:data:`RUN_ID`), else 422."""
    if RUN_ID.fullmatch(run_id) is None:
        raise tei.TEIError.of(tei.VALIDATION, f"{tei.VALIDATION_PREFIX}run_id {json.dumps(run_id)[:80]} must be "
                                              "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return run_id


class BodyTimeout(Exception):
    """The client stopped sending its body for longer than ``body_timeout`` (408)."""


def http_error(exc: Exception, route: str) -> tei.TEIError:
    """What the client of ``route`` is told about ``exc``, always TEI's ``ErrorResponse``: bad input
    4xx, Redis trouble 503 with Retry-After (nothing is wrong with the request: retry it), a bug
    500 with its traceback in the log only."""
    if isinstance(exc, tei.TEIError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return tei.TEIError(tei.CLIENT_CLOSED_STATUS, "the client closed the request", tei.VALIDATION)
    if isinstance(exc, BodyTimeout):
        return tei.body_timeout(str(exc))
    if isinstance(exc, LostWrites):  # Redis lost acknowledged jobs: the same request again re-enqueues them
        log.warning("Redis lost writes", route=route, error=str(exc))
        return tei.TEIError.of(tei.UNHEALTHY, f"{exc}: send the same request again")
    if isinstance(exc, ResumeError):  # a run id this body cannot continue: the client's to fix
        return tei.TEIError(tei.CONFLICT_STATUS, str(exc), tei.VALIDATION)
    if isinstance(exc, ModelError):  # not served here: 404; not a name at all: 422 (TEI's Validation)
        return tei.TEIError(404 if exc.unknown else tei.STATUS[tei.VALIDATION], exc.message, tei.VALIDATION)
    if isinstance(exc, (RedisFull, redis.exceptions.RedisError)):
        log.warning("Redis error", route=route, error=repr(exc))
        return tei.redis_unavailable()
    log.error("unexpected error", route=route, exc_info=exc)
    return tei.internal()


def _error_headers(status: int) -> dict[str, str] | None:
    """Retry-After where a retry will do (429, 503); Connection: close where the body was left
    unread (408, 413), so uvicorn does not go on reading the rest of it on a kept-alive connection."""
    if status in (429, 503):
        return {"Retry-After": "1"}
    if status in (tei.BODY_TIMEOUT_STATUS, tei.TOO_LARGE_STATUS):
        return {"Connection": "close"}
    return None


def resume_point(last_event_id: str) -> tuple[str, str, int]:
    """``(start, entry_id, skip)`` for a ``Last-Event-ID``: read the run's stream from ``start``
    and, in entry ``entry_id``, skip the first ``skip`` results. 422 for an id the gateway never
    sent, before the stream starts (Redis would refuse it in the middle of the response)."""
    if not last_event_id:
        return "0-0", "", 0
    match = EVENT_ID.fullmatch(last_event_id)
    if match is None or max(int(match[1]), int(match[2])) > MAX_STREAM_PART:
        raise tei.TEIError.of(tei.VALIDATION, f"{tei.VALIDATION_PREFIX}Last-Event-ID {json.dumps(last_event_id)[:80]} "
                                              "is not an id of this stream's events (<ms>-<seq>/<index>)")
    entry_id = f"{int(match[1])}-{int(match[2])}"  # as Redis writes it, to compare with what it returns
    if match[3] is None:
        return entry_id, entry_id, 0
    return _previous_id(entry_id), entry_id, int(match[3]) + 1


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


class ModelsCollector:
    """``queuebert_gateway_model_workers{model,queue}``: each model this gateway serves and the live
    workers of its queue, 0 for a model none serves (its requests wait for one: scaled to zero),
    from the catalog the gateway last read; a scrape never waits on Redis for it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("queuebert_gateway_model_workers",
                                  "Live workers serving each model's queue, as this gateway last read them "
                                  "(0: none; the model's requests wait in its queue until one starts).",
                                  labels=["model", "queue"])
        catalog = self.gateway.last_catalog
        if catalog is not None:
            for target, _declared, _default in catalog.listing():
                gauge.add_metric([target.name, target.queue], target.workers)
        yield gauge


class Auth:
    """Bearer-token auth (``--api-key``, as TEI's): the token compared in constant time. ``/health``
    stays open, for load balancers' probes."""

    OPEN = frozenset({"/health"})
    #: Routes only Infinity's clients call (FastAPI's 401 body there), and Cohere's.
    INFINITY = frozenset({"/classify", "/v1/classify", "/v1/rerank", "/models", "/v1/models"})
    COHERE = frozenset({"/v2/rerank"})

    @classmethod
    def refusal(cls, path: str) -> dict[str, Any]:
        """The 401 body in the shape of the route's clients (TEI's where a route is TEI's or shared)."""
        if path in cls.INFINITY:
            return {"detail": "Unauthorized"}
        if path in cls.COHERE:
            return peers.cohere_error(401, "invalid api token")
        return {"error": "Unauthorized", "error_type": "Unauthorized"}

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            await JSONResponse(self.refusal(scope["path"]), status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Cached(Generic[T]):
    """A value read from Redis at most once per ``every`` seconds, however many requests ask at
    once: the first one past the age reads it, the others await that same read (without this,
    every request in flight when the value expires sends its own read)."""

    def __init__(self, read: Callable[[], Awaitable[T]], every: float, keep_none: bool = True,
                 short: Callable[[T], bool] | None = None, short_every: float = 0.0):
        self.read = read
        self.every = every
        #: False: a None read is not kept (asked again at the next call).
        self.keep_none = keep_none
        #: A value ``short`` says is provisional is kept only ``short_every`` seconds.
        self.short = short
        self.short_every = short_every
        self._at = -float("inf")
        self._value: T | None = None
        self._reading: asyncio.Future[T] | None = None

    @property
    def last(self) -> T | None:
        """The value last read (None before the first), whatever its age: for readers that must
        not wait on Redis (/metrics, a probe)."""
        return self._value

    async def get(self) -> T:
        value = self._value
        every = self.short_every if self.short is not None and value is not None and self.short(value) else self.every
        fresh = time.monotonic() - self._at <= every and (self.keep_none or value is not None)
        if fresh:
            # Fresh means read at least once: _value is a T (None itself only when keep_none allows it).
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


class _Holding(Response):
    """A streamed response that gives its stream slot back once it ends, however it ends (sent
    whole, the client gone, the server stopping)."""

    def __init__(self, response: Response, release: Callable[[], None]):
        self.response = response
        self.release = release
        self.status_code = response.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.release()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away. Only once the body has been read whole: what
    ``receive`` brings after it is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientDisconnect (499, which nobody reads) as soon as the client goes
    away, ``work`` then cancelled: uvicorn does not cancel a request whose client left, and the
    request would otherwise wait out its timeout for an answer nobody reads."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the request's own timeout, or a stop: the work ends with it
        task.cancel()
        gone.cancel()
        await asyncio.wait({task, gone})
        if not task.cancelled():
            task.exception()  # seen: it was cancelled into whatever it raised
        raise
    gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
    raise ClientDisconnect()


class Gateway:
    """The routes' shared state: the clients, the settings, the cached queue depth and model.

    Three clients, for three lifetimes: ``client`` for the TEI routes (jobs with the request
    timeout as deadline, results kept ``answer_ttl``), ``runs`` for ``POST /runs`` on the same
    connections (no deadline, results kept the client's ``result_ttl``), ``streams`` with a pool
    of its own, one connection per open stream (``max_streams``)."""

    def __init__(self, client: AsyncClient, settings: GatewaySettings, runs: AsyncClient | None = None,
                 streams: AsyncClient | None = None):
        self.client = client
        self.runs = runs or client
        self.streams = streams or client
        self.settings = settings
        self.streams_open = 0
        self.metrics = Metrics()
        #: The static map (QUEUEBERT_MODELS): ValueError here for a bad one.
        self.declared = parse_model_map(settings.models)
        #: Queue depths by queue; queues come from the catalog (the map, the workers, the default),
        #: never from a request, so this holds as many entries as there are queues.
        self._depths: dict[str, Cached[int]] = {}
        self._catalog = Cached(self._read_catalog, MODEL_EVERY,
                               short=lambda c: c.served(c.default_queue) is None, short_every=MODEL_RETRY_EVERY)
        self._without: set[str] | None = None  # names without a live worker at the last read (for logs)
        self._refreshing: asyncio.Task[Any] | None = None
        self.metrics.registry.register(ModelsCollector(self))
        #: Requests waiting for results, answered 503 just before a stop would cut them off.
        self._waiting: set[asyncio.Future[Any]] = set()
        self._cut = False

    def begin_stop(self) -> None:
        """A stop signal arrived (in the event loop's thread): requests still waiting for results
        when the stop's grace is nearly over get a 503 (retry elsewhere) instead of a dropped
        connection. Like any request that ends unanswered, they release their jobs: one still
        queued is dropped (the retry makes its own; nobody could read this one's answer)."""
        asyncio.get_running_loop().call_later(max(0.0, self.settings.stop_timeout - 1.0), self._cut_waiting)

    def _cut_waiting(self) -> None:
        self._cut = True
        for waiting in list(self._waiting):
            waiting.cancel()

    # -- shared checks ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def within(self, seconds: float, error: Callable[[], tei.TEIError]) -> AsyncIterator[None]:
        """Bounds what runs inside to ``seconds``, then raises ``error()``. Each Redis command has a
        socket timeout, but its retries (which ride out a restart) take it past any request's
        timeout on a frozen Redis: the bound is the request's, over all of them."""
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise error() from None

    async def queue_depth(self, queue: str | None = None) -> int:
        queue = queue or self.settings.queue
        cached = self._depths.get(queue)
        if cached is None:
            cached = self._depths[queue] = Cached(lambda: self._read_depth(queue), DEPTH_EVERY)
        return await cached.get()

    async def _read_depth(self, queue: str) -> int:
        return int(await self.client.connection.llen(Queue.redis_queue_namespace_prefix + queue))

    async def admit(self, queue: str | None = None) -> None:
        """429 while the queue is deeper than allowed: the caller retries later (Retry-After)."""
        limit = self.settings.max_queue_depth
        if limit and await self.queue_depth(queue) >= limit:
            raise tei.overloaded()

    async def catalog(self) -> Catalog:
        """The models served and their queues (cached for MODEL_EVERY seconds, MODEL_RETRY_EVERY
        while the default queue has no live worker); 503 when Redis does not answer within
        ``redis_timeout``."""
        async with self.within(self.settings.redis_timeout, tei.redis_unavailable):
            return await self._catalog.get()

    @property
    def last_catalog(self) -> Catalog | None:
        return self._catalog.last

    def refresh_soon(self) -> None:
        """Read the catalog in the background if it is stale (for /metrics, which must answer at
        once whatever Redis does: it is the gateway's probe)."""
        if self._refreshing is None or self._refreshing.done():
            async def refresh() -> None:
                with contextlib.suppress(Exception):
                    await self.catalog()

            self._refreshing = asyncio.ensure_future(refresh())

    async def target(self, name: str | None) -> Target:
        """Where a request naming model ``name`` goes (None: the default model); ModelError for a
        name that is malformed or not served here."""
        return (await self.catalog()).resolve(name)

    async def served(self) -> tuple[tei.ModelInfo, int] | None:
        """The model the default queue's workers say they serve, and how many do."""
        return (await self.catalog()).served(self.settings.queue)

    async def _read_catalog(self) -> Catalog:
        """On the client's own connection: every worker RQ registers, then the queues and model
        fields each publishes (a worker whose hash expired gives none and is left out)."""
        conn = self.client.connection
        worker_keys = await conn.smembers(worker_registration.REDIS_WORKER_KEYS)
        fields = ("queues", *keys.WORKER_MODEL_FIELDS)
        async with conn.pipeline(transaction=False) as pipe:
            for key in worker_keys:
                pipe.hmget(key, *fields)
            rows = await pipe.execute()
        catalog = build_catalog([dict(zip(fields, row)) for row in rows], self.declared, self.settings.queue)
        without = set(catalog.without_workers())
        if without != self._without:  # one line per change, not one per read
            log.info("models without a live worker", models=sorted(without), served=sorted(catalog.entries))
            self._without = without
        return catalog

    async def results(self, handles: list[Any]) -> list[ItemResult]:
        """Every handle's result, or 504 once ``request_timeout`` has passed (the jobs carry the
        same deadline, so none of them runs late for nobody). Its caller, :meth:`submit`, bounds
        the whole request by that timeout; each handle also gives up after it."""
        timeout = self.settings.request_timeout
        waits = [asyncio.ensure_future(h.result(timeout=timeout)) for h in handles]
        waiting = asyncio.gather(*waits)
        self._waiting.add(waiting)
        try:
            got = await waiting
        except TimeoutError:
            raise tei.timed_out(timeout) from None
        except asyncio.CancelledError:
            if self._cut:
                raise tei.stopping() from None
            raise
        finally:
            self._waiting.discard(waiting)
            for wait in waits:  # one failed: the others stop waiting too
                wait.cancel()
        if any(r is None for r in got):
            raise tei.timed_out(timeout)
        return got

    async def submit(self, request: Request, items: tuple[Any, ...] | list[Any], route: str, options: JobOptions,
                     queue: str | None = None) -> list[ItemResult]:
        """One input through the coalescing ``submit``; several as one job of their own, to
        ``queue`` (the model's; None: the default). Admission, enqueue and results together take at
        most ``request_timeout`` (504), whatever Redis does; a client that goes away meanwhile ends
        it at once (its queued work dropped, see :meth:`_submit`). A queue no worker serves holds
        the jobs until one starts (scale from zero) or the timeout passes."""
        timeout = self.settings.request_timeout
        async with self.within(timeout, lambda: tei.timed_out(timeout)):
            return await _unless_disconnected(request, self._submit(items, route, options,
                                                                    queue or self.settings.queue))

    async def _submit(self, items: tuple[Any, ...] | list[Any], route: str, options: JobOptions,
                      queue: str) -> list[ItemResult]:
        await self.admit(queue)
        self.metrics.items.labels(route).inc(len(items))
        handles = await self._enqueue(items, options, queue)
        try:
            return await self.results(handles)
        finally:
            # The answer is in hand, or nobody waits for it any more (504, the client gone, a
            # stop): what only this request needed leaves Redis; a job still queued that no
            # other request shares is dropped unstarted.
            self.client.release(handles)

    async def _enqueue(self, items: tuple[Any, ...] | list[Any], options: JobOptions, queue: str) -> list[AsyncHandle]:
        if len(items) == 1:
            # Cancelled while its item gathers or is being sent, the coalescer drops it itself.
            return [await self.client.submit(dict(items[0]), queue=queue, **options.as_fields())]
        sending = asyncio.ensure_future(self.client.submit_many([dict(i) for i in items], chunk_size=len(items),
                                                                queue=queue, **options.as_fields()))
        try:
            return await asyncio.shield(sending)
        except asyncio.CancelledError:
            sending.add_done_callback(self._release_sent)  # released as soon as they are in
            raise

    def _release_sent(self, sending: asyncio.Future[list[AsyncHandle]]) -> None:
        """The handles of a request that ended while its jobs were being enqueued."""
        if not sending.cancelled() and sending.exception() is None:
            self.client.release(sending.result())

    # -- TEI routes ---------------------------------------------------------------------------------

    async def _body(self, request: Request) -> Any:
        """The JSON body of a TEI route, never more than ``max_body_bytes`` of it held: a larger
        Content-Length is refused before a byte is read, a chunked body once it passes the limit;
        the whole body must arrive within ``body_timeout``."""
        tei.check_content_type(request.headers.get("content-type"))
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise tei.too_large(declared, limit)
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout), contextlib.aclosing(request.stream()) as chunks:
                async for chunk in chunks:
                    body += chunk
                    if len(body) > limit:
                        raise tei.too_large(f"more than {len(body)}", limit)
        except TimeoutError:
            raise BodyTimeout(f"the body did not arrive within {self.settings.body_timeout:g} s") from None
        return tei.decode_body(bytes(body))

    async def _paced(self, request: Request) -> AsyncIterator[bytes]:
        """A streamed body's chunks, each within ``body_timeout`` of asking for it (so time spent in
        the gateway's own backpressure, not asking, never counts against the client)."""
        chunks = request.stream()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.settings.body_timeout):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise BodyTimeout(f"the body paused for more than {self.settings.body_timeout:g} s") from None
                yield chunk
        finally:
            await chunks.aclose()

    @staticmethod
    def _named(request: Request, body: Any) -> Any:
        """The model a TEI request names: its body's ``model`` field (TEI's request types have none,
        and serde ignores unknown fields, so TEI clients that send one lose nothing), else the
        ``Queuebert-Model`` header; None: the default model. Checked where it is resolved."""
        if isinstance(body, dict) and body.get("model") is not None:
            return body["model"]
        return request.headers.get(MODEL_HEADER)

    async def _labels(self, target: Target) -> tuple[str, ...] | None:
        """The labels of ``target``'s model by id (for TEI's order of ties), read again if no
        worker had published them when the request came (it was at zero: one has since)."""
        served = target.served or (await self.catalog()).served(target.queue)
        return served[0].labels if served else None

    async def predict(self, request: Request) -> Response:
        body = await self._body(request)
        parsed = tei.parse_predict(body, max_client_batch_size=self.settings.max_client_batch_size)
        target = await self.target(self._named(request, body))
        return await self._predict(request, parsed, "/predict", target)

    async def _predict(self, request: Request, parsed: tei.PredictRequest, route: str, target: Target) -> Response:
        results = await self.submit(request, parsed.items, route, parsed.options, target.queue)
        return JSONResponse(tei.predict_response(parsed, results, await self._labels(target)))

    async def rerank(self, request: Request) -> Response:
        """TEI's ``/rerank`` (``texts``), or Infinity's (``documents``: :meth:`infinity_rerank`)."""
        body = await self._body(request)
        if peers.is_infinity_rerank(body):
            return await self._peer(peers.infinity_refusal, "/rerank", self._infinity_rerank(request, body, "/rerank"))
        target = await self.target(self._named(request, body))
        parsed = tei.parse_rerank(body, max_client_batch_size=self.settings.max_client_batch_size, model=target.info)
        return await self._rerank(request, parsed, "/rerank", target)

    async def _rerank(self, request: Request, parsed: tei.RerankRequest, route: str, target: Target) -> Response:
        results = await self.submit(request, parsed.items, route, parsed.options, target.queue)
        return JSONResponse(tei.rerank_response(parsed, results))

    async def root(self, request: Request) -> Response:
        body = await self._body(request)
        target = await self.target(self._named(request, body))
        parsed = tei.parse_root(body, max_client_batch_size=self.settings.max_client_batch_size, model=target.info)
        if isinstance(parsed, tei.RerankRequest):
            return await self._rerank(request, parsed, "/", target)
        return await self._predict(request, parsed, "/", target)

    async def health(self, request: Request) -> Response:
        """Whether this gateway can take requests: 200 while Redis answers, with a JSON body that
        says which models have no live worker; TEI's 503 when Redis does not answer within
        ``redis_timeout`` (a load balancer's probe must not hang on a frozen Redis).

        A model with no live worker does not make the gateway unhealthy when the static map names
        it (``QUEUEBERT_MODELS``): its workers scale to zero on purpose, its requests queue until one
        starts, and a gateway that left its Service for it would never receive the request that
        scales it up. Only the default model, when the map does not name its queue, keeps TEI's
        meaning (503 until a worker serves it), as a single-model gateway always had.
        ``?model=NAME`` asks about one model: 503 while none of its workers is live, 404 for a
        name not served here."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout):
                await self.client.connection.ping()
                catalog = await self.catalog()
        except Exception:  # noqa: BLE001 - whatever failed, the answer is "not healthy"
            raise tei.unhealthy() from None
        asked = request.query_params.get("model")
        if asked is not None:
            target = catalog.resolve(asked)
            if target.served is None:
                raise tei.TEIError.of(tei.UNHEALTHY, f"{tei.UNHEALTHY_MESSAGE}: no live worker serves model "
                                                     f"{json.dumps(target.name)} (queue {target.queue})")
            return JSONResponse({"status": "ok", "model": target.name, "queue": target.queue,
                                 "workers": target.workers})
        default = catalog.default()
        if default.served is None and not catalog.default_expected():
            raise tei.unhealthy()
        return JSONResponse({
            "status": "ok",
            "default_model": default.name,
            "models": {t.name: {"queue": t.queue, "workers": t.workers} for t, _, _ in catalog.listing()},
            "without_workers": sorted({t.name for t, _, _ in catalog.listing() if t.served is None}),
        })

    async def info(self, request: Request) -> Response:
        """TEI's ``/info`` for the default model, or for ``?model=NAME`` (or the header)."""
        target = await self.target(request.query_params.get("model") or request.headers.get(MODEL_HEADER))
        return JSONResponse(tei.info_body(target.served, max_client_batch_size=self.settings.max_client_batch_size,
                                          max_concurrent_requests=self.settings.max_concurrent_requests))

    # -- Infinity's and Cohere's routes -------------------------------------------------------------

    async def _peer(self, refusal: Callable[[Exception, tei.TEIError], tuple[int, dict[str, Any]]], route: str,
                    work: Awaitable[Response]) -> Response:
        """``work``'s response, or its failure in the peer's own error shape (``refusal``: TEI's
        status and words, which :func:`http_error` decides, turned into the peer's body)."""
        try:
            return await work
        except peers.PeerError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, in the peer's shape
            error = http_error(exc, route)
            status, body = refusal(exc, error)
            raise peers.PeerError(status, body) from None

    async def classify(self, request: Request) -> Response:
        """Infinity's ``POST /classify`` (``{"input": [...], "model"?, "raw_scores"?}``)."""
        route = request.url.path

        async def work() -> Response:
            parsed = peers.parse_classify(await self._body(request),
                                          max_client_batch_size=self.settings.max_client_batch_size)
            target = await self.target(parsed.model)
            results = await self.submit(request, parsed.items, route, parsed.options, target.queue)
            return JSONResponse(peers.classify_response(parsed, results, target.name, await self._labels(target)))

        return await self._peer(peers.infinity_refusal, route, work())

    async def infinity_rerank(self, request: Request) -> Response:
        """Infinity's ``POST /v1/rerank`` (its ``/rerank`` under ``--url-prefix /v1``); the
        Cohere v1 shape too. ``POST /rerank`` comes here for a body with ``documents``."""
        route = request.url.path

        async def work() -> Response:
            return await self._infinity_rerank(request, await self._body(request), route)

        return await self._peer(peers.infinity_refusal, route, work())

    async def _infinity_rerank(self, request: Request, body: Any, route: str) -> Response:
        parsed = peers.parse_infinity_rerank(body, max_client_batch_size=self.settings.max_client_batch_size)
        target = await self.target(parsed.model)
        if target.info is not None and not target.info.reranker:
            raise peers.not_a_reranker(target.name, "rerank")
        results = await self.submit(request, parsed.items, route, parsed.options, target.queue)
        try:
            return JSONResponse(peers.infinity_rerank_response(parsed, results, target.name))
        except RerankError:
            raise peers.not_a_reranker(target.name, "rerank") from None

    async def cohere_rerank(self, request: Request) -> Response:
        """Cohere's ``POST /v2/rerank``: ``{"model", "query", "documents", "top_n"?}``."""
        route = request.url.path

        async def work() -> Response:
            parsed = peers.parse_cohere_rerank(await self._body(request),
                                               max_client_batch_size=self.settings.max_client_batch_size)
            target = await self.target(parsed.model)
            not_reranker = peers.cohere_invalid(f"model {json.dumps(target.name)} is not a reranker: it has several "
                                                "labels, a reranker scores with one")
            if target.info is not None and not target.info.reranker:
                raise not_reranker
            results = await self.submit(request, parsed.items, route, parsed.options, target.queue)
            try:
                return JSONResponse(peers.cohere_rerank_response(parsed, results))
            except RerankError:
                raise not_reranker from None

        return await self._peer(peers.cohere_refusal, route, work())

    async def models(self, request: Request) -> Response:
        """``GET /v1/models`` (and ``/models``, Infinity's path without a prefix): every model
        served, with its queue, live workers and queued jobs; a model with no live worker is
        listed with ``workers: 0`` (its requests wait for one)."""
        route = request.url.path

        async def work() -> Response:
            catalog = await self.catalog()
            listing = catalog.listing()
            async with self.within(self.settings.redis_timeout, tei.redis_unavailable):
                depths = await asyncio.gather(*(self.queue_depth(t.queue) for t, _, _ in listing))
            created = int(time.time())
            rows = [peers.model_row(t.name, t.queue, t.info, t.workers, declared=declared, default=default,
                                    queued_jobs=depth, created=created)
                    for (t, declared, default), depth in zip(listing, depths)]
            return JSONResponse(peers.models_response(rows))

        return await self._peer(peers.infinity_refusal, route, work())

    # -- runs ---------------------------------------------------------------------------------------

    async def create_run(self, request: Request) -> Response:
        """A JSONL body, enqueued as one run while it is read (never held whole). Lines are read
        as ``queuebert enqueue`` reads them (:func:`producer.readers.record_from_json_line`), with
        its options as query parameters (``text_field``, ``id_field``, ``text_pair_field``): a bare
        string is a text, other fields go to ``meta``. An unreadable or over-long line is skipped
        and reported. The job options are query parameters too (``top_k``, ``function_to_apply``).

        An upload cut short (the client went away, or paused past ``body_timeout``) keeps what
        arrived. Under a ``run_id`` the client chose, every whole chunk that arrived is written and
        the run stays open: the same body sent again under that id enqueues only the rest and seals
        it, as ``queuebert enqueue --run-id`` does (a part-filled chunk would not line up with the
        retry's chunks, so those few lines wait for the retry). Under an id the gateway made up,
        which that client never learned, the run is sealed with every line that arrived.

        Its jobs have no deadline (a run is read whenever its caller comes for it, not by a request
        that gives up after ``request_timeout``) unless ``?job_ttl=`` asks for one."""
        params = request.query_params
        given = params.get("run_id") or None
        run_id = check_run_id(given) if given is not None else new_id()
        job_ttl = check_job_ttl(params.get("job_ttl"))
        options = query_options(params)
        fields = {"text_field": params.get("text_field") or "text", "id_field": params.get("id_field") or "id",
                  "text_pair_field": params.get("text_pair_field") or None}
        async with self.within(self.settings.request_timeout, tei.redis_unavailable):
            queue = (await self.target(params.get("model") or None)).queue
            await self.admit(queue)
            plan = await self._run_plan(run_id)
        already = plan.resume_from * plan.chunk_size  # items a resumed run lists already (skipped, not sent)
        bad: list[dict[str, Any]] = []
        sent = 0  # items handed to enqueue_stream
        kept = 0  # items it reported written (or skipped as written before)
        cut: BaseException | None = None  # why the upload ended early
        stop_after_write = False

        def written(n: int) -> None:
            nonlocal kept
            kept += n
            if stop_after_write and cut is not None:  # the chunks it held are in Redis now: stop before it seals
                raise cut

        async def lines() -> AsyncIterator[tuple[int, bytes | readers.InputError]]:
            splitter = readers.LineSplitter(self.settings.max_line_bytes)
            async for chunk in self._paced(request):
                for line in splitter.feed(chunk):
                    yield line
            for line in splitter.end():
                yield line

        async def items() -> AsyncIterator[dict[str, Any]]:
            # Items are handed over a whole chunk at a time, so that when the upload is cut,
            # enqueue_stream holds only whole chunks and the part-filled one is still here.
            nonlocal sent, cut, stop_after_write
            held: list[dict[str, Any]] = []
            try:
                async for n, line in lines():
                    item = _jsonl_item(line, n, bad, fields)
                    if item is None:
                        continue
                    held.append(item)
                    if len(held) == plan.chunk_size:
                        for whole in held:
                            sent += 1
                            yield whole
                        held = []
            except (ClientDisconnect, BodyTimeout) as exc:
                cut = exc
            if cut is not None and given is not None:
                if plan.sealed or sent <= max(kept, already):
                    raise cut  # nothing waits to be written
                stop_after_write = True  # enqueue_stream writes what it holds, then written() stops it
                return
            for item in held:
                yield item

        try:
            run = await self.runs.enqueue_stream(items(), run_id=run_id, on_progress=written, job_ttl=job_ttl,
                                                 queue=queue, **options.as_fields())
        except (ClientDisconnect, BodyTimeout) as exc:
            raise self._upload_cut(exc, run_id, kept, sealed=False) from None
        if cut is not None:
            raise self._upload_cut(cut, run_id, run.enqueued, sealed=True)
        self.metrics.items.labels("/runs").inc(run.enqueued - run.skipped)
        return JSONResponse({"run_id": run_id, "enqueued": run.enqueued, "unreadable_lines": bad}, status_code=201)

    async def _run_plan(self, run_id: str) -> jobs.ResumePlan:
        """How ``enqueue_stream`` will continue the run (its chunk size, the jobs it lists, whether
        it is sealed), read as it reads them; a run this body cannot continue is a 409."""
        async with self.client.connection.pipeline(transaction=False) as pipe:
            pipe.get(keys.run_cursor(run_id))
            pipe.hmget(keys.run_meta(run_id), *jobs.RESUME_FIELDS)
            raw_cursor, stored = await pipe.execute()
        return jobs.resume_plan(self.runs.settings, run_id, raw_cursor, stored, None, None, log)

    def _upload_cut(self, why: BaseException, run_id: str, kept: int, *, sealed: bool) -> BaseException:
        """What to raise for an upload cut short, once what arrived is kept: the disconnect (499,
        which nobody reads) or a 408 that says what was kept and how to send the rest."""
        then = "sealed with them" if sealed else f"send the same body again with run_id={run_id} to enqueue the rest"
        log.warning("upload cut short: kept what arrived", run=run_id, items=kept, sealed=sealed,
                    why="client disconnected" if isinstance(why, ClientDisconnect) else str(why))
        if isinstance(why, BodyTimeout):
            return tei.body_timeout(f"{why}: run {run_id} kept the {kept} items that arrived; {then}")
        return why

    async def _known(self, run_id: str) -> dict[str, int]:
        check_run_id(run_id)
        async with self.within(self.settings.request_timeout, tei.redis_unavailable):
            progress = await self.client.run_progress(run_id)
        if not progress["jobs"] and not progress["sealed"]:
            raise tei.TEIError(404, f"no run {run_id}", "NotFound")
        return progress

    async def run_progress(self, request: Request) -> Response:
        return JSONResponse(await self._known(request.path_params["run_id"]))

    def _open_stream(self, response: Callable[[], Response]) -> Response:
        """``response()``, a result stream, if a stream slot is free (429 if not), holding the slot
        until it ends. A stream waits on Redis (a blocking XREAD) most of the time it is open, so
        each holds a connection of the streams' pool, which has ``max_streams``: with the cap,
        a stream never waits for a connection, and the requests' pool is never touched."""
        limit = self.settings.max_streams
        if self.streams_open >= limit:
            raise tei.streams_full(limit)
        self.streams_open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.streams_open -= 1

        try:
            return _Holding(response(), release)
        except BaseException:
            release()
            raise

    async def run_results(self, request: Request) -> Response:
        """JSONL in input order, each line sent as soon as the results before it are in."""
        run_id = request.path_params["run_id"]
        await self._known(run_id)

        async def lines() -> AsyncIterator[bytes]:
            async for result in self.streams.ordered_results(run_id):
                yield json.dumps(result, ensure_ascii=False).encode() + b"\n"

        return self._open_stream(lambda: StreamingResponse(lines(), media_type="application/x-ndjson"))

    async def run_events(self, request: Request) -> Response:
        """Server-Sent Events, one per item result in completion order. Each event's id is
        ``<stream entry id>/<index in the entry>``: a client that reconnects with Last-Event-ID gets
        exactly the results after that one, also when it dropped in the middle of an entry."""
        run_id = request.path_params["run_id"]
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or ""
        start, entry_id, skip = resume_point(last)
        await self._known(run_id)

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                subscription = self.streams.subscribe(run_id, last_id=start)
                async for stream_id, _job, results in subscription.entries():
                    first = skip if stream_id == entry_id else 0
                    for i, result in enumerate(results[first:], first):
                        yield {"id": f"{stream_id}/{i}", "event": "result",
                               "data": json.dumps(result, ensure_ascii=False)}
                yield {"event": "end", "data": json.dumps(await self.streams.run_progress(run_id))}
            except Exception as exc:  # the status is sent already: say it in an event, then end
                yield {"event": "error", "data": json.dumps(http_error(exc, "/runs/{run_id}/events").body())}

        return self._open_stream(lambda: EventSourceResponse(events(), ping=15))

    async def metrics_page(self, request: Request) -> Response:
        self.refresh_soon()  # the per-model gauge from the catalog as last read; never waits on Redis
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _jsonl_item(line: bytes | readers.InputError, n: int, bad: list[dict[str, Any]],
                fields: dict[str, Any]) -> dict[str, Any] | None:
    """One line of a run's body as an item, or None (blank, or reported in ``bad``, as is a line
    the splitter refused)."""
    if isinstance(line, readers.InputError):
        bad.append({"line": n, "error": str(line)})
        return None
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
    request timeout as their deadline and whose results live ``answer_ttl`` (the TEI routes';
    runs have their own deadline and keep the client's ``result_ttl``)."""
    base = ClientSettings.from_env(redis_url=settings.redis_url, queue=settings.queue)
    # Never shorter than a request may wait: the run's keys must outlive the request reading them.
    answer_ttl = max(settings.answer_ttl, math.ceil(settings.request_timeout))
    client = client or AsyncClient.from_url(settings.redis_url, queue=settings.queue, job_ttl=settings.request_timeout,
                                            result_ttl=answer_ttl, socket_timeout=settings.redis_timeout)
    runs = AsyncClient(client.connection,
                       dataclasses.replace(client.settings, result_ttl=base.result_ttl, job_ttl=None))
    streams = AsyncClient.from_url(settings.redis_url, queue=settings.queue, socket_timeout=settings.redis_timeout,
                                   max_connections=max(1, settings.max_streams))
    gw = Gateway(client, settings, runs=runs, streams=streams)

    def route(path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except peers.PeerError as exc:  # already in the shape of the peer whose route this is
                response = JSONResponse(exc.body, status_code=exc.status, headers=_error_headers(exc.status))
            except Exception as exc:
                error = http_error(exc, path)
                response = JSONResponse(error.body(), status_code=error.status, headers=_error_headers(error.status))
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
        # Infinity's (with and without its common --url-prefix /v1) and Cohere's, with a model named.
        route("/classify", gw.classify, ["POST"]),
        route("/v1/classify", gw.classify, ["POST"]),
        route("/v1/rerank", gw.infinity_rerank, ["POST"]),
        route("/v2/rerank", gw.cohere_rerank, ["POST"]),
        route("/models", gw.models, ["GET"]),
        route("/v1/models", gw.models, ["GET"]),
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
            # Bounded: closing sends nothing (but the deletes of released handles still under way),
            # and a stop must not hang on a Redis that is frozen.
            await asyncio.wait_for(asyncio.gather(client.aclose(), runs.aclose(), streams.aclose()), timeout=5)
        except TimeoutError:
            log.warning("closing the Redis clients timed out at shutdown")

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
    # limit_concurrency answers 503 past that many connections and requests, before the process
    # runs out of file descriptors; idle keep-alive connections close after keep_alive_timeout.
    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on",
                          # uvicorn annotates both as int, and hands them to asyncio's timers,
                          # which take any number of seconds.
                          access_log=False, timeout_graceful_shutdown=settings.stop_timeout,  # type: ignore[arg-type]
                          limit_concurrency=settings.limit_concurrency,
                          timeout_keep_alive=settings.keep_alive_timeout)).run()  # type: ignore[arg-type]
    return 0

