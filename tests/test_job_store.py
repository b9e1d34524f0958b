"""JobStore writes what RQ's Python writes, checked with RQ's own APIs and key by key against the
Python path it replaces (BatchWorker's pipelines, copied below as the reference)."""

from __future__ import annotations

import re
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from rq import Queue
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import current_timestamp, now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from producer import Client, keys
from producer.results import encode_results, record_job, rq_success_fields
from producer.schema import error_result
from producer.serializer import JSONSerializer
from producer.settings import DEFAULT_RESULT_TTL
from worker.job_store import Completion, JobStore, TakenJob

WORKER = "qb-store-test"
EXEC_TTL = 30
DEFAULT_TTL = 600  # the worker's default result TTL, for jobs that have none


def make_worker(conn: redis.Redis, names: tuple[str, ...] = ("default",)) -> SimpleWorker:
    queues = [Queue(n, connection=conn, serializer=JSONSerializer) for n in names]
    return SimpleWorker(queues, connection=conn, name=WORKER, serializer=JSONSerializer)


def fetch(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def fake_results(kwargs: dict[str, Any], error_every: int = 0) -> list[dict[str, Any]]:
    """What the engine would produce for a job's items (content is opaque to the store)."""
    out: list[dict[str, Any]] = []
    for n, item in enumerate(kwargs["items"]):
        if error_every and n % error_every == 0:
            out.append(error_result(item["id"], "invalid_item", "too long"))
        else:
            out.append({"id": item["id"], "label": "POSITIVE", "score": 0.75 + n / 1000})
    return out


def completion(job: TakenJob, error_every: int = 0) -> tuple[Completion, list[dict[str, Any]]]:
    _func, _args, kwargs = job.decode()
    results = fake_results(kwargs, error_every)
    errors = sum(1 for r in results if "error" in r)
    return Completion(job=job, results=encode_results(results), run_id=kwargs.get("run"), items=len(results),
                      errors=errors), results


# -- the reference: BatchWorker._take / _complete before JobStore (their Redis writes) -------------


@dataclass
class RefSlot:
    job: Job
    queue: Queue
    execution: Execution
    results: list[dict[str, Any]] | None = None
    run: str | None = None


class ReferencePath:
    """The writes of BatchWorker._take and _complete (success path) as they were, with redis-py."""

    def __init__(self, worker: SimpleWorker):
        self.worker = worker
        self.conn = worker.connection

    def take(self, want: int, ttl: int) -> list[RefSlot]:
        taken: list[tuple[Queue, str]] = []
        for q in self.worker.queues:
            while len(taken) < want:
                job_id = self.conn.lmove(q.key, q.intermediate_queue_key, "LEFT", "RIGHT")
                if job_id is None:
                    break
                taken.append((q, job_id.decode()))
        if not taken:
            return []
        jobs = Job.fetch_many([j for _, j in taken], connection=self.conn, serializer=JSONSerializer)
        slots: list[RefSlot] = []
        with self.conn.pipeline(transaction=False) as pipe:
            for (q, job_id), job in zip(taken, jobs):
                if job is None:
                    pipe.lrem(q.intermediate_queue_key, 1, job_id)
                    continue
                execution = Execution(id=uuid.uuid4().hex, job_id=job.id, connection=self.conn,
                                      worker_name=self.worker.name)
                execution._job = job
                execution.save(ttl=ttl, pipeline=pipe)
                ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
                StartedJobRegistry(queue=q).add_execution(execution, pipeline=pipe, ttl=ttl, xx=False)
                pipe.sadd(self.worker.executions_key, execution.composite_key)
                job.prepare_for_execution(self.worker.name, pipeline=pipe)
                if job.ttl:
                    pipe.persist(job.key)
                pipe.lrem(q.intermediate_queue_key, 1, job_id)
                slots.append(RefSlot(job=job, queue=q, execution=execution))
            if slots:
                pipe.expire(self.worker.executions_key, ttl + 60)
            self.worker.heartbeat(pipeline=pipe)
            self.worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        return slots

    def complete(self, slots: list[RefSlot], default_result_ttl: int) -> list[str]:
        ended = now()
        ended_ts = ended.timestamp()
        dependents_at: list[tuple[int, RefSlot]] = []
        with self.conn.pipeline(transaction=False) as pipe:
            for slot in slots:
                job, execution = slot.job, slot.execution
                result_ttl = job.get_result_ttl(default_result_ttl)
                pipe.hset(job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": utcformat(ended)})
                encoded = encode_results(slot.results)  # type: ignore[arg-type]
                result_key = Result.get_key(job.id)
                pipe.xadd(result_key, rq_success_fields(encoded, self.worker.name, execution.id,
                                                         execution.created_at.timestamp(), ended_ts), maxlen=10)
                if result_ttl == -1:
                    pipe.persist(result_key)
                elif result_ttl is not None:
                    pipe.expire(result_key, result_ttl)
                if result_ttl != 0:
                    FinishedJobRegistry(queue=slot.queue).add(job, result_ttl, pipe)
                if result_ttl and result_ttl > 0:
                    pipe.expire(job.key, result_ttl)
                    dependents_at.append((len(pipe), slot))
                    pipe.expire(job.dependents_key, result_ttl)
                    if job._dependency_ids:
                        pipe.expire(job.dependencies_key, result_ttl)
                else:
                    dependents_at.append((len(pipe), slot))
                    pipe.exists(job.dependents_key)
                    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                pipe.delete(execution.key)
                StartedJobRegistry(queue=slot.queue).remove_execution(execution, pipeline=pipe)
                ExecutionRegistry(job_id=execution.job_id, connection=self.conn).remove(execution, pipeline=pipe)
                pipe.srem(self.worker.executions_key, execution.composite_key)
                if slot.run:
                    run_ttl = result_ttl if result_ttl and result_ttl > 0 else DEFAULT_RESULT_TTL
                    record_job(self.conn, pipe, slot.run, job.id, slot.results, run_ttl,  # type: ignore[arg-type]
                               encoded=encoded)
            items = sum(len(s.results or []) for s in slots)
            if slots:
                pipe.hincrby(self.worker.key, "qb_items", items)
                pipe.hincrby(self.worker.key, "successful_job_count", len(slots))
                busy = sum((ended - s.job.started_at).total_seconds() for s in slots if s.job.started_at)
                pipe.hincrbyfloat(self.worker.key, "total_working_time", busy)
            replies = pipe.execute()
        return [slot.job.id for index, slot in dependents_at if replies[index]]


def ref_fill(slot: RefSlot, error_every: int = 0) -> RefSlot:
    slot.results = fake_results(slot.job.kwargs, error_every)
    slot.run = slot.job.kwargs.get("run")
    return slot


# -- taking ------------------------------------------------------------------------------------------


def test_take_registers_jobs_as_rq_does(conn):
    client = Client(conn)
    handles = client.submit_many(["good film", "bad film", "fine film"], chunk_size=1)
    job_ids = [h.job_id for h in handles]
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    before = time.time()
    taken, gone = store.take(10, EXEC_TTL)
    assert gone == []
    assert [t.id for t in taken] == job_ids  # queue order
    q = client.queue()
    assert conn.llen(q.key) == 0 and conn.llen(q.intermediate_queue_key) == 0
    started = StartedJobRegistry(queue=q)
    assert sorted(started.get_job_ids()) == sorted(job_ids)
    assert {e for e in started.get_job_and_execution_ids()} == {(t.id, t.execution_id) for t in taken}
    assert conn.smembers(worker.executions_key) == {t.composite_key.encode() for t in taken}
    assert len({t.execution_id for t in taken}) == 3 and all(len(t.execution_id) == 32 for t in taken)
    for t, text in zip(taken, ["good film", "bad film", "fine film"]):
        job = fetch(conn, t.id)
        assert job.get_status() == JobStatus.STARTED
        assert job.worker_name == WORKER
        assert job.started_at is not None and abs(job.started_at.timestamp() - t.created_at) < 1e-3
        assert before - 1 <= t.created_at <= time.time()
        assert job.enqueued_at is not None and t.enqueued_at == pytest.approx(job.enqueued_at.timestamp(), abs=1e-6)
        assert t.result_ttl == job.result_ttl == 86_400 and not t.has_dependencies
        func_name, args, kwargs = t.decode()
        assert (func_name, args, kwargs) == (job.func_name, list(job.args), job.kwargs)
        assert func_name == keys.JOB_FUNC and kwargs["items"][0]["text"] == text
        (execution,) = job.get_executions()
        assert execution.id == t.execution_id and execution.worker_name == WORKER
        assert execution.created_at.timestamp() == t.created_at == execution.last_heartbeat.timestamp()
        fetched = Execution.fetch(t.execution_id, t.id, connection=conn)
        assert fetched.job_id == t.id and fetched.worker_name == WORKER
        assert 0 < conn.ttl(fetched.key) <= EXEC_TTL
        assert EXEC_TTL < conn.ttl(ExecutionRegistry(t.id, conn).key) <= EXEC_TTL + 60
        assert conn.ttl(job.key) == -1
        assert t.execution(conn, WORKER).key == fetched.key
    assert worker.worker_ttl < conn.ttl(worker.executions_key) <= worker.worker_ttl + 60
    assert conn.hget(worker.key, "state") == b"busy"
    assert conn.ttl(worker.key) > worker.worker_ttl


def test_heartbeat_extends_executions_as_rq_does(conn):
    """JobStore.heartbeat on one job, RQ's Execution.heartbeat on its twin: same fields, scores, TTLs."""
    client = Client(conn)
    client.submit_many(["one", "two"], chunk_size=1)
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    taken, _ = store.take(10, 5)
    time.sleep(1.1)  # so a heartbeat moves the integer-second scores
    ours, theirs = taken
    store.heartbeat([ours], EXEC_TTL)
    theirs.execution(conn, WORKER).heartbeat(StartedJobRegistry(queue=client.queue()), EXEC_TTL, pipeline=(p := conn.pipeline()))
    p.execute()
    started = StartedJobRegistry(queue=client.queue()).key
    for t in taken:
        execution = Execution.fetch(t.execution_id, t.id, connection=conn)
        assert execution.last_heartbeat.timestamp() > t.created_at + 1
        assert EXEC_TTL - 2 <= conn.ttl(execution.key) <= EXEC_TTL
        assert conn.zscore(started, t.composite_key) == pytest.approx(current_timestamp() + EXEC_TTL, abs=2)
        registry = ExecutionRegistry(t.id, conn).key
        assert conn.zscore(registry, t.execution_id) == pytest.approx(current_timestamp() + EXEC_TTL + 60, abs=2)
        assert EXEC_TTL + 58 <= conn.ttl(registry) <= EXEC_TTL + 60
    assert conn.hkeys(Execution(ours.execution_id, ours.id, conn).key) == conn.hkeys(
        Execution(theirs.execution_id, theirs.id, conn).key)
    # XX: a heartbeat never re-adds an execution that was already removed (completed or recovered).
    store.delete_executions([ours], (p := conn.pipeline()))
    p.execute()
    store.heartbeat([ours], EXEC_TTL)
    assert conn.zscore(started, ours.composite_key) is None
    assert conn.zscore(ExecutionRegistry(ours.id, conn).key, ours.execution_id) is None


def test_take_drains_queues_in_priority_order(conn):
    client = Client(conn)
    high = [h.job_id for h in client.submit_many(["h1", "h2"], chunk_size=1, queue="high")]
    low = [h.job_id for h in client.submit_many(["l1", "l2", "l3"], chunk_size=1, queue="low")]
    worker = make_worker(conn, ("high", "low"))
    store = JobStore.for_worker(worker)
    taken, _ = store.take(4, EXEC_TTL)
    assert [(t.queue_index, t.id) for t in taken] == [(0, high[0]), (0, high[1]), (1, low[0]), (1, low[1])]
    assert sorted(StartedJobRegistry(queue=client.queue("low")).get_job_ids()) == sorted(low[:2])
    assert conn.lrange(client.queue("low").key, 0, -1) == [low[2].encode()]
    assert store.take(4, EXEC_TTL)[0][0].id == low[2]
    assert store.take(4, EXEC_TTL) == ([], [])


def test_take_registers_a_job_moved_by_blmove_first(conn):
    client = Client(conn)
    ids = [h.job_id for h in client.submit_many(["a", "b", "c", "d"], chunk_size=1)]
    q = client.queue()
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    first = conn.blmove(q.key, q.intermediate_queue_key, 1, "LEFT", "RIGHT").decode()
    taken, gone = store.take(3, EXEC_TTL, first=(0, first))
    assert gone == [] and [t.id for t in taken] == ids[:3]
    assert conn.llen(q.intermediate_queue_key) == 0
    assert conn.lrange(q.key, 0, -1) == [ids[3].encode()]
    assert fetch(conn, first).get_status() == JobStatus.STARTED


def test_gone_job_is_reported_and_nothing_registered(conn):
    client = Client(conn)
    ids = [h.job_id for h in client.submit_many(["a", "b", "c", "d"], chunk_size=1)]
    q = client.queue()
    conn.delete(Job.key_for(ids[1]))  # deleted (or expired) while queued
    conn.delete(Job.key_for(ids[0]))
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    first = conn.blmove(q.key, q.intermediate_queue_key, 1, "LEFT", "RIGHT").decode()
    assert first == ids[0]
    taken, gone = store.take(10, EXEC_TTL, first=(0, first))
    assert gone == [(0, ids[0]), (0, ids[1])]
    assert [t.id for t in taken] == ids[2:]
    assert conn.llen(q.key) == 0 and conn.llen(q.intermediate_queue_key) == 0
    assert sorted(StartedJobRegistry(queue=q).get_job_ids()) == sorted(ids[2:])
    for job_id in ids[:2]:
        assert not conn.exists(Job.key_for(job_id))  # no hash recreated by the registration
        assert not conn.exists(ExecutionRegistry(job_id, conn).key)
        assert not conn.keys(f"rq:execution:{job_id}:*")
    assert len(conn.smembers(worker.executions_key)) == 2


def test_job_ttl_is_persisted_when_started(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    job = q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "0", "text": "x"}]}, ttl=300)
    assert 0 < conn.ttl(job.key) <= 300
    store = JobStore.for_worker(make_worker(conn))
    (t,), _ = store.take(1, EXEC_TTL)
    assert t.result_ttl is None
    assert conn.ttl(job.key) == -1


