"""Everything queuebert relies on in RQ and redis-py beyond their documented API, in one place.

When either project releases, this module (and ``tests/test_upstream.py``, which checks each
assumption against the installed versions) is what an upgrade is checked against; pyproject.toml
bounds both packages below their next major release for this reason. It relies on:

RQ 3 (``rq.worker.base.BaseWorker``, ``rq.job.Job``)
- ``worker._ordered_queues``: the queue order RQ's own dequeue and maintenance use; set beside
  ``worker.queues`` when the batching worker rebuilds its queues with the JSON serializer.
- ``worker._shutdown_requested_date``: set on a warm stop, as RQ's own signal handler does, so
  ``rq info`` and ``set_shutdown_requested_date`` see it.
- ``worker._exc_handlers``: the exception handlers RQ's maintenance passes to registry cleanup.
- ``worker.pubsub_channel_name`` and ``worker.handle_payload``: RQ's command channel
  (``rq shutdown``, ``send_shutdown_command``), read by :class:`CommandListener` instead of RQ's
  ``subscribe``/``unsubscribe``.
- ``job._result`` and ``job._status``: set before ``handle_job_success`` as RQ's ``perform`` does.
- ``job._success_callback_name`` (and ``_failure_``, ``_stopped_``): the callback a job hash names,
  which ``queuebert.job`` checks before RQ's public properties import it.
- The attributes ``Job.__init__`` sets (:data:`RQ_JOB_ATTRIBUTES`): the job model the fast path
  (``worker/lua/complete.lua``) is written for. An attribute outside it is a newer RQ's feature,
  whose meaning the fast path cannot know (:func:`unknown_job_attributes`).

redis-py 7-8 (``redis.client``, ``redis.sentinel``)
- ``Redis._send_command_parse_response(conn, command_name, *args, **options)``: one command's
  round trip inside redis-py's retry loop (:class:`CommandHooks`).
- ``Pipeline._execute_pipeline(connection, commands, raise_on_error)`` and
  ``Pipeline._execute_transaction(...)``: a pipeline's round trip (:class:`PipelineHooks`).
- ``SentinelManagedConnection.connect_to(address)``,
  ``AbstractConnection.connect_check_health(check_health, retry_socket_connect)`` (redis-py 7
  and later) and ``AbstractConnection._sock``: where a sentinel-managed connection (re)connects,
  and whether it is connected (:class:`SentinelConnectionHooks`).

:func:`check_redis_hooks` checks that each method the hook classes rename exists with the
parameters they pass; queuebert.connection calls it before building a client that uses them, so
a release that moves one fails loudly there instead of silently skipping an override (replica
acknowledgements that are never waited for, say).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
import structlog
from redis.client import Pipeline
from redis.connection import AbstractConnection
from redis.sentinel import SentinelManagedConnection

log = structlog.get_logger(__name__)


class UpstreamChanged(ImportError):
    """An installed RQ or redis-py lacks a name queuebert relies on (see this module's docstring)."""


def _require(owner: type, name: str, params: Sequence[str]) -> None:
    method = getattr(owner, name, None)
    if method is None:
        raise UpstreamChanged(f"{owner.__module__}.{owner.__qualname__}.{name} is gone in this release: "
                              "queuebert.upstream needs updating for it")
    found = list(inspect.signature(method).parameters)
    if found[1:1 + len(params)] != list(params):
        raise UpstreamChanged(f"{owner.__module__}.{owner.__qualname__}.{name} now takes {found[1:]}, not "
                              f"{list(params)}: queuebert.upstream needs updating for it")


# -- redis-py: the private steps queuebert.connection extends ------------------------------------

@functools.cache
def check_redis_hooks() -> None:
    """Raise :class:`UpstreamChanged` unless the installed redis-py has each private method the
    hook classes below rename, with the parameters they pass. Called where a client that uses
    them is built (replica acknowledgements, sentinels), not at import: a producer that uses
    neither keeps working on a redis-py that moved them."""
    _require(redis.Redis, "_send_command_parse_response", ("conn", "command_name"))
    _require(Pipeline, "_execute_pipeline", ("connection", "commands", "raise_on_error"))
    _require(Pipeline, "_execute_transaction", ("connection", "commands", "raise_on_error"))
    _require(SentinelManagedConnection, "connect_to", ("address",))
    _require(AbstractConnection, "connect_check_health", ("check_health", "retry_socket_connect"))


# What CommandHooks is mixed into, for the type checker: its super() is a redis.Redis (or Pipeline).
if TYPE_CHECKING:
    _CommandHooksBase = redis.Redis
else:
    _CommandHooksBase = object


class CommandHooks(_CommandHooksBase):
    """Mixin for a ``redis.Redis`` (or ``Pipeline``) subclass: :meth:`send_and_parse` is redis-py's
    ``_send_command_parse_response``, the one step every single command takes inside redis-py's
    retry loop."""

    def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        return self.send_and_parse(conn, command_name, *args, **options)

    def send_and_parse(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        return super()._send_command_parse_response(conn, command_name, *args, **options)


class PipelineHooks(Pipeline):
    """``Pipeline`` whose two private round trips are overridable as :meth:`run_pipeline` and
    :meth:`run_transaction` (both inside redis-py's retry loop)."""

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        return self.run_pipeline(connection, commands, raise_on_error)

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        return self.run_transaction(connection, commands, raise_on_error)

    def run_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        return super()._execute_pipeline(connection, commands, raise_on_error)

    def run_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        return super()._execute_transaction(connection, commands, raise_on_error)


class SentinelConnectionHooks(SentinelManagedConnection):
    """redis-py's sentinel-managed connection with its two connect steps overridable:
    :meth:`connect_to_address` (``connect_to``: ``connect()`` has an address fresh from the
    sentinels) and :meth:`reconnect` (``connect_check_health``: every other (re)connect, a
    command's retries included). :meth:`open_socket` is the plain connection's connect."""

    def connect_to(self, address: tuple[str, int]) -> None:
        self.connect_to_address(address)

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        self.reconnect(check_health, retry_socket_connect)

    def connect_to_address(self, address: tuple[str, int]) -> None:
        super().connect_to(address)

    def reconnect(self, check_health: bool, retry_socket_connect: bool) -> None:
        self.open_socket(check_health, retry_socket_connect)

    def open_socket(self, check_health: bool, retry_socket_connect: bool) -> None:
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)

    @property
    def has_socket(self) -> bool:
        return self._sock is not None


# -- redis-py pub/sub: RQ's command channel --------------------------------------------------------

class CommandListener:
    """Reads an RQ worker's command channel (``rq shutdown``, ``send_stop_job_command``...) in a
    thread of queuebert's, in place of RQ's ``subscribe``/``unsubscribe``.

    RQ reads it through redis-py's ``PubSubWorkerThread`` with a 60 s read timeout; from redis-py
    8.2 that thread's ``stop()`` joins it, so every worker exit waited out the read (53-59 s for an
    idle worker). This listener reads with a short timeout (a ``select`` ten times a second: no
    Redis command, a few microseconds of CPU), stops by a flag, waits at most ``join_s`` for its
    thread, and closes its connection without a round trip, so a stop takes about a tenth of a
    second with Redis fine, and at most ``join_s`` with Redis down or frozen. A command that fails to parse
    or a dropped connection is logged and the listener goes on: only a stop ends it. Once Redis is
    back, redis-py resubscribes on reconnect.
    """

    POLL_S = 0.1
    RETRY_S = 2.0

    def __init__(self, connection: redis.Redis, channel: str, handler: Callable[[dict[str, Any]], None]):
        self.connection = connection
        self.channel = channel
        self.handler = handler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None

    def start(self) -> None:
        """Subscribe (a Redis call: a ``RedisError`` reaches the caller, which may retry) and start
        the reading thread."""
        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(**{self.channel: self.handler})
        except BaseException:
            pubsub.close()
            raise
        self._pubsub = pubsub
        self._thread = threading.Thread(target=self._run, name="qb-commands", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pubsub = self._pubsub
        while not self._stop.is_set():
            try:
                pubsub.get_message(timeout=self.POLL_S)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("worker command channel: read failed, retrying", channel=self.channel,
                            error=f"{type(exc).__name__}: {exc}", retry_in_s=self.RETRY_S)
                self._stop.wait(self.RETRY_S)

    def stop(self, join_s: float = 2.0) -> None:
        """Stop reading; returns within about ``join_s`` seconds. Safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(join_s)
        if thread.is_alive():
            # Stuck in a reconnect to a Redis that is gone: a daemon thread, it ends with the process.
            return
        try:
            self._pubsub.close()  # disconnects: Redis drops the subscription with the connection
        except Exception as exc:
            log.debug("closing the command channel", error=str(exc))


# -- RQ: worker and job internals ------------------------------------------------------------------

def set_worker_queues(worker: Any, queues: list[Any]) -> None:
    """Replace a worker's queues, and the order RQ's own dequeue and maintenance walk them in."""
    worker.queues = queues
    worker._ordered_queues = queues[:]


def ordered_queues(worker: Any) -> list[Any]:
    return list(worker._ordered_queues)


def note_shutdown_requested(worker: Any) -> None:
    """What RQ's own stop-signal handler records before a warm stop."""
    from rq.utils import now

    worker._shutdown_requested_date = now()


def exception_handlers(worker: Any) -> list[Callable[..., Any]]:
    return worker._exc_handlers


def callback_name(job: Any, kind: str) -> str | None:
    """The name a job hash gives its ``kind`` ("success", "failure", "stopped") callback, read
    without importing it (RQ's public ``success_callback`` imports it)."""
    return getattr(job, f"_{kind}_callback_name")


def set_job_finished(job: Any, result: Any) -> None:
    """A job's result and status as RQ's ``Job.perform`` leaves them, before ``handle_job_success``."""
    from rq.job import JobStatus

    job._result = result
    job._status = JobStatus.FINISHED


#: The attributes RQ 3.0's ``Job.__init__`` sets: the job model that the fast path's completion
#: (``worker/lua/complete.lua``) and ``worker.rq_completion.RQ_FEATURES`` are written for.
RQ_JOB_ATTRIBUTES = frozenset({
    "_args", "_cached_result", "_data", "_dependency_ids", "_exc_info", "_failure_callback",
    "_failure_callback_name", "_failure_callback_timeout", "_func_name", "_id", "_instance", "_kwargs",
    "_result", "_status", "_stopped_callback", "_stopped_callback_name", "_stopped_callback_timeout",
    "_success_callback", "_success_callback_name", "_success_callback_timeout", "_unreadable_meta",
    "allow_dependency_failures", "connection", "created_at", "description", "ended_at", "enqueue_at_front",
    "enqueue_at_front_on_retry", "enqueued_at", "failure_ttl", "group_id", "last_heartbeat", "log", "meta",
    "number_of_retries", "origin", "rate_limit_concurrency", "rate_limit_key", "redis_server_version",
    "repeat_intervals", "repeats_left", "result_ttl", "retries_left", "retry_intervals", "serializer",
    "started_at", "timeout", "ttl", "webhooks", "worker_name",
})


def unknown_job_attributes() -> frozenset[str]:
    """Attributes the installed RQ's ``Job`` has beyond :data:`RQ_JOB_ATTRIBUTES`: a newer RQ's
    features. Read off a job built in memory (no Redis call), not off RQ's source."""
    from rq.job import Job

    client = redis.Redis()  # never connects: building a Job sends no command
    try:
        return frozenset(vars(Job(connection=client))) - RQ_JOB_ATTRIBUTES
    finally:
        client.close()


__all__ = [
    "CommandHooks", "CommandListener", "PipelineHooks", "RQ_JOB_ATTRIBUTES", "SentinelConnectionHooks",
    "UpstreamChanged", "callback_name", "check_redis_hooks", "exception_handlers", "note_shutdown_requested",
    "ordered_queues", "set_job_finished", "set_worker_queues", "unknown_job_attributes",
]
