"""Redis errors are weather for the worker: it waits, retries, keeps what it computed and resumes;
only a bug stops it, and then with a non-zero exit. Each test reproduces a failure found by
reviewing the worker as an adversary would (issue 10), on a real redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import current_timestamp

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert import keys
from queuebert.connection import connect
from queuebert.procs import free_port
from queuebert.serializer import JSONSerializer
from queuebert.settings import WorkerSettings

from conftest import PYTHON, REPO, subprocess_env
from helpers import start_worker


def _texts(n: int) -> list[dict[str, str]]:
    return [{"id": str(i), "text": f"text {i}: " + "the food was good but the service was slow " * (1 + i % 4)}
            for i in range(n)]


def _log_lines(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():  # type: ignore[attr-defined]
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line})
    return out


def _exactly_once(client: Client, run_id: str, n: int, timeout: float = 120) -> None:
    results = list(client.ordered_results(run_id, timeout=timeout))
    ids = Counter(r["id"] for r in results)
    assert [r["id"] for r in results] == [str(i) for i in range(n)], (
        f"lost {sum(1 for i in range(n) if not ids[str(i)])}, duplicated {sum(1 for v in ids.values() if v > 1)}")
    assert not [r for r in results if "error" in r][:1]


def test_worker_rides_out_a_redis_that_refuses_writes(tiny_models):
    """READONLY (a master demoted by a failover) for 2 s mid-run: every thread waits and resumes,
    the worker stays up, logs a line per interval (not per attempt), and every item arrives exactly
    once (a completer that died on the error reply would stall the run for good)."""
    n = 4000
    with RedisServer() as server:
        client = Client.from_url(server.url)
        run = client.enqueue_stream(_texts(n), chunk_size=8, max_pending=0)
        worker = start_worker(server.url, tiny_models["bert"], "weather", QUEUEBERT_MAX_BATCH_SIZE="16",
                              QUEUEBERT_MAX_POOL_ITEMS="128")
        try:
            admin = redis.Redis.from_url(server.url)
            deadline = time.time() + 60
            while run.progress()["done"] < 400:
                assert worker.poll() is None and time.time() < deadline, "worker did not start working"
                time.sleep(0.02)
            # A replica of a master that does not exist: every write is refused with READONLY,
            # blocked clients are kicked out, and the data stays (no sync ever happens).
            admin.replicaof("127.0.0.1", free_port())
            time.sleep(2.0)
            done_while_refused = run.progress()["done"]
            admin.replicaof("NO", "ONE")
            _exactly_once(client, run.id, n)
            assert worker.poll() is None, "the worker died of a Redis error"
            assert done_while_refused < n, "the outage came too late to matter"
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        assert worker.returncode == 0
        lines = _log_lines(worker)
        refused = [r for r in lines if str(r.get("event", "")).startswith("redis refuses")]
        assert refused, "the outage was not reported"
        assert {r.get("kind") for r in refused} <= {"readonly", "error", "connection"}
        # One line when a component's trouble starts (and one per 10 s while it lasts): a handful
        # in all, not one per retry.
        assert len([r for r in lines if "redis" in str(r.get("event", ""))]) <= 16
        assert not [r for r in lines if "Traceback" in str(r)]


def _burst_worker(conn: redis.Redis, engine: Any, **settings: Any) -> Any:
    from worker.batch_worker import BatchWorker

    s = WorkerSettings(queues=["default"], heartbeat_interval=1, **settings)
    return BatchWorker(s.queues, connection=conn, settings=s, engine=engine)


# A worker process with one method replaced by a bug, started the way `queuebert worker` starts.
_BUGGY_WORKER = """
import sys
from {module} import {cls}

def bug(self, *args):
    raise RuntimeError("bug in {method}")