# -- completing ----------------------------------------------------------------------------------


def test_complete_finishes_jobs_as_rq_does(conn):
    client = Client(conn)
    texts = ["good film", "bad film", "fine film"]
    handles = client.submit_many(texts, chunk_size=1)
    run_id = handles[0].run_id
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    taken, _ = store.take(10, EXEC_TTL)
    done = [completion(t, error_every=1 if n == 1 else 0) for n, t in enumerate(taken)]
    dependents = store.complete([c for c, _ in done], DEFAULT_TTL)
    assert dependents == []
    q = client.queue()
    finished = FinishedJobRegistry(queue=q)
    assert sorted(finished.get_job_ids()) == sorted(t.id for t in taken)
    assert StartedJobRegistry(queue=q).get_job_ids() == []
    assert conn.smembers(worker.executions_key) == set()
    for t, (c, results) in zip(taken, done):
        job = fetch(conn, t.id)
        assert job.get_status() == JobStatus.FINISHED
        assert job.ended_at is not None and job.started_at is not None and job.ended_at >= job.started_at
        latest = job.latest_result()
        assert latest is not None and latest.type == Result.Type.SUCCESSFUL
        assert latest.return_value == results
        assert latest.execution_id == t.execution_id and latest.worker_name == WORKER
        assert latest.execution_started_at.timestamp() == t.created_at
        assert job.get_executions() == []
        assert not conn.exists(f"rq:execution:{t.composite_key}")
        assert not conn.exists(ExecutionRegistry(t.id, conn).key)
        assert 86_400 - 5 < conn.ttl(job.key) <= 86_400
        assert 86_400 - 5 < conn.ttl(Result.get_key(t.id)) <= 86_400
        score = conn.zscore(finished.key, t.id)
        assert score is not None and abs(score - (current_timestamp() + 86_400)) <= 2
    assert [h.result(timeout=0) for h in handles][0] == done[0][1][0]
    # The run: one stream entry per job, counters, TTLs.
    entries = conn.xrange(keys.run_stream(run_id))
    assert [e[1][b"job"].decode() for e in entries] == [t.id for t in taken]
    progress = client.run_progress(run_id)
    assert (progress["done"], progress["errors"], progress["total"]) == (3, 1, 3)
    assert conn.hget(keys.run_meta(run_id), "done_jobs") == b"3"
    assert [r for _job, _id, r in client.subscribe(run_id, timeout=0.1).entries()] == [r for _, r in done]
    for key in keys.run_keys(run_id):
        assert 86_400 - 5 < conn.ttl(key) <= 86_400
    w = conn.hgetall(worker.key)
    assert (w[b"qb_items"], w[b"successful_job_count"]) == (b"3", b"3")
    assert 0 <= float(w[b"total_working_time"]) < 60


