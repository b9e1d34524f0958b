"""Every tunable of queuebert, with its default and its ``QUEUEBERT_*`` environment variable.

Both sides read their settings here so that a flag, its environment variable and its default are
declared once. The worker's settings live here too (as plain data, no torch) because
``rq worker -w worker.BatchWorker`` has no flags of ours: it configures the worker from the
environment alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "QUEUEBERT_"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "default"
#: Seconds results and run bookkeeping are kept (ClientSettings.result_ttl's default; the worker
#: falls back to it for a run whose job keeps its result forever or not at all).
DEFAULT_RESULT_TTL = 86_400
#: Milliseconds a write waits for its replica acknowledgements (``WAIT``) before it counts as not
#: written and is retried: a healthy replica acknowledges within a millisecond on a LAN, so this
#: only bounds how long each attempt waits while too few replicas are connected.
DEFAULT_REPLICA_ACK_TIMEOUT_MS = 1000


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


class SettingError(ValueError):
    """A setting with a value it cannot take: the message names the setting as it was given (an
    environment variable, a keyword argument) and what it accepts, so the fix is in the message.

    ``setting`` is the field's name and ``problem`` the message without it, for a caller (the
    command line) that names the setting its own way (``--chunk-size``)."""

    def __init__(self, setting: str, problem: str, label: str | None = None):
        super().__init__(f"{label or setting} {problem}")
        self.setting = setting
        self.problem = problem
        self.from_env = label == env_name(setting)


def at_least(minimum: float, default: Any = dataclasses.MISSING, *, below: float | None = None,
             default_factory: Any = dataclasses.MISSING) -> Any:
    """A field whose value (when not None) must be at least ``minimum`` (and less than ``below``):
    values that would hang a loop or crash deep inside (``max_pending=-1`` waited forever, a chunk
    size of 0 failed at the first enqueue) are refused when the settings are built, wherever they
    come from (an environment variable, a flag, a keyword argument)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"min": minimum, "below": below})


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
          "": False}


def _coerce(name: str, value: str, kind: Any) -> Any:
    """The value of environment variable ``name`` as its field's type (``kind``, as annotated);
    a value that is not one names the variable and the type expected, instead of int()'s
    ``invalid literal`` that named neither."""
    kind_text = str(kind)
    text = value.strip()
    if "None" in kind_text and text.lower() in {"", "none"}:
        return None
    if "bool" in kind_text:
        # A typo ("ture") read as False switched a feature off without a word.
        if text.lower() not in _BOOLS:
            raise SettingError(name, f"must be one of {', '.join(sorted(k for k in _BOOLS if k))} "
                                     f"(got {value!r})", env_name(name))
        return _BOOLS[text.lower()]
    if "list" in kind_text:
        return [part.strip() for part in value.split(",") if part.strip()]
    for type_name, convert, expected in (("float", float, "a number"), ("int", int, "a whole number")):
        if type_name in kind_text:
            try:
                return convert(text)
            except ValueError:
                raise SettingError(name, f"must be {expected} (got {value!r})", env_name(name)) from None
    return value


def check_setting(cls: type, name: str, value: Any, label: str | None = None) -> None:
    """Refuse ``value`` for setting ``name`` of ``cls`` when it is outside the setting's range
    (declared once, with the field: :func:`at_least`); ``label`` is how the caller named it
    (default: the field's name). The clients check their per-call overrides (``chunk_size=``,
    ``max_pending=``) here too, so a range has one home."""
    spec = cls.__dataclass_fields__[name].metadata  # type: ignore[attr-defined]
    if value is None or "min" not in spec:
        return
    minimum, below = spec["min"], spec["below"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, f"must be a number (got {value!r})", label)
    if value < minimum or (below is not None and value >= below):
        bound = f"at least {minimum:g}" + (f" and below {below:g}" if below is not None else "")
        raise SettingError(name, f"must be {bound} (got {value!r})", label)


class _FromEnv:
    """Mixin: build the settings from ``QUEUEBERT_<FIELD>`` variables, then explicit overrides."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Any:
        environ = dict(os.environ if environ is None else environ)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {}
        # A mixin of dataclasses: cls is one, which typeshed's fields() cannot see through the mixin.
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            raw = environ.get(env_name(f.name))
            if raw is not None and f.name not in overrides:  # an override makes the variable moot
                values[f.name] = _coerce(f.name, raw, f.type)
                check_setting(cls, f.name, values[f.name], env_name(f.name))
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        """Every setting in its range, however the settings were built (``from_env``, the
        constructor, ``dataclasses.replace``)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check_setting(type(self), f.name, getattr(self, f.name))


