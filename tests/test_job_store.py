"""JobStore writes what RQ's Python writes, checked with RQ's own APIs. (The whole database that
BatchWorker leaves, against RQ's own worker running the same jobs: tests/test_rq_parity.py.)"""

from __future__ import annotations

import time
from base64 import b64decode
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from rq import Queue, Repeat, Retry
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.rate_limit import RateLimit
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import current_timestamp, now
from rq.worker import SimpleWorker

from producer import Client
from queuebert import keys
from queuebert.results import encode_results, record_job
from queuebert.schema import error_result
from queuebert.serializer import JSONSerializer
from queuebert.upstream import unknown_job_attributes
from worker import rq_completion
from worker.job_store import CompleteArgs, CompleteJobArgs, Completion, JobStore, TakenJob

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
    theirs.execution(conn, WORKER).heartbeat(StartedJobRegistry(queue=client.queue()), EXEC_TTL,
                                             pipeline=(p := conn.pipeline()))
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
    for t, (_c, results) in zip(taken, done):
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


def test_complete_arguments_follow_their_layout(conn):
    """complete() builds each job's arguments as a plain tuple: in the order of the names the
    script reads them by."""
    Client(conn).submit_many(["one"], chunk_size=1)
    store = JobStore.for_worker(make_worker(conn))
    (t,), _ = store.take(1, EXEC_TTL)
    c, _ = completion(t)
    sent: list[Any] = []
    script = store._complete_script

    def spy(keys: list[str], args: list[Any]) -> Any:
        sent.extend(args)
        return script(keys=keys, args=args)

    store._complete_script = spy
    store.complete([c], DEFAULT_TTL)
    n = len(CompleteArgs._fields)
    fixed, job = CompleteArgs._make(sent[:n]), CompleteJobArgs._make(sent[n:])
    assert (fixed.queues, fixed.worker) == (1, WORKER)
    assert (job.id, job.queue, job.execution_id, job.result_ttl, job.has_dependencies, job.run, job.items,
            job.errors, job.results, job.started_us) == (t.id, 1, t.execution_id, 86_400, 0, 1, 1, 0,
                                                         c.results.encode(), t.started_us)
    assert b64decode(job.return_value) == c.results.encode() and float(job.execution_started_at) == t.created_at
    assert fetch(conn, t.id).get_status() == JobStatus.FINISHED


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


@dataclass
class Done:
    """What the completer hands worker.rq_completion (worker.batch_worker.Slot's fields)."""

    job: TakenJob
    queue: Queue
    request: Any
    results: list[Any]
    written: bool = False


def test_a_job_with_dependents_is_left_to_rq_and_dependencies_expire(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    payload = {"items": [{"id": "0", "text": "x"}]}
    parent = q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="parent", result_ttl=-1)
    child = q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="child", depends_on=parent)
    assert child.get_status() == JobStatus.DEFERRED
    worker = make_worker(conn)
    store = JobStore.for_worker(worker)
    (t,), _ = store.take(10, EXEC_TTL)
    assert t.id == "parent" and not t.has_dependencies and t.result_ttl == -1
    # Its dependents set exists: the script writes nothing for it and leaves it to RQ's handlers.
    assert store.complete([completion(t)[0]], DEFAULT_TTL) == ["parent"]
    assert fetch(conn, "parent").get_status() == JobStatus.STARTED
    assert StartedJobRegistry(queue=q).get_job_ids() == ["parent"]
    done = Done(t, q, None, completion(t)[1])
    rq_completion.complete_with_rq(worker, store, done)
    # result_ttl -1: everything kept for good, finished score +inf; the child is queued.
    assert fetch(conn, "parent").get_status() == JobStatus.FINISHED
    assert conn.ttl(parent.key) == -1 and conn.ttl(Result.get_key("parent")) == -1
    assert conn.zscore(FinishedJobRegistry(queue=q).key, "parent") == float("inf")
    assert StartedJobRegistry(queue=q).get_job_ids() == [] and fetch(conn, "parent").get_executions() == []
    assert fetch(conn, "child").get_status() == JobStatus.QUEUED
    (t,), _ = store.take(10, EXEC_TTL)
    assert t.id == "child" and t.has_dependencies and t.result_ttl is None
    assert conn.exists(fetch(conn, "child").dependencies_key)
    assert store.complete([completion(t)[0]], DEFAULT_TTL) == []
    child = fetch(conn, "child")
    assert child.get_status() == JobStatus.FINISHED
    for key in (child.key, child.dependencies_key, Result.get_key("child")):
        assert DEFAULT_TTL - 5 < conn.ttl(key) <= DEFAULT_TTL, key