def test_completing_a_job_twice_records_its_run_entry_once(conn):
    client = Client(conn)
    handles = client.submit_many(["once", "twice"], chunk_size=1)
    run_id = handles[0].run_id
    store = JobStore.for_worker(make_worker(conn))
    taken, _ = store.take(10, EXEC_TTL)
    done = [completion(t)[0] for t in taken]
    store.complete(done, DEFAULT_TTL)
    store.complete(done[:1], DEFAULT_TTL)  # a redelivered job finishing again
    assert conn.xlen(keys.run_stream(run_id)) == 2
    meta = conn.hgetall(keys.run_meta(run_id))
    assert (meta[b"done"], meta[b"done_jobs"]) == (b"2", b"2")
    assert conn.scard(keys.run_done_jobs(run_id)) == 2
    # RQ's own result stream keeps both results, as RQ does for a job that ran twice.
    assert conn.xlen(Result.get_key(taken[0].id)) == 2
    assert fetch(conn, taken[0].id).get_status() == JobStatus.FINISHED


def test_dependents_are_reported_and_dependencies_expire(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    payload = {"items": [{"id": "0", "text": "x"}]}
    parent = q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="parent", result_ttl=-1)
    child = q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="child", depends_on=parent)
    assert child.get_status() == JobStatus.DEFERRED
    store = JobStore.for_worker(make_worker(conn))
    (t,), _ = store.take(10, EXEC_TTL)
    assert t.id == "parent" and not t.has_dependencies and t.result_ttl == -1
    assert store.complete([completion(t)[0]], DEFAULT_TTL) == ["parent"]
    # result_ttl -1: everything kept for good, finished score +inf.
    assert conn.ttl(parent.key) == -1 and conn.ttl(Result.get_key("parent")) == -1
    assert conn.zscore(FinishedJobRegistry(queue=q).key, "parent") == float("inf")
    q.enqueue_dependents(fetch(conn, "parent"))
    assert fetch(conn, "child").get_status() == JobStatus.QUEUED
    (t,), _ = store.take(10, EXEC_TTL)
    assert t.id == "child" and t.has_dependencies and t.result_ttl is None
    assert conn.exists(fetch(conn, "child").dependencies_key)
    assert store.complete([completion(t)[0]], DEFAULT_TTL) == []
    child = fetch(conn, "child")
    assert child.get_status() == JobStatus.FINISHED
    for key in (child.key, child.dependencies_key, Result.get_key("child")):
        assert DEFAULT_TTL - 5 < conn.ttl(key) <= DEFAULT_TTL, key