@dataclass
class ClientSettings(_FromEnv):
    """Producer-side settings."""

    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    #: Items per RQ job for streams: large enough that per-job bookkeeping is negligible, small
    #: enough that a redelivered job repeats little work.
    chunk_size: int = at_least(1, 64)
    #: Backpressure: a stream waits while more than this many of its items are queued and unfinished.
    max_pending: int = at_least(0, 50_000)
    #: Seconds results, run streams and run bookkeeping are kept after they are written.
    result_ttl: int = at_least(1, DEFAULT_RESULT_TTL)
    #: Times a job is retried after its worker died or it failed as a whole.
    retries: int = at_least(0, 3)
    #: RQ job timeout in seconds (the stock worker enforces it; the batching worker uses it for
    #: heartbeats).
    job_timeout: int = at_least(1, 600)
    #: Seconds a job may wait in the queue before it is dropped instead of run late (None: forever).
    job_ttl: float | None = None
    #: Seconds an enqueue waits for a full Redis (OOM at maxmemory) to get room again, backing off,
    #: before it gives up with RedisFull (the run can be resumed with its run id).
    redis_full_timeout: float = at_least(0, 600.0)
    #: Fraction of Redis's ``maxmemory`` a stream leaves free: it waits (as for a full Redis) while
    #: used memory is above the rest. Workers need that room to register and write results; a
    #: stream that filled Redis to the last byte with queued jobs would leave them none. 0: off.
    redis_headroom: float = at_least(0, 0.1, below=1)
    #: Durability: each write waits (``WAIT``) until this many replicas acknowledge it; a write
    #: they do not acknowledge within ``replica_ack_timeout_ms`` counts as not written and is
    #: retried. 0 (default): a write counts once the master has it, and a master lost before it
    #: replicated loses it. See README, "Failover without loss".
    replica_acks: int = at_least(0, 0)
    replica_ack_timeout_ms: int = at_least(1, DEFAULT_REPLICA_ACK_TIMEOUT_MS)
    #: AsyncClient: concurrent ``submit`` calls are gathered for at most this long (milliseconds)
    #: into shared jobs of up to ``chunk_size`` items, each item keeping its own result: a one-text
    #: job costs Redis ~40x what a text in a full job costs. 0: each submit is sent at once.
    coalesce_ms: float = at_least(0, 2.0)
    #: AsyncClient: how long a gathering batch is held at most while a job sent now would only
    #: wait (every worker serving the queue already has a job this client awaits, or the queue
    #: holds unstarted jobs). It is sent earlier, once an awaited result arrives and a worker is
    #: free: under load the requests that arrive during one job then share the next one. Under
    #: closed-loop traffic, also how long after results a batch waits for their submitters to
    #: send again (see ``producer.coalescing``).
    coalesce_max_ms: float = at_least(0, 20.0)
    #: AsyncClient, closed-loop traffic only: while every worker serving the queue already has a
    #: job this client awaits, a gathering batch is held until one of those results arrives, at
    #: most this long (a bound for a job whose worker died): their submitters, about to send
    #: again, then share its job.
    coalesce_hold_ms: float = at_least(0, 1000.0)
    #: AsyncClient: connections its pool opens at most; a caller beyond them waits for one to be
    #: free (up to 20 s) instead of failing. The result listener keeps one, a blocked
    #: subscription holds one while it waits (the gateway's streams have a pool of their own,
    #: ``GatewaySettings.max_streams``).
    max_connections: int = at_least(1, 100)
    #: Runs ``qb:runs`` (the index ``queuebert stats`` lists runs from, newest first) keeps: each
    #: enqueue drops the oldest beyond it, so the index stays bounded whatever the traffic (it
    #: has no TTL; a run's own keys expire by ``result_ttl``). ``stats`` reads the newest 1,000.
    max_indexed_runs: int = at_least(1, 10_000)


