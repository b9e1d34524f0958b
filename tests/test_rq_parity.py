"""BatchWorker leaves exactly what RQ's own worker leaves.

Each scenario enqueues the same jobs (same ids, payloads and RQ options) twice: once for a live RQ
``SimpleWorker`` (``work(burst=True)``: RQ's dequeue, ``execute_job``/``perform_job``,
``handle_job_success``/``handle_job_failure``, running ``worker.tasks.classify`` with queuebert's
serializer and job class), once for ``BatchWorker``. After each worker has drained the queues the
whole database is compared: every key, its type, every hash field, list, set and registry member,
stream entry and TTL. Everything must be equal except what legitimately differs, which is
normalised:

- times: timestamps become placeholders, TTLs and registry scores are compared relative to the
  snapshot, within the time the run took;
- execution ids (RQ: uuid4; BatchWorker: a take id and a counter);
- scores inside results, within 1e-4 (float32 results of differently composed batches);
- the order of a run's stream entries (jobs finish in the order of their batches);
- a failure's text: RQ records the job function's traceback, BatchWorker its message (:class:`Failure`);
- the worker's process fields (pid, hostname, ip), its ``total_working_time``, and queuebert's own
  ``qb_*`` worker fields;
- RQ's group-maintenance lock, taken by RQ's worker as it starts and by BatchWorker every heartbeat;
- while a job runs (:func:`test_while_running`), the execution TTL, which BatchWorker keeps short.
"""

from __future__ import annotations

import base64
import itertools
import json
import pickle
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from rq import Callback, Queue, Repeat, Retry
from rq.group import Group
from rq.job import JobStatus
from rq.rate_limit import RateLimit
from rq.worker import SimpleWorker

import producer.jobs
import worker.tasks
from producer import Client
from queuebert import keys, upstream
from queuebert.job import QueuebertJob
from queuebert.schema import job_kwargs
from queuebert.serializer import JSONSerializer

from helpers import run_burst

WORKER = "qb-parity"
QUEUE = "default"

# -- running the same jobs through both workers -------------------------------------------------


def rq_queue(conn: redis.Redis, name: str = QUEUE) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer, job_class=QueuebertJob)


class RQSimpleWorker(SimpleWorker):
    """RQ's SimpleWorker with queuebert's command listener, which writes nothing to Redis: RQ's own
    may wait up to a minute to stop under redis-py 8.2 (it races the unsubscribe reply), and the
    worker hash it registered, kept 60 s after its death, would be gone from the snapshot."""

    commands: upstream.CommandListener | None = None

    def subscribe(self) -> None:
        self.commands = upstream.CommandListener(self.connection, self.pubsub_channel_name, self.handle_payload)
        self.commands.start()

    def unsubscribe(self) -> None:
        if self.commands is not None:
            self.commands.stop()


def run_simple_worker(conn: redis.Redis, engine: Any, queues: list[str]) -> None:
    """RQ's own worker, as ``rq worker -w rq.worker.SimpleWorker --serializer ... --job-class ...``
    would run it (the engine is the process's cached one, as a stock worker would load it)."""
    worker.tasks._engine = engine
    try:
        w = RQSimpleWorker([rq_queue(conn, q) for q in queues], connection=conn, name=WORKER,
                         serializer=JSONSerializer, job_class=QueuebertJob)
        w.work(burst=True, logging_level="WARNING")
    finally:
        worker.tasks._engine = None


def run_batch_worker(conn: redis.Redis, engine: Any, queues: list[str]) -> None:
    run_burst(conn, engine, queues=queues, name=WORKER)