def test_result_ttl_zero_is_refused_before_any_write(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "0", "text": "x"}]}, job_id="gone-at-once", result_ttl=0)
    store = JobStore.for_worker(make_worker(conn))
    (t,), _ = store.take(1, EXEC_TTL)
    assert not JobStore.fast_path(t, DEFAULT_TTL)
    with pytest.raises(ValueError, match="result_ttl 0"):
        store.complete([completion(t)[0]], DEFAULT_TTL)
    assert fetch(conn, t.id).get_status() == JobStatus.STARTED


def test_delete_executions_for_give_back(conn):
    client = Client(conn)
    client.submit_many(["a", "b"], chunk_size=1)
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    taken, _ = store.take(10, EXEC_TTL)
    with conn.pipeline(transaction=False) as pipe:
        store.delete_executions(taken, pipe)
        pipe.execute()
    assert StartedJobRegistry(queue=client.queue()).get_job_ids() == []
    assert conn.smembers(worker.executions_key) == set()
    for t in taken:
        assert fetch(conn, t.id).get_executions() == []
        assert not conn.exists(f"rq:execution:{t.composite_key}")


def test_rq_maintenance_recovers_jobs_of_a_dead_worker(conn):
    client = Client(conn)
    (handle,) = client.submit_many(["abandoned"], chunk_size=1)
    q = client.queue()
    store = JobStore.for_worker(make_worker(conn))
    store.take(1, EXEC_TTL)
    registry = StartedJobRegistry(queue=q)
    assert registry.get_expired_job_ids() == []
    # As if the worker died and its execution expired: RQ retries the job (3 retries left).
    registry.cleanup(timestamp=current_timestamp() + EXEC_TTL + 1)
    job = fetch(conn, handle.job_id)
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == 2
    assert q.get_job_ids() == [handle.job_id]
    assert registry.get_job_ids() == []


