"""Redis errors are weather: each worker thread that meets one backs off, says so once per interval,
and carries on when Redis accepts its commands again.

An error reply (``-OOM`` at ``maxmemory``, ``-READONLY`` from a demoted master, a script error, a
timeout, a dropped connection) is not a bug in the worker, and a worker that dies of it loses the
results it computed and leaves a half-alive process behind. :class:`Outage` is the one place that
decides how long a thread waits, what it logs (one line when the trouble starts, one per interval
while it lasts, one when it ends: never a traceback per attempt) and what the worker exposes (a
metric, and a field of its RQ worker hash that ``queuebert stats`` shows).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
import structlog

log = structlog.get_logger(__name__)


def error_kind(exc: BaseException) -> str:
    """A short, stable name for the error, for metrics and ``queuebert stats``."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "oom"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "readonly"
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError):
        return "connection"
    if isinstance(exc, redis.exceptions.NoPermissionError | redis.AuthenticationError):
        return "permission"
    return "error"


class Outage:
    """One component's trouble with Redis (taking, completing, heartbeats, maintenance).

    ``failed`` records an attempt that failed and returns how long to wait before the next one
    (exponential, ``base`` to ``cap`` seconds); ``recovered`` ends the spell. Thread-safe: the
    state is read by other threads (the taker pauses while completing fails).
    """

    def __init__(self, component: str, *, base: float = 0.05, cap: float = 5.0, log_every: float = 10.0,
                 on_change: Callable[[Outage], None] | None = None):
        self.component = component
        self.base = base
        self.cap = cap
        self.log_every = log_every
        self.on_change = on_change
        self._lock = threading.Lock()
        self.since: float | None = None  # wall time the current spell began
        self.kind: str | None = None
        self.error: str | None = None
        self.attempts = 0
        self._delay = base
        self._logged_at = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        kind = error_kind(exc)
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        now = time.monotonic()
        with self._lock:
            started = self.since is None
            if started:
                self.since = time.time()
                self._delay = self.base
                self._logged_at = 0.0
            else:
                self._delay = min(self._delay * 2, self.cap)
            self.kind, self.error = kind, message
            self.attempts += 1
            delay = self._delay
            due = now - self._logged_at >= self.log_every
            if due:
                self._logged_at = now
            attempts, since = self.attempts, self.since
        if due:
            # The first line names the cause and what the worker does about it; later ones say
            # how long it has lasted, so a log reader sees one line per interval, not per attempt.
            log.warning("redis refuses the worker's commands: waiting and retrying" if started
                        else "redis still refusing the worker's commands",
                        component=self.component, kind=kind, error=message, attempts=attempts,
                        for_s=round(time.time() - since, 1) if since else 0.0, retry_in_s=round(delay, 2))
        if started and self.on_change is not None:
            self.on_change(self)
        return delay

    def recovered(self) -> None:
        if self.since is None:
            return
        with self._lock:
            since, attempts = self.since, self.attempts
            self.since = self.kind = self.error = None
            self.attempts = 0
        log.info("redis accepts the worker's commands again", component=self.component,
                 after_s=round(time.time() - (since or time.time()), 1), attempts=attempts)
        if self.on_change is not None:
            self.on_change(self)

    def describe(self) -> str | None:
        """``None`` while healthy; else e.g. ``complete: oom for 12s (command not allowed ...)``."""
        with self._lock:
            if self.since is None:
                return None
            return f"{self.component}: {self.kind} for {time.time() - self.since:.0f}s ({self.error})"
