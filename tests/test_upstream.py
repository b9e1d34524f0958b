"""What queuebert relies on in RQ and redis-py beyond their documented API (queuebert.upstream) holds
for the installed releases: run this file first after an upgrade."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from rq.job import Job
from rq.worker import SimpleWorker

from producer.embedded_redis import RedisServer
from queuebert import upstream


def test_the_installed_releases_have_every_name_relied_on(conn):
    upstream.check_redis_hooks()  # redis-py's private methods that queuebert.connection extends
    assert upstream.unknown_job_attributes() == frozenset(), "a newer RQ's job model: see RQ_JOB_ATTRIBUTES"
    worker = SimpleWorker(["default"], connection=conn)
    assert upstream.ordered_queues(worker) == worker.queues
    assert isinstance(upstream.exception_handlers(worker), list)
    upstream.note_shutdown_requested(worker)
    worker.set_shutdown_requested_date()  # RQ's own method reads what was noted
    job = Job.create("queuebert.noop", connection=conn, on_failure=None)
    assert {k: upstream.callback_name(job, k) for k in ("success", "failure", "stopped")} == dict.fromkeys(
        ("success", "failure", "stopped"))
    upstream.set_job_finished(job, [1])  # what RQ's handle_job_success then stores: tests/test_rq_parity.py
    assert job.get_status(refresh=False) == "finished"


def test_a_renamed_or_reshaped_method_fails_loudly():
    class Old:
        def step(self, connection: Any, commands: Any) -> None: ...

    upstream._require(Old, "step", ("connection", "commands"))
    with pytest.raises(upstream.UpstreamChanged, match="is gone"):
        upstream._require(Old, "renamed", ("connection",))
    with pytest.raises(upstream.UpstreamChanged, match="now takes"):
        upstream._require(Old, "step", ("connection", "commands", "raise_on_error"))


def _listen(url: str) -> tuple[upstream.CommandListener, list[Any]]:
    got: list[Any] = []
    listener = upstream.CommandListener(redis.Redis.from_url(url), "qb-test-commands", got.append)
    listener.start()
    return listener, got


def _wait(check: Callable[[], object], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_command_listener_hears_commands_across_a_restart_and_stops_at_once(tmp_path):
    with RedisServer(persistence=True) as server:
        publisher = redis.Redis.from_url(server.url)
        listener, got = _listen(server.url)
        publisher.publish("qb-test-commands", "one")
        assert _wait(lambda: len(got) == 1), got
        server.stop(signal.SIGKILL)
        server.start()
        # redis-py resubscribes when it reconnects; publish until the listener is back.
        assert _wait(lambda: publisher.publish("qb-test-commands", "two") > 0, timeout=30)
        assert _wait(lambda: len(got) >= 2)
        began = time.monotonic()
        listener.stop()
        assert time.monotonic() - began < 3.5
        assert _wait(lambda: publisher.pubsub_numsub("qb-test-commands")[0][1] == 0), "it unsubscribed"


@pytest.mark.parametrize("outage", ["frozen", "killed"])
def test_command_listener_stops_at_once_with_redis_gone(outage):
    with RedisServer() as server:
        listener, _ = _listen(server.url)
        time.sleep(0.5)
        assert server.process is not None
        pid = server.process.pid
        if outage == "frozen":
            os.kill(pid, signal.SIGSTOP)
        else:
            server.stop(signal.SIGKILL)
        try:
            time.sleep(1.5)  # the listener is now in a read (frozen) or a reconnect (killed)
            began = time.monotonic()
            listener.stop()
            assert time.monotonic() - began < 3.5
        finally:
            if outage == "frozen":
                os.kill(pid, signal.SIGCONT)