# -- key by key against the Python path -----------------------------------------------------------

_UTC = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")
_TS = re.compile(rb"^1\d{9}(\.\d+)?$")


@dataclass(frozen=True)
class Near:
    """A time-relative number (TTL, registry score): equal within a couple of seconds."""

    value: float

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Near) and abs(self.value - other.value) <= 2

    def __hash__(self) -> int:
        return 0


@dataclass
class Snapshot:
    """Every key of a database at one moment: TYPE, raw content, PTTL."""

    at: float
    keys: dict[bytes, tuple[str, Any, int]]


def snapshot(conn: redis.Redis) -> Snapshot:
    out: dict[bytes, tuple[str, Any, int]] = {}
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
        out[key] = (kind, content, conn.pttl(key))
    return Snapshot(time.time(), out)


def normalise(snap: Snapshot, names: dict[str, str]) -> dict[str, Any]:
    """A snapshot with ids replaced by names, times by placeholders, scores and TTLs relative."""

    def sub(value: bytes) -> str:
        for raw, name in names.items():
            value = value.replace(raw.encode(), name.encode())
        if _UTC.match(value):
            return "<utc>"
        if _TS.match(value):
            return "<ts>"
        return value.decode(errors="backslashreplace")

    def score(value: float) -> Any:
        return Near(value - snap.at) if 1e9 < value < 1e11 else value

    def fields(mapping: dict[bytes, bytes]) -> dict[str, str]:
        out = {}
        for k, v in mapping.items():
            if k == b"qb_take":  # queuebert's own field beside RQ's: the take's redelivery guard
                continue
            if k == b"data":
                v = zlib.decompress(v)
            if k == b"total_working_time":
                v = b"<float>" if 0 <= float(v) < 60 else v
            out[sub(k)] = sub(v)
        return out

    out: dict[str, Any] = {}
    for key, (kind, content, ttl) in snap.keys.items():
        if kind == "hash":
            content = fields(content)
        elif kind == "list":
            content = [sub(v) for v in content]
        elif kind == "set":
            content = sorted(sub(v) for v in content)
        elif kind == "zset":
            content = sorted(((sub(m), score(s)) for m, s in content), key=lambda e: e[0])
        elif kind == "stream":
            content = [fields(f) for f in content]
        else:
            content = sub(content)
        out[sub(key)] = (kind, content, Near(ttl / 1000) if ttl > 0 else ttl)
    return out