@pytest.fixture()
def ids(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Deterministic producer ids (runs, jobs, items), restarted for each worker's turn."""
    counter: list[Iterator[int]] = [itertools.count()]
    monkeypatch.setattr(producer.jobs, "new_id", lambda: f"id{next(counter[0]):04d}")

    def restart() -> None:
        counter[0] = itertools.count()

    return restart


def enqueue(conn: redis.Redis, job_id: str, texts: list[Any], run: str | None = "run-1", queue: str = QUEUE,
            kwargs_extra: dict[str, Any] | None = None, **options: Any) -> None:
    """One classify job with the options the producer gives its jobs, overridden by ``options``."""
    items = [t if isinstance(t, dict) else {"id": f"{job_id}-{n}", "text": t} for n, t in enumerate(texts)]
    kwargs = {**job_kwargs(items, run, None), **(kwargs_extra or {})}
    defaults: dict[str, Any] = dict(timeout=600, result_ttl=86_400, failure_ttl=86_400, retry=Retry(max=3),
                                    on_failure=Callback(keys.ON_FAILURE), description=f"classify {len(texts)} text(s)")
    defaults.update(options)
    rq_queue(conn, queue).enqueue(keys.JOB_FUNC, kwargs=kwargs, job_id=job_id, **defaults)


# -- snapshots ----------------------------------------------------------------------------------

_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")
_TS = re.compile(r"^1\d{9}(\.\d+)?$")
_HEX32 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Near:
    """A time-relative number (TTL, registry score) or a computed score: equal within a tolerance."""

    value: float
    tolerance: float = 2.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Near) and abs(self.value - other.value) <= max(self.tolerance, other.tolerance)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"~{self.value:.4g}"


def snapshot(conn: redis.Redis) -> tuple[float, dict[str, tuple[str, Any, int]]]:
    """Every key of the database: TYPE, raw content, PTTL."""
    out: dict[str, tuple[str, Any, int]] = {}
    for key in conn.keys("*"):
        kind = conn.type(key).decode()
        if kind == "hash":
            content: Any = conn.hgetall(key)
        elif kind == "list":
            content = conn.lrange(key, 0, -1)
        elif kind == "set":
            content = conn.smembers(key)
        elif kind == "zset":
            content = conn.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            content = [fields for _id, fields in conn.xrange(key)]
        else:
            content = conn.get(key)
        out[key.decode()] = (kind, content, conn.pttl(key))
    return time.time(), out


def _text(value: bytes | str) -> str:
    text = value.decode(errors="backslashreplace") if isinstance(value, bytes) else value
    text = _HEX32.sub("<hex>", text)  # execution ids (uuid4 for RQ, 24 + 8 hex for BatchWorker)
    if _UTC.match(text):
        return "<utc>"
    if _TS.match(text):
        return "<ts>"
    return text