@dataclass
class GatewaySettings(_FromEnv):
    """``queuebert serve`` settings: the HTTP gateway (``QUEUEBERT_<FIELD>`` like the others)."""

    redis_url: str = DEFAULT_REDIS_URL
    #: The default model's queue: requests that name no model go here (TEI's routes, unchanged).
    queue: str = DEFAULT_QUEUE
    #: Models named statically, ``name=queue`` entries (comma-separated in ``QUEUEBERT_MODELS``; a
    #: bare ``name`` is its own queue), beside those learned from the workers registered in Redis:
    #: a model whose workers are scaled to zero has no worker to say it exists, so without an
    #: entry here its requests would be refused instead of queued until a worker starts. A name
    #: here is also an alias (it wins over a model id of the same spelling). See producer/catalog.py.
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = at_least(0, 8080, below=65536)
    #: Bearer token every route but /health requires (TEI's --api-key); None: no auth.
    api_key: str | None = None
    #: Seconds a request waits for its results before 504; the jobs of the TEI routes carry it as
    #: their deadline (a ``POST /runs`` run has none unless its caller asks, ``?job_ttl=``).
    request_timeout: float = 30.0
    #: Seconds what a TEI request leaves in Redis (its job with the input texts, results, run
    #: bookkeeping) lives at most: the result TTL of those jobs. A delivered answer's keys are
    #: deleted as it is sent (its run's meta hash stays this long as a one-field tombstone, so a
    #: late duplicate completion cannot bring the run back); this bounds what an answer never
    #: delivered leaves (504, a client gone while a worker computed it, a gateway killed). At least
    #: ``request_timeout``. ``POST /runs`` keeps the client's ``result_ttl`` (24 h): its caller
    #: reads the results whenever it likes.
    answer_ttl: int = at_least(1, 300)
    #: Seconds one Redis command of the gateway may take before its socket gives up on it (each
    #: retry gets as long again), and the longest ``/health`` and ``/info`` wait for Redis before
    #: 503: a frozen Redis (SIGSTOP, a stalled host) fails fast instead of holding requests for
    #: minutes. Blocking reads block for less than this (see ``producer.async_client``).
    redis_timeout: float = 5.0
    #: Jobs queued beyond which requests get 429 with Retry-After (0: no limit).
    max_queue_depth: int = at_least(0, 10_000)
    #: Inputs per /predict or /rerank request (TEI's --max-client-batch-size).
    max_client_batch_size: int = at_least(0, 32)
    #: What /info reports as TEI's max_concurrent_requests (the gateway itself has no fixed limit).
    max_concurrent_requests: int = 512
    #: Largest JSON body accepted by the TEI routes (TEI's --payload-limit): a larger declared
    #: Content-Length is refused (413) before any of the body is read, a chunked body as soon as
    #: it passes the limit. /runs streams any size.
    max_body_bytes: int = at_least(1, 2_000_000)
    #: Longest line of a ``POST /runs`` body: a longer one is skipped and reported in
    #: ``unreadable_lines`` (its bytes dropped as they arrive), so one line cannot fill the memory.
    max_line_bytes: int = at_least(1, 1_000_000)
    #: Seconds a client may take to send a TEI route's whole body, and the longest a ``POST /runs``
    #: body may pause between chunks (the gateway's own backpressure waits do not count): a
    #: slow or stalled upload then gets 408 and frees its connection instead of holding it forever.
    body_timeout: float = 30.0
    #: Connections and requests at once (uvicorn's ``limit_concurrency``) beyond which a new
    #: request gets 503 at once: keeps the process below its file-descriptor limit (often 1,024,
    #: with up to ``max_connections`` + ``max_streams`` Redis connections of its own). Raise it
    #: with ``ulimit -n``.
    limit_concurrency: int | None = at_least(1, 800)
    #: Result streams (``GET /runs/{id}/events`` and ``/runs/{id}/results``) open at once. Each
    #: holds one Redis connection of a pool of this size, separate from the requests' pool
    #: (``max_connections``), so streams, however idle or many, never take a connection from the
    #: TEI routes or /health; a stream past it gets 429 at once (TEI's answer when no request
    #: permit is free) with Retry-After. 0: no streams.
    max_streams: int = at_least(0, 64)
    #: Seconds an idle keep-alive connection is kept open (uvicorn's ``timeout_keep_alive``).
    keep_alive_timeout: float = 5.0
    #: Seconds a stopping gateway lets requests in flight finish before it closes their
    #: connections (uvicorn's ``timeout_graceful_shutdown``); those still waiting then get 503
    #: (retry elsewhere), their jobs dropped if still queued. Keep it below the orchestrator's grace.
    stop_timeout: float = 10.0