def _namer(kind: str) -> Any:
    """Names ids in the order they were taken (both paths take the same jobs in the same order)."""
    count = [0]

    def name(ids: list[str]) -> dict[str, str]:
        out = {}
        for i in ids:
            out[i] = f"<{kind}{count[0]}>"
            count[0] += 1
        return out

    return name


def other_db(conn: redis.Redis) -> redis.Redis:
    kwargs = conn.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs["host"], port=kwargs["port"], db=1)


def assert_same(new: dict[str, Any], ref: dict[str, Any], when: str) -> None:
    assert sorted(new) == sorted(ref), when
    for key in ref:
        assert new[key] == ref[key], f"{when}: {key}"


def scenario_client_jobs(c: redis.Redis, take: Any, complete: Any) -> dict[str, str]:
    """Two one-text jobs of one run, one with an error result: take, complete."""
    client = Client(c)
    handles = client.submit_many(["good film", "bad film"], chunk_size=1)
    names = {handles[0].run_id: "<run>", handles[0].job_id: "<job0>", handles[1].job_id: "<job1>"}
    names.update(take(2))
    complete(error_every=[0, 1])
    return names


def scenario_dependencies(c: redis.Redis, take: Any, complete: Any) -> dict[str, str]:
    """A job with an RQ ttl, result_ttl -1 and a dependent; then the dependent (default result ttl)."""
    q = Queue("default", connection=c, serializer=JSONSerializer)
    payload = {"items": [{"id": "0", "text": "x"}]}
    parent = q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="parent", ttl=300, result_ttl=-1)
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="child", depends_on=parent)
    names = dict(take(5))
    dependents = complete(error_every=[0])
    assert dependents == ["parent"]
    q.enqueue_dependents(fetch(c, "parent"))
    names.update(take(5))
    assert complete(error_every=[0]) == []
    return names