{cls}.{method} = bug
from queuebert_cli.main import main
sys.exit(main(["worker", "--name", "buggy", "--log-format", "json"]))
"""


@pytest.mark.parametrize("broken", ["worker.taker.Taker.prepare", "worker.completer.Completer.complete"])
def test_a_thread_that_dies_stops_the_worker_with_an_error(conn, redis_server, tiny_models, broken):
    """A bug in the taker (or the completer) stops the worker: it exits 1 and gives back what it
    held. Half-alive is the danger: with the completer dead the rest would take the whole queue;
    with the taker dead an exit 0 reads as done to a supervisor."""
    client = Client(conn)
    run = client.enqueue_stream(_texts(40), chunk_size=4, max_pending=0)
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32",
                         QUEUEBERT_DEVICE="cpu", QUEUEBERT_HEARTBEAT_INTERVAL="1", OMP_NUM_THREADS="1")
    module, cls, method = broken.rsplit(".", 2)
    script = _BUGGY_WORKER.format(module=module, cls=cls, method=method)
    proc = subprocess.run([PYTHON, "-c", script], env=env, cwd=REPO, capture_output=True, timeout=120)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, stderr[-3000:]
    assert "worker thread died" in stderr
    # Every job is either back in the queue or (had give-back failed) in the started registry,
    # where RQ's maintenance finds it: none is held by a worker that is gone.
    queued = Queue("default", connection=conn).count
    started = len(StartedJobRegistry("default", connection=conn).get_job_ids(cleanup=False))
    assert queued == run.jobs and started == 0
    assert run.progress()["done"] == 0


def test_a_lost_take_reply_strands_no_job(conn, redis_server):
    """redis-py re-sends a command whose reply was lost. A redelivered take answers with the jobs
    the first delivery registered; running again would take other jobs and leave the first
    delivery's started for a worker that does not know it holds them (recovered only after their
    executions expire, each burning an RQ retry)."""
    from rq import SimpleWorker

    from worker.job_store import JobStore

    Client(conn).submit_many([f"text {i}" for i in range(6)], chunk_size=1)
    worker_conn = connect(redis_server.url)  # queuebert's own retry policy, as a worker has it
    rq_worker = SimpleWorker([Queue("default", connection=worker_conn, serializer=JSONSerializer)],
                             connection=worker_conn, serializer=JSONSerializer, name="lost-reply")
    store = JobStore.for_worker(rq_worker)
    real = worker_conn.parse_response
    lost = []

    def lose_first_take_reply(connection: Any, command_name: str, **options: Any) -> Any:
        reply = real(connection, command_name, **options)  # Redis ran the script
        if command_name == "EVALSHA" and not lost:
            lost.append(reply)
            raise redis.ConnectionError("reply lost on the way back")
        return reply

    worker_conn.parse_response = lose_first_take_reply  # type: ignore[method-assign]
    taken, _ = store.take(3, 30)
    assert lost, "the fault was not injected"
    registry = StartedJobRegistry("default", connection=conn)
    started = set(registry.get_job_and_execution_ids(cleanup=False))
    assert started == {(t.id, t.execution_id) for t in taken}, "a job is started for a worker that does not know it"
    assert len(taken) == 3 and Queue("default", connection=conn).count == 3
    # The next take is an ordinary one.
    more, _ = store.take(3, 30)
    assert len(more) == 3 and not {t.id for t in more} & {t.id for t in taken}


def _take_complete_consume(conn: redis.Redis, engine: Any) -> tuple[Any, Any, str, str]:
    """One job taken by worker A, which then freezes; RQ's maintenance requeues it; worker B takes
    and completes it; a consuming reader reads and deletes the whole run. Returns A, A's slot, the
    job id and the run id."""
    from worker.slots import Slot

    client = Client(conn)
    handle = client.submit_many(["a frozen worker thaws"], chunk_size=1)[0]
    a = _burst_worker(conn, engine, name="frozen-a")
    a.assemble()
    (slot,) = a.taker.take(1, 0)
    assert isinstance(slot, Slot)
    StartedJobRegistry("default", connection=conn).cleanup(timestamp=current_timestamp() + 3600)  # A looks dead
    assert Queue("default", connection=conn).get_job_ids() == [handle.job_id]
    from helpers import run_burst

    run_burst(conn, engine)  # worker B
    results = list(client.ordered_results(handle.run_id, timeout=10, consume=True))
    assert [r["id"] for r in results] == [handle.item_id]
    assert not conn.exists(Job.key_for(handle.job_id))
    return a, slot, handle.job_id, handle.run_id  # type: ignore[return-value]


def test_a_late_second_completion_does_not_resurrect_a_consumed_run(conn, engines):
    """The thawed worker completes the job again: today the run reappeared (done=2 of total=1, its
    stream back for 24 h, the item delivered again to a new subscriber) and a partial job hash was
    written. Completing a job whose run was consumed now changes nothing."""
    from worker.job_store import Completion

    a, slot, job_id, run_id = _take_complete_consume(conn, engines["bert"])
    before = {k: conn.type(k) for k in conn.keys("qb:run:*")}
    results = [{"id": "0", "label": "x", "score": 1.0}]
    a.store.complete([Completion(slot.job, json.dumps(results), run_id, 1, 0)], 86400)
    progress = Client(conn).run_progress(run_id)
    assert progress["done"] == 1 and progress["total"] == 1
    assert not conn.exists(keys.run_stream(run_id)) and not conn.exists(keys.run_done_jobs(run_id))
    assert {k: conn.type(k) for k in conn.keys("qb:run:*")} == before
    assert not conn.exists(Job.key_for(job_id)), "a partial job hash was written"
    assert list(Client(conn).subscribe(run_id, timeout=2)) == []
    # The stock-RQ and failure paths record runs through queuebert.results' script: same rule.
    from queuebert.results import record_job

    with conn.pipeline() as pipe:
        record_job(conn, pipe, run_id, job_id, results)
        pipe.execute()
    assert Client(conn).run_progress(run_id)["done"] == 1 and not conn.exists(keys.run_stream(run_id))


def test_giving_back_a_job_finished_elsewhere_writes_nothing(conn, engines):
    """A graceful stop of the thawed worker gives back the job it still thinks it holds: today that
    wrote a job hash with no TTL (status only) and queued the finished job a third time."""
    a, slot, job_id, _run_id = _take_complete_consume(conn, engines["bert"])
    a.taker.give_back([slot], "not started")
    assert not conn.exists(Job.key_for(job_id))
    assert Queue("default", connection=conn).count == 0
    leftovers = [k for k in conn.keys("*") if conn.ttl(k) == -1 and not k.startswith((b"rq:workers", b"rq:queues"))]
    assert not [k for k in leftovers if job_id.encode() in k], leftovers


def test_stats_show_a_full_redis_and_what_each_worker_waits_for(engines):
    """At maxmemory, `queuebert stats` says Redis is full, and a worker whose completions are
    refused says so in its row (written even at maxmemory)."""
    from producer.stats import gather, render

    with RedisServer(extra_args=["--maxmemory", str(2 * 2**20), "--maxmemory-policy", "noeviction"]) as server:
        conn = redis.Redis.from_url(server.url)
        worker = _burst_worker(conn, engines["bert"], name="waiting-w")
        worker.register_birth()
        worker.assemble()
        with pytest.raises(redis.exceptions.OutOfMemoryError) as refused:
            for i in range(10_000):
                conn.set(f"ballast:{i}", "x" * 10_000)
        worker.outages["complete"].failed(refused.value)
        worker._publish_redis_state()
        stats = gather(conn)
        assert stats["redis"]["full"] and stats["redis"]["maxmemory"] == 2 * 2**20
        (row,) = [w for w in stats["workers"] if w["name"] == "waiting-w"]
        assert row["redis"].startswith("complete: oom for")
        text = render(stats)
        assert "FULL: writes refused until results are consumed" in text and "complete: oom" in text
        worker.outages["complete"].recovered()
        worker._publish_redis_state()
        assert [w["redis"] for w in gather(conn)["workers"] if w["name"] == "waiting-w"] == ["ok"]