@dataclass
class WorkerSettings(_FromEnv):
    """Worker-side settings; ``queuebert worker`` flags override them."""

    redis_url: str = DEFAULT_REDIS_URL
    queues: list[str] = field(default_factory=lambda: [DEFAULT_QUEUE])
    model: str = "queuebert/sentiment-minilm"
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    #: Rows per forward batch. None: by device (64 on a CPU, 512 on CUDA, where the token budget
    #: bounds all but the shortest texts; see worker.engine.default_batch_size).
    max_batch_size: int | None = at_least(1, None)
    #: Padded tokens per forward batch (rows x longest row): bounds memory and keeps batches
    #: of long texts small and batches of short texts large. None: by device (see Engine).
    max_batch_tokens: int | None = at_least(1, None)
    #: After the first job arrives, wait at most this long for more to pool.
    max_wait_ms: float = at_least(0, 5.0)
    #: On CUDA, launch the next batch before waiting for the current one's logits (worker.compute).
    #: Off: one batch at a time, as on a CPU (to compare the two on one device, or to rule it out).
    overlap: bool = True
    #: Items waiting in the worker's length-sorted pool, which each batch is cut from: seconds of
    #: work, so sorting has plenty to sort (padding ~1.04x on mixed texts), yet a worker never holds
    #: so much of a short burst that other workers idle (at 4,096, one worker took a whole
    #: 2,000-text stream and 2 workers ran slower than 1).
    #: None: four batches' worth, at least 1,024 (1,024 on a CPU, 2,048 on CUDA).
    max_pool_items: int | None = at_least(1, None)
    #: Jobs taken per Redis round trip.
    take_jobs: int = at_least(1, 256)
    #: Texts longer than this (characters) get an error result instead of a tokenizer stall.
    max_text_chars: int = at_least(1, 200_000)
    #: Jobs with more items than this fail as a whole with a clear message.
    max_items_per_job: int = at_least(1, 10_000)
    #: Seconds: how often executions are heartbeated and abandoned jobs looked for; a killed
    #: worker's jobs are recovered within 3-4 times this (its executions live 3 intervals; the
    #: next maintenance pass, at most one interval later, requeues them). 2 s: 6-8 s, well inside
    #: the gateway's 30 s request timeout (at 10 s, 30-40 s: past it, and those requests got 504),
    #: for a few small Redis commands per worker every 2 s.
    heartbeat_interval: int = at_least(1, 2)
    #: Seconds a stopping worker gives Redis, once its batch in progress is done, to take the
    #: results it computed, the jobs it gives back and its deregistration. What Redis has not
    #: taken by then (Redis gone, frozen or refusing writes) stays in the started registry, where
    #: any worker recovers it, as a killed worker's. With the batch in progress, this bounds a
    #: stop: keep it below the orchestrator's grace period (Kubernetes: 30 s).
    stop_timeout: float = at_least(0, 15.0)
    #: Durability (as ClientSettings): each write waits (``WAIT``) until this many replicas acknowledge it; a write
    #: they do not acknowledge within ``replica_ack_timeout_ms`` counts as not written and is
    #: retried. 0 (default): a write counts once the master has it, and a master lost before it
    #: replicated loses it. See README, "Failover without loss".
    replica_acks: int = at_least(0, 0)
    replica_ack_timeout_ms: int = at_least(1, DEFAULT_REPLICA_ACK_TIMEOUT_MS)
    burst: bool = False
    log_format: str = "auto"
    log_level: str = "info"
    #: Prometheus metrics, and the worker's probes (``/livez``, ``/readyz``: worker/probes.py), on
    #: this port. None: neither is served.
    metrics_port: int | None = at_least(0, None, below=65536)
    #: Seconds without a heartbeat after which ``/livez`` fails (while the heartbeat thread is not
    #: riding out a Redis error, which is weather, not a hang): a thread blocked that long, e.g. on
    #: a Redis that stopped answering mid-command, is worth a restart. Keep it well above
    #: ``heartbeat_interval``.
    liveness_timeout: float = 30.0
    name: str | None = None
    #: Worker processes per device, supervised together. One interpreter's CPU path (decode,
    #: tokenize, collate, score, serialise) cannot keep a fast GPU busy, and the GIL caps it however
    #: many cores the host has; several processes feed one device the way several replicas per GPU
    #: do in other servers. Each holds its own copy of the model in the device's memory.
    workers_per_device: int = at_least(1, 1)

    @property
    def stop_grace(self) -> float:
        """Seconds a parent waits for a stopping worker process before killing it: the worker's
        own bound for Redis (``stop_timeout``) plus 10 s for its batch in progress and its exit."""
        return self.stop_timeout + 10.0


@dataclass
class ExporterSettings(_FromEnv):
    """``queuebert exporter``: queue depth in items for an autoscaler (``QUEUEBERT_<FIELD>``).

    One small process per Redis (not per worker: workers scaled to zero export nothing, and that is
    exactly when the autoscaler must see the queue fill).
    """

    redis_url: str = DEFAULT_REDIS_URL
    #: Queues always exported, at 0 while empty or not yet created (an autoscaler's query then
    #: has a value to read before the first job); every other queue RQ knows of is exported too.
    queues: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = at_least(0, 9180, below=65536)
    #: Jobs per queue whose item counts a scrape reads one by one (about 2 us of Redis time each);
    #: the items of jobs beyond them are estimated from ``depth_sample`` of them
    #: (``queuebert_queue_items_estimated`` is then 1).
    depth_scan: int = at_least(1, 1000)
    depth_sample: int = at_least(0, 100)
    #: Seconds a scrape waits for Redis before it answers without the queue series (and
    #: ``queuebert_exporter_redis_up`` 0): a scrape must not hang on a frozen Redis.
    redis_timeout: float = 5.0