@pytest.mark.parametrize("scenario", [scenario_client_jobs, scenario_dependencies])
def test_same_redis_data_as_the_python_path(conn, scenario):
    """The whole database after every take and every complete, JobStore (db 0) against the
    Python path (db 1), with ids named and times normalised."""
    ref_conn = other_db(conn)
    ref_conn.flushdb()
    try:
        exec_names, ref_exec_names = _namer("exec"), _namer("exec")
        store = JobStore.for_worker(make_worker(conn))
        pending: list[TakenJob] = []
        snaps: list[Snapshot] = []

        def new_take(want: int) -> dict[str, str]:
            taken, _ = store.take(want, EXEC_TTL)
            pending[:] = taken
            snaps.append(snapshot(conn))
            return exec_names([t.execution_id for t in taken])

        def new_complete(error_every: list[int]) -> list[str]:
            done = [completion(t, e)[0] for t, e in zip(pending, error_every)]
            dependents = store.complete(done, DEFAULT_TTL)
            snaps.append(snapshot(conn))
            return dependents

        names = scenario(conn, new_take, new_complete)

        ref = ReferencePath(make_worker(ref_conn))
        ref_pending: list[RefSlot] = []
        ref_snaps: list[Snapshot] = []

        def ref_take(want: int) -> dict[str, str]:
            ref_pending[:] = ref.take(want, EXEC_TTL)
            ref_snaps.append(snapshot(ref_conn))
            return ref_exec_names([s.execution.id for s in ref_pending])

        def ref_complete(error_every: list[int]) -> list[str]:
            dependents = ref.complete([ref_fill(s, e) for s, e in zip(ref_pending, error_every)], DEFAULT_TTL)
            ref_snaps.append(snapshot(ref_conn))
            return dependents

        ref_names = scenario(ref_conn, ref_take, ref_complete)
    finally:
        ref_conn.flushdb()
        ref_conn.close()
    assert len(snaps) == len(ref_snaps) >= 2
    for n, (snap, ref_snap) in enumerate(zip(snaps, ref_snaps)):
        assert_same(normalise(snap, names), normalise(ref_snap, ref_names), f"snapshot {n}")


