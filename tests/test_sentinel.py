"""High availability: a redis+sentinel:// URL finds the master through real sentinels."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from helpers import run_burst
from producer import Client
from producer.connection import ReplicaAckTimeout, connect
from producer.embedded_redis import RedisServer, free_port


def test_sentinel_url_reaches_the_master(engines, tmp_path: Path):
    with RedisServer() as master:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor qbmaster 127.0.0.1 {master.port} 1\n")
        sentinel = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        try:
            url = f"redis+sentinel://127.0.0.1:{port}/qbmaster/0"
            deadline = time.time() + 20
            while True:
                try:
                    conn = connect(url)
                    break
                except Exception:
                    if time.time() > deadline:
                        pytest.fail("sentinel did not come up")
                    time.sleep(0.2)
            handle = Client.from_url(url).submit("through the sentinel")
            run_burst(conn, engines["bert"])
            assert handle.result(timeout=10)["label"]
            assert conn.connection_pool.get_master_address() == ("127.0.0.1", master.port)
        finally:
            sentinel.terminate()
            sentinel.wait(timeout=10)


# -- replica acknowledgements (QUEUEBERT_REPLICA_ACKS) ---------------------------------------------

def _commandstats(conn: redis.Redis, name: str) -> int:
    return int(conn.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def _wait_link_up(replica: redis.Redis, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while replica.info("replication").get("master_link_status") != "up":
        assert time.time() < deadline, "replica did not sync"
        time.sleep(0.05)


def test_missing_replica_ack_is_retried_then_raised():
    """A master with no replica cannot acknowledge: each write is sent again by redis-py's retry,
    then the caller sees ReplicaAckTimeout (a ConnectionError, which queuebert's loops retry)."""
    with RedisServer() as master:
        plain = redis.Redis.from_url(master.url)
        client = connect(master.url, retries=2, replica_acks=1, replica_ack_timeout_ms=50)
        assert client.get("absent") is None  # reads do not wait for replicas
        assert _commandstats(plain, "wait") == 0
        with pytest.raises(ReplicaAckTimeout):
            client.set("k", "v")
        assert _commandstats(plain, "set") == 3 and _commandstats(plain, "wait") == 3  # 1 try + 2 retries
        with pytest.raises(ReplicaAckTimeout):
            with client.pipeline(transaction=False) as pipe:
                pipe.incr("n").get("n").execute()
        with pytest.raises(ReplicaAckTimeout):
            client.register_script("return redis.call('incr', KEYS[1])")(keys=["s"])
        assert issubclass(ReplicaAckTimeout, redis.ConnectionError)


def test_watched_transaction_without_ack_raises_watch_error():
    """EXEC applied but unacknowledged must not be re-sent blindly (the WATCH is gone after a
    reconnect): the caller gets WatchError and re-reads the watched key."""
    with RedisServer() as master:
        client = connect(master.url, retries=2, replica_acks=1, replica_ack_timeout_ms=50)
        with client.pipeline() as pipe:
            pipe.watch("cursor")
            pipe.multi()
            pipe.incr("cursor")
            with pytest.raises(redis.WatchError):
                pipe.execute()
        assert redis.Redis.from_url(master.url).get("cursor") == b"1"  # applied once, not re-sent


def test_write_waits_until_a_replica_acknowledges():
    """A write that misses its ack is retried until a replica is there, and then the replica has it;
    with a replica connected, single commands, pipelines, transactions, scripts and blocking moves
    all answer as usual."""
    with RedisServer() as master, RedisServer() as replica:
        client = connect(master.url, retries=10, replica_acks=1, replica_ack_timeout_ms=200)
        replica_conn = redis.Redis(port=replica.port)
        # The replica joins half a second into the write's retries (a thread that started the
        # server itself would take it down when it ends: the server dies with its parent thread).
        late = threading.Timer(0.5, replica_conn.replicaof, ("127.0.0.1", master.port))
        late.start()
        try:
            assert client.set("k", "v") is True  # blocks in retries until the replica has synced
            assert replica_conn.get("k") == b"v"
            _wait_link_up(replica_conn)
            with client.pipeline(transaction=False) as pipe:
                assert pipe.set("a", 1).incr("a").get("a").execute() == [True, 2, b"2"]
            with client.pipeline() as pipe:
                assert pipe.set("b", 1).incr("b").get("b").execute() == [True, 2, b"2"]
            script = client.register_script("return redis.call('incr', KEYS[1])")
            assert [script(keys=["s"]), script(keys=["s"])] == [1, 2]
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                client.lpush("k", 1)
            assert client.blmove("q1", "q2", 0.2, "LEFT", "RIGHT") is None
            client.rpush("q1", "x")
            assert client.blmove("q1", "q2", 1, "LEFT", "RIGHT") == b"x"
            assert replica_conn.lrange("q2", 0, -1) == [b"x"] and replica_conn.get("b") == b"2"
        finally:
            late.join()