def _json(value: Any) -> Any:
    """Decoded JSON with scores approximate: the two workers batch texts differently, and float32
    results of different batches differ in the last bits."""
    if isinstance(value, float):
        return Near(value, 1e-4)
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Failure:
    """A failure's text. RQ records the traceback of what the job function raised; BatchWorker,
    which never calls the job function, records that exception's message: equal when one's message
    is a line of the other's traceback (without the exception's class)."""

    text: str

    def messages(self) -> set[str]:
        lines = (ln.strip() for ln in self.text.strip().splitlines())
        return {re.sub(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ", "", ln) for ln in lines if ln}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Failure):
            return False
        mine, theirs = self.messages(), other.messages()
        return (len(mine) == 1 and mine <= theirs) or (len(theirs) == 1 and theirs <= mine) or mine == theirs

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Failure({self.text.strip().splitlines()[-1] if self.text.strip() else ''!r})"


def _fields(key: str, mapping: dict[bytes, bytes], reasons: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, raw in mapping.items():
        name = raw_key.decode()
        if name.startswith("qb_"):
            continue  # queuebert's own fields beside RQ's (worker stats)
        if name == "data":
            payload = zlib.decompress(raw)
            value: Any = _json(json.loads(payload)) if payload[:1] == b"[" else repr(payload)
        elif name == "return_value":
            value = _json(json.loads(base64.b64decode(raw)))
        elif name == "results":
            value = _json(json.loads(raw))
        elif name == "exc_string":
            value = Failure(zlib.decompress(base64.b64decode(raw)).decode()) if reasons else "<reason>"
        elif name == "exc_info":
            value = Failure(zlib.decompress(raw).decode()) if reasons else "<reason>"
        elif name == "total_working_time":
            value = "<seconds>"  # how long each worker worked
        elif name in ("pid", "hostname", "ip_address"):
            value = "<process>"
        else:
            value = _text(raw)
        out[name] = value
    return out


#: Maintenance locks: RQ's worker runs maintenance as it starts, BatchWorker every heartbeat.
_MAINTENANCE_LOCKS = {"rq:clean_groups"}


def normalise(at: float, keys_: dict[str, tuple[str, Any, int]], took: float, reasons: bool = True) -> dict[str, Any]:
    """A snapshot with times as placeholders and TTLs and scores relative to when it was taken,
    within the time the setup and the worker took (a loaded machine runs one worker slower).
    ``reasons=False``: failure texts are not compared."""
    slack = 2 + took

    def score(value: float) -> Any:
        return Near(value - at, slack) if 1e9 < value < 1e11 else value

    out: dict[str, Any] = {}
    for key, (kind, content, ttl) in keys_.items():
        if kind == "hash":
            content = _fields(key, content, reasons)
        elif kind == "list":
            content = [_text(v) for v in content]
        elif kind == "set":
            content = sorted(_text(v) for v in content)
        elif kind == "zset":
            content = sorted(((_text(m), score(s)) for m, s in content), key=lambda e: e[0])
        elif kind == "stream":
            content = [_fields(key, f, reasons) for f in content]
            if key.startswith(f"{keys.PREFIX}:run:"):
                # Jobs finish in the order their batches do: a run's entries are compared as a set.
                content.sort(key=lambda f: f["job"])
        else:
            content = _text(content)
        if key in _MAINTENANCE_LOCKS:
            continue  # present only while maintenance's lock lasts: when it last ran, not what it did
        out[_text(key)] = (kind, content, Near(ttl / 1000, slack) if ttl > 0 else ttl)
    return out


def differences(batch: dict[str, Any], rq: dict[str, Any]) -> list[str]:
    out = [f"only BatchWorker wrote {k}: {batch[k]}" for k in sorted(set(batch) - set(rq))]
    out += [f"only RQ wrote {k}: {rq[k]}" for k in sorted(set(rq) - set(batch))]
    for k in sorted(set(batch) & set(rq)):
        (bkind, bcontent, bttl), (rkind, rcontent, rttl) = batch[k], rq[k]
        if bkind != rkind:
            out.append(f"{k}: type {bkind} (BatchWorker) vs {rkind} (RQ)")
        elif bttl != rttl:
            out.append(f"{k}: ttl {bttl} (BatchWorker) vs {rttl} (RQ)")
        if bkind == rkind == "hash" and bcontent != rcontent:
            for f in sorted(set(bcontent) | set(rcontent)):
                if bcontent.get(f, "<absent>") != rcontent.get(f, "<absent>"):
                    out.append(f"{k} field {f}: {bcontent.get(f, '<absent>')!r} (BatchWorker) vs "
                               f"{rcontent.get(f, '<absent>')!r} (RQ)")
        elif bcontent != rcontent:
            out.append(f"{k}: {bcontent!r} (BatchWorker) vs {rcontent!r} (RQ)")
    return out


def compare(conn: redis.Redis, engine: Any, restart_ids: Callable[[], None], setup: Callable[[redis.Redis], Any],
            queues: list[str] | None = None, batch: Callable[..., None] = run_batch_worker,
            reasons: bool = True) -> dict[str, Any]:
    """Run ``setup``'s jobs through RQ's SimpleWorker, then (on a flushed database) through
    BatchWorker; assert both leave the same data. Returns BatchWorker's normalised snapshot."""
    queues = queues or [QUEUE]
    snaps = []
    for run in (run_simple_worker, batch):
        conn.flushdb()
        restart_ids()
        began = time.time()
        setup(conn)
        run(conn, engine, queues)
        at, content = snapshot(conn)
        snaps.append(normalise(at, content, at - began, reasons))
    rq, batch = snaps
    diff = differences(batch, rq)
    assert not diff, "BatchWorker and RQ differ:\n  " + "\n  ".join(diff)
    return batch


# -- scenarios ----------------------------------------------------------------------------------


def test_client_jobs(conn, engines, ids):
    """Jobs as the producer makes them: one-text jobs, a stream job with a bad item, and a job all
    of whose items are invalid (it succeeds, with error results)."""

    def setup(c: redis.Redis) -> None:
        client = Client(c)
        client.submit_many(["good film", "bad film"], chunk_size=1)
        client.enqueue_stream(["fine", "", "a longer text " * 5], chunk_size=3)
        # What a producer other than queuebert's client could write: bad items fail one by one.
        enqueue(c, "job-bad-item", ["fine", {"id": "bad", "text": 7}])
        enqueue(c, "job-all-invalid", [{"id": "x", "text": None}, {"id": "y"}])

    snap = compare(conn, engines["bert"], ids, setup)
    assert sum(1 for k in snap if k.startswith("rq:results:")) == 5


@pytest.mark.parametrize("result_ttl", [None, 600, -1, 0])
def test_result_ttl(conn, engines, ids, result_ttl):
    compare(conn, engines["bert"], ids, lambda c: enqueue(c, "job-ttl", ["text"], result_ttl=result_ttl))


@pytest.mark.parametrize("ttl", [None, 300])
def test_job_ttl(conn, engines, ids, ttl):
    compare(conn, engines["bert"], ids, lambda c: enqueue(c, "job-ttl", ["text"], ttl=ttl))


@pytest.mark.parametrize(("retries", "failure_ttl"), [(0, None), (2, 900), (0, -1)])
def test_failed_job(conn, engines, ids, monkeypatch, retries, failure_ttl):
    """A job that cannot run (more items than the worker allows): the job function raises."""
    monkeypatch.setenv("QUEUEBERT_MAX_ITEMS_PER_JOB", "2")

    def setup(c: redis.Redis) -> None:
        enqueue(c, "job-big", ["one", "two", "three"], retry=Retry(max=retries) if retries else None,
                failure_ttl=failure_ttl)

    def batch(c: redis.Redis, engine: Any, queues: list[str]) -> None:
        run_burst(c, engine, queues=queues, name=WORKER, max_items_per_job=2)

    compare(conn, engines["bert"], ids, setup, batch=batch)


def test_dependents(conn, engines, ids):
    def setup(c: redis.Redis) -> None:
        q = rq_queue(c)
        enqueue(c, "parent", ["parent text"])
        enqueue(c, "child", ["child text"], depends_on="parent")
        assert q.fetch_job("child").get_status() == JobStatus.DEFERRED

    compare(conn, engines["bert"], ids, setup)


def test_repeat(conn, engines, ids):
    """Repeat(times=2): the job runs three times (once, then repeated twice), as under RQ."""
    batch = compare(conn, engines["bert"], ids,
                    lambda c: enqueue(c, "job-repeat", ["again"], repeat=Repeat(times=2)))
    assert len(batch["rq:results:job-repeat"][1]) == 3
    assert batch["rq:job:job-repeat"][1]["repeats_left"] == "0"
    assert batch["rq:job:job-repeat"][1]["status"] == "finished"
    assert batch[f"rq:worker:{WORKER}"][1]["successful_job_count"] == "3"
    assert len(batch["qb:run:{run-1}:stream"][1]) == 1  # the run hears of the job once


def test_repeat_and_retry_with_an_interval(conn, engines, ids, monkeypatch):
    """With an interval, the next run of a repeat and a retry waits in RQ's scheduled registry."""
    monkeypatch.setenv("QUEUEBERT_MAX_ITEMS_PER_JOB", "2")

    def setup(c: redis.Redis) -> None:
        enqueue(c, "job-repeat", ["again"], repeat=Repeat(times=2, interval=60))
        enqueue(c, "job-retry", ["one", "two", "three"], retry=Retry(max=2, interval=[30, 60]))

    def batch(c: redis.Redis, engine: Any, queues: list[str]) -> None:
        run_burst(c, engine, queues=queues, name=WORKER, max_items_per_job=2)

    snap = compare(conn, engines["bert"], ids, setup, batch=batch)
    assert [m for m, _ in snap["rq:scheduled:default"][1]] == ["job-repeat", "job-retry"]


def test_rate_limit(conn, engines, ids):
    """Three jobs sharing a concurrency-1 rate limit: each completion releases the slot and lets the
    next one in, as under RQ."""

    def setup(c: redis.Redis) -> None:
        for n in range(3):
            enqueue(c, f"job-rl-{n}", [f"text {n}"], rate_limit=RateLimit("qb-parity", concurrency=1))

    batch = compare(conn, engines["bert"], ids, setup)
    assert [m for m, _ in batch["rq:finished:default"][1]] == ["job-rl-0", "job-rl-1", "job-rl-2"]


class SnapshotWhileRunning:
    """An engine that snapshots the database the first time it is asked to compute: what a job
    looks like while it runs (RQ's worker runs it through ``classify``, BatchWorker through
    ``launch`` and ``finish``)."""

    def __init__(self, engine: Any, conn: redis.Redis):
        self._engine, self._conn = engine, conn
        self.snap: tuple[float, dict[str, Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _snapshot(self) -> None:
        if self.snap is None:
            self.snap = snapshot(self._conn)

    def classify(self, *args: Any, **kwargs: Any) -> Any:
        self._snapshot()
        return self._engine.classify(*args, **kwargs)

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        self._snapshot()
        return self._engine.launch(*args, **kwargs)


#: While a job runs, RQ's worker gives its execution the job's timeout + 60 s as TTL and heartbeats
#: it once per job; BatchWorker gives 3 heartbeat intervals (30 s by default) and heartbeats every
#: interval, so a killed worker's jobs are recovered within about 30 s instead of 11 minutes.
#: These keys' TTLs and scores follow that choice.
_EXECUTION_TIMED = re.compile(r"^rq:(execution:|executions:|wip:|worker:)")


def test_while_running(conn, engines, ids):
    """A job while it runs: execution, started registry, job and worker state."""
    snaps = []
    for kind in ("rq", "batch"):
        conn.flushdb()
        ids()
        enqueue(conn, "job-running", ["running"])
        engine = SnapshotWhileRunning(engines["bert"], conn)
        began = time.time()
        (run_simple_worker if kind == "rq" else run_batch_worker)(conn, engine, [QUEUE])
        assert engine.snap is not None
        at, content = engine.snap
        snap = normalise(at, content, at - began)
        for key, (k, value, ttl) in list(snap.items()):
            if _EXECUTION_TIMED.match(key):
                if k == "zset":
                    value = [(m, "<execution ttl>") for m, _score in value]
                snap[key] = (k, value, "<execution ttl>" if ttl != -1 else ttl)
        snaps.append(snap)
    rq, batch = snaps
    diff = differences(batch, rq)
    assert not diff, "BatchWorker and RQ differ:\n  " + "\n  ".join(diff)
    assert batch["rq:job:job-running"][1]["status"] == "started"
    assert batch[f"rq:worker:{WORKER}"][1]["state"] == "busy"


def test_deadline_passed(conn, engines, ids):
    """A job not started before its deadline is dropped, not run late."""
    deadline = time.time() - 1
    compare(conn, engines["bert"], ids,
            lambda c: enqueue(c, "job-late", ["late"], retry=None, kwargs_extra={"deadline": deadline}))


@pytest.mark.parametrize("payload", ["foreign", "pickled"])
def test_job_that_is_refused(conn, engines, ids, payload):
    """A job naming another function, or pickled: refused before anything is imported or unpickled.
    (Under RQ's worker a pickled job fails with a bare ``DeserializationError`` whose cause says why;
    BatchWorker records why: ``job payload is not JSON``.)"""

    def setup(c: redis.Redis) -> None:
        enqueue(c, "job-refused", ["x"], retry=None)
        if payload == "foreign":
            raw = JSONSerializer.dumps(["os.system", None, [], {"items": []}])
        else:
            raw = pickle.dumps(("os.system", None, ("true",), {}))
        c.hset("rq:job:job-refused", "data", zlib.compress(raw))

    batch = compare(conn, engines["bert"], ids, setup, reasons=payload != "pickled")
    (failure,) = batch["rq:results:job-refused"][1]
    assert failure["type"] == "2"  # Result.Type.FAILED


def test_group(conn, engines, ids):
    def setup(c: redis.Redis) -> None:
        items = [{"id": "g0", "text": "grouped"}]
        Group(c, name="qb-group").enqueue_many(rq_queue(c), [Queue.prepare_data(
            keys.JOB_FUNC, kwargs=job_kwargs(items, "run-1", None), job_id="job-g", result_ttl=600)])

    compare(conn, engines["bert"], ids, setup)


def test_queues_in_priority_order(conn, engines, ids):
    def setup(c: redis.Redis) -> None:
        enqueue(c, "job-low", ["low"], queue="low")
        enqueue(c, "job-high", ["high"], queue="high")

    compare(conn, engines["bert"], ids, setup, queues=["high", "low"])