# -- micro-benchmark (printed with -s, not asserted) -----------------------------------------------


def test_micro_benchmark_python_per_job(conn):
    n_jobs, per_round = 2_000, 256
    client = Client(conn)
    worker = make_worker(conn)

    def enqueue() -> None:
        conn.flushdb()
        client.submit_many([f"text number {i}" for i in range(n_jobs)], chunk_size=1)

    def measure(take: Any, prepare: Any, complete: Any) -> tuple[float, float, float, float]:
        """Per job: CPU time of this process (Python; Redis runs in its own process) and wall
        time, for take and for complete. The engine's work between them is not timed."""
        cpu_take = cpu_done = wall_take = wall_done = 0.0
        while True:
            w0, c0 = time.perf_counter(), time.process_time()
            taken = take()
            w1, c1 = time.perf_counter(), time.process_time()
            if not taken:
                break
            prepared = prepare(taken)
            w2, c2 = time.perf_counter(), time.process_time()
            complete(prepared)
            w3, c3 = time.perf_counter(), time.process_time()
            cpu_take += c1 - c0
            wall_take += w1 - w0
            cpu_done += c3 - c2
            wall_done += w3 - w2
        return tuple(1e6 * v / n_jobs for v in (cpu_take, cpu_done, wall_take, wall_done))  # type: ignore[return-value]

    store = JobStore.for_worker(worker)

    def new_take() -> list[TakenJob]:
        return store.take(per_round, EXEC_TTL)[0]

    def new_prepare(taken: list[TakenJob]) -> list[tuple[TakenJob, list[dict[str, Any]], str]]:
        out = []
        for t in taken:
            kwargs = t.decode()[2]
            out.append((t, fake_results(kwargs), kwargs["run"]))
        return out

    def new_complete(prepared: list[tuple[TakenJob, list[dict[str, Any]], str]]) -> None:
        store.complete([Completion(job=t, results=encode_results(r), run_id=run, items=len(r), errors=0)
                        for t, r, run in prepared], DEFAULT_TTL)

    ref = ReferencePath(worker)

    def ref_take() -> list[RefSlot]:
        return ref.take(per_round, EXEC_TTL)

    def ref_prepare(slots: list[RefSlot]) -> list[RefSlot]:
        return [ref_fill(s) for s in slots]

    def ref_complete(slots: list[RefSlot]) -> None:
        ref.complete(slots, DEFAULT_TTL)

    enqueue()
    new = measure(new_take, new_prepare, new_complete)
    assert conn.zcard(FinishedJobRegistry(queue=client.queue()).key) == n_jobs
    enqueue()
    old = measure(ref_take, ref_prepare, ref_complete)
    assert conn.zcard(FinishedJobRegistry(queue=client.queue()).key) == n_jobs
    print(f"\nper job, {n_jobs} one-text jobs, {per_round} per round "
          "(cpu = this process's CPU time, i.e. Python; wall includes Redis):")
    for name, (ct, cd, wt, wd) in (("JobStore (Lua)", new), ("Python pipelines", old)):
        print(f"  {name:17s} take cpu {ct:6.1f} µs  complete cpu {cd:6.1f} µs  total cpu {ct + cd:6.1f} µs"
              f"  | wall take {wt:6.1f} µs  complete {wd:6.1f} µs")