def test_take_reports_what_the_fast_path_does_not_implement(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    payload = {"items": [{"id": "0", "text": "x"}]}
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="plain", result_ttl=600, retry=Retry(max=2), meta={"a": 1})
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="repeated", repeat=Repeat(times=2))
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="limited", rate_limit=RateLimit("qb-store-test", 2))
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="kept-not", result_ttl=0)
    q.enqueue(keys.JOB_FUNC, kwargs=payload, job_id="newer")
    conn.hset(Job.key_for("newer"), "a_field_nobody_knows", "1")  # written by another program
    taken, _ = JobStore.for_worker(make_worker(conn)).take(10, EXEC_TTL)
    assert {t.id: t.rq_features for t in taken} == {"plain": None, "repeated": "repeats_left",
                                                     "limited": "rate_limit_key", "kept-not": None, "newer": None}
    assert {t.id for t in taken if rq_completion.needs_rq(t, DEFAULT_TTL)} == {"repeated", "limited", "kept-not"}
    # A newer RQ's features: the fast path cannot know what they mean (every job then goes to RQ).
    assert unknown_job_attributes() == frozenset()


def test_result_ttl_zero_is_refused_before_any_write(conn):
    q = Queue("default", connection=conn, serializer=JSONSerializer)
    q.enqueue(keys.JOB_FUNC, kwargs={"items": [{"id": "0", "text": "x"}]}, job_id="gone-at-once", result_ttl=0)
    store = JobStore.for_worker(make_worker(conn))
    (t,), _ = store.take(1, EXEC_TTL)
    assert rq_completion.needs_rq(t, DEFAULT_TTL)
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


# -- micro-benchmark (printed with -s, not asserted) -----------------------------------------------


def test_micro_benchmark_python_per_job(conn):
    n_jobs, n_rq_jobs, per_round = 2_000, 300, 256  # RQ's own path is slow enough that 300 jobs say it
    client = Client(conn)
    worker = make_worker(conn)

    def enqueue(n: int) -> None:
        conn.flushdb()
        client.submit_many([f"text number {i}" for i in range(n)], chunk_size=1)

    def measure(n: int, take: Any, prepare: Any, complete: Any) -> tuple[float, float, float, float]:
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
        return tuple(1e6 * v / n for v in (cpu_take, cpu_done, wall_take, wall_done))  # type: ignore[return-value]

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

    # RQ's own worker, job by job: dequeue, Execution.create, prepare_job_execution, then the run
    # record (as worker.tasks.classify writes it) and handle_job_success.
    queue = client.queue()

    def rq_take() -> list[tuple[Job, Queue, Execution]]:
        out = []
        for _ in range(per_round):
            got = Queue.dequeue_any([queue], None, connection=conn, serializer=JSONSerializer)
            if got is None:
                break
            job, q = got
            execution = worker.prepare_execution(job)
            worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
            job.started_at = now()
            out.append((job, q, execution))
        return out

    def rq_prepare(taken: list[tuple[Job, Queue, Execution]]) -> list[tuple[Job, Queue, Execution, Any]]:
        return [(job, q, execution, fake_results(job.kwargs)) for job, q, execution in taken]

    def rq_complete(prepared: list[tuple[Job, Queue, Execution, Any]]) -> None:
        for job, q, execution, results in prepared:
            with conn.pipeline(transaction=False) as pipe:
                record_job(conn, pipe, job.kwargs["run"], job.id, results)
                pipe.execute()
            job.ended_at = now()
            job._result = results
            worker.handle_job_success(job, q, q.started_job_registry, execution)

    enqueue(n_jobs)
    new = measure(n_jobs, new_take, new_prepare, new_complete)
    assert conn.zcard(FinishedJobRegistry(queue=client.queue()).key) == n_jobs
    enqueue(n_rq_jobs)
    rq = measure(n_rq_jobs, rq_take, rq_prepare, rq_complete)
    assert conn.zcard(FinishedJobRegistry(queue=client.queue()).key) == n_rq_jobs
    print(f"\nper job, one-text jobs ({n_jobs} through JobStore, {n_rq_jobs} through RQ), {per_round} per round "
          "(cpu = this process's CPU time, i.e. Python; wall includes Redis):")
    for name, (ct, cd, wt, wd) in (("JobStore (Lua)", new), ("RQ's own worker", rq)):
        print(f"  {name:17s} take cpu {ct:6.1f} µs  complete cpu {cd:6.1f} µs  total cpu {ct + cd:6.1f} µs"
              f"  | wall take {wt:6.1f} µs  complete {wd:6.1f} µs")


def test_a_newer_rq_sends_every_job_to_rqs_handlers(monkeypatch):
    """A job attribute the installed RQ has that queuebert does not know (a newer RQ's feature)."""
    init = Job.__init__

    def newer_init(self: Job, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.a_new_feature = None

    monkeypatch.setattr(Job, "__init__", newer_init)
    rq_completion.fast_path_usable.cache_clear()
    try:
        assert unknown_job_attributes() == {"a_new_feature"}
        job = TakenJob(id="j", queue_index=0, execution_id="e", created_at=0.0, started_us=0, data=b"",
                       enqueued_at=None, result_ttl=600, has_dependencies=False)
        assert rq_completion.needs_rq(job, DEFAULT_TTL)
    finally:
        rq_completion.fast_path_usable.cache_clear()
