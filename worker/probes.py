"""A worker's readiness and liveness, served beside its Prometheus metrics (``--metrics-port``).

``GET /readyz``: 200 once the model is loaded and the worker is registered in Redis (RQ's worker
sets and hash, with the model it serves), until it starts stopping; 503 before and after. Before
registration the worker takes nothing, and a stopping one takes nothing new, so a rollout (or a
PodDisruptionBudget) counts only workers that serve their queues.

``GET /livez``: 200 while the worker's threads (take, complete, heartbeat) are alive and its
heartbeat is current: it beat within ``liveness_timeout`` seconds, or its heartbeat thread is
riding out a Redis error (weather: a restart would not help, and the worker keeps what it holds).
503 when a thread died of a bug (the process is then already on its way out with exit code 1) or
the heartbeat stalled: a thread blocked past the timeout, e.g. on a Redis that stopped answering
mid-command. While the worker starts (loading, registering) and while it stops (its stop is
bounded by ``stop_timeout``), it answers 200: the orchestrator's start-up and grace periods cover
those.

Both answer a small JSON body (``{"ok": ..., "reason": ...}``) saying why. Every other path is
Prometheus's exposition, as ``prometheus_client.start_http_server`` serves it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from rq.utils import now

if TYPE_CHECKING:
    from .batch_worker import BatchWorker

READY_PATH = "/readyz"
LIVE_PATH = "/livez"


class WorkerProbes:
    """Reads a :class:`BatchWorker`'s state; never talks to Redis (a probe must answer at once,
    and a Redis outage must not read as a dead worker)."""

    def __init__(self, worker: BatchWorker):
        self.worker = worker

    def _stopping(self) -> bool:
        return self.worker._stop.is_set()  # the worker's own stop event (signals, `rq shutdown`, a thread's death)

    def ready(self) -> tuple[bool, str]:
        w = self.worker
        if w.engine is None or w.pool is None:
            return False, "model not loaded"
        if self._stopping():
            return False, "stopping"
        if not w.loops:  # its threads start only once registration succeeded
            return False, "not registered yet"
        return True, "serving " + ",".join(w.queue_names())

    def live(self) -> tuple[bool, str]:
        w = self.worker
        if w.fatal is not None:
            return False, f"a worker thread died: {w.fatal!r}"
        if self._stopping():
            return True, "stopping"
        if not w.loops:
            return True, "starting"
        dead = [t.name for t in w.loops if not t.is_alive()]
        if dead:
            return False, "thread(s) ended: " + ",".join(dead)
        beat = w.last_heartbeat
        age = (now() - beat).total_seconds() if beat is not None else 0.0
        if age > w.settings.liveness_timeout:
            outage = w.outages["heartbeat"]
            if outage.down:
                return True, f"redis refuses heartbeats ({outage.describe()}); retrying"
            return False, f"no heartbeat for {age:.0f}s (liveness_timeout {w.settings.liveness_timeout:g}s)"
        return True, f"heartbeat {age:.1f}s ago"


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, as prometheus_client's own server: a slow scrape never holds a probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a probe every few seconds would drown the worker's own log)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def wsgi_app(registry: CollectorRegistry, probes: WorkerProbes | None) -> Callable[..., Iterable[bytes]]:
    """``/readyz`` and ``/livez`` from ``probes`` (when given); everything else, the metrics."""
    metrics = make_wsgi_app(registry)
    checks = {READY_PATH: probes.ready, LIVE_PATH: probes.live} if probes is not None else {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)
        ok, reason = check()
        body = json.dumps({"ok": ok, "reason": reason}).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_http(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0",
               probes: WorkerProbes | None = None) -> WSGIServer:
    """Serve metrics (and probes) on ``addr:port`` from a daemon thread; returns the server."""
    server = make_server(addr, port, wsgi_app(registry, probes), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="qb-metrics", daemon=True).start()
    return server
