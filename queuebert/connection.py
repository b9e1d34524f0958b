"""Redis connections that ride out a restart: retries with exponential backoff on every command.

With replica acknowledgements on (``QUEUEBERT_REPLICA_ACKS=N``), every write also waits until N
replicas have it (see :class:`AckingRedis`), so a master that dies and is replaced by a replica
loses no write that a caller was told had succeeded.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import redis
import structlog
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from .settings import DEFAULT_REDIS_URL, DEFAULT_REPLICA_ACK_TIMEOUT_MS, env_name
from .upstream import CommandHooks, PipelineHooks, SentinelConnectionHooks, check_redis_hooks

log = structlog.get_logger(__name__)


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached at the configured URL."""


def resolve_url(url: str | None = None) -> str:
    """``--redis-url``, else ``QUEUEBERT_REDIS_URL``, else the local default."""
    return url or os.environ.get(env_name("redis_url")) or DEFAULT_REDIS_URL


SENTINEL_SCHEME = "redis+sentinel://"


def _sentinel_client(url: str, redis_class: type[Any] = redis.Redis, sentinel_class: type[Any] | None = None,
                     **kwargs: Any) -> Any:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``: the current
    master of ``service``, found through the sentinels and found again after a failover.
    ``sentinel_class``: redis-py's ``Sentinel`` (default) or redis.asyncio's."""
    from urllib.parse import unquote, urlsplit

    from redis.sentinel import Sentinel as SyncSentinel

    Sentinel = sentinel_class or SyncSentinel

    parts = urlsplit("redis://" + url[len(SENTINEL_SCHEME):])
    netloc = parts.netloc.rsplit("@", 1)[-1]
    hosts = []
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        hosts.append((host or hostport, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"{redact(url)}: a sentinel URL names the service: redis+sentinel://host:26379/mymaster")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    auth: dict[str, Any] = {"username": unquote(parts.username) if parts.username else None,
                            "password": unquote(parts.password) if parts.password else None}
    check_redis_hooks()
    sentinel = Sentinel(hosts, socket_timeout=5, **{k: v for k, v in kwargs.items() if k == "socket_connect_timeout"})
    # The synchronous client reconnects through _CurrentMasterConnection (below); redis.asyncio's
    # sentinel connections keep redis-py's own.
    sync: dict[str, Any] = {"connection_class": _CurrentMasterConnection} if sentinel_class is None else {}
    return sentinel.master_for(service, redis_class=redis_class, db=db, **sync, **auth, **kwargs)


class _CurrentMasterConnection(SentinelConnectionHooks):
    """redis-py's sentinel connection, asking the sentinels for the master on every reconnect.

    redis-py asks them only when the pool hands out a connection: a command's own retries
    reconnect to the address the connection had (redis/redis-py#3874). So a command in flight
    when the master dies knocks on the old master until its retries run out, refused while it is
    down and READONLY once it is back as a replica (40 s with 12 retries), and meanwhile that
    producer or worker thread does nothing.
    """

    def connect_to_address(self, address: tuple[str, int]) -> None:
        # Reached from redis-py's connect(), with an address fresh from the sentinels.
        self.host, self.port = address
        self.open_socket(self.connection_pool.check_connection, False)

    def reconnect(self, check_health: bool, retry_socket_connect: bool) -> None:
        # Every other (re)connect, a command's retries included. One try per address, as in
        # connect(): the command's retry asks the sentinels again rather than retrying a master
        # that may be gone.
        if not self.has_socket and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
            retry_socket_connect = False
        self.open_socket(check_health, retry_socket_connect)


def connect(
    url: str | None = None, *, retries: int = 8, check: bool = True,
    replica_acks: int | None = None, replica_ack_timeout_ms: int | None = None,
    socket_timeout: float | None = None,
) -> redis.Redis:
    """A client for ``url``; ``check`` pings once so a wrong URL fails here, with the URL named.

    Retries back off from 0.1 s to 5 s, about 20 s in all, so a Redis restart (or a Sentinel
    failover) is ridden out without the caller seeing it.

    ``replica_acks`` (default: ``QUEUEBERT_REPLICA_ACKS``, else 0) above 0 returns an
    :class:`AckingRedis`: each write is followed by ``WAIT replica_acks replica_ack_timeout_ms``
    and retried until enough replicas acknowledge it.

    ``socket_timeout`` bounds each command (None: a command waits as long as Redis takes): for a
    caller that must answer in time whatever Redis does, such as a metrics scrape.
    """
    url = resolve_url(url)
    acks, ack_timeout_ms = _replica_ack_settings(replica_acks, replica_ack_timeout_ms)
    redis_class = acking_redis_class(acks, ack_timeout_ms) if acks > 0 else redis.Redis
    options: dict[str, Any] = dict(
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        **({"socket_timeout": socket_timeout} if socket_timeout is not None else {}),
    )
    if url.startswith(SENTINEL_SCHEME):
        client = _sentinel_client(url, redis_class=redis_class, **options)
        if check:
            try:
                client.ping()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise RedisUnavailable(f"cannot reach Redis through the sentinels of {redact(url)}: {exc}") from exc
        return client
    client = redis_class.from_url(url, **options)
    if check:
        # One quick probe without retries: a wrong URL should fail now, not after 20 s of backoff.
        probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            probe.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
        finally:
            probe.close()
    return client


def connect_async(
    url: str | None = None, *, retries: int = 8, replica_acks: int | None = None,
    replica_ack_timeout_ms: int | None = None, max_connections: int = 100, **extra: Any,
) -> Any:
    """A redis.asyncio client for ``url`` with :func:`connect`'s retries and timeouts (a URL is
    only tried on the first command: connecting is I/O, and this is not a coroutine). ``extra``
    goes to redis.asyncio as is (``client_name``, ``socket_timeout``...).

    The retries matter more here than in redis-py: ``redis.asyncio.Redis.from_url`` retries
    nothing unless told to, so a dropped connection would reach every caller. The pool is a
    ``BlockingConnectionPool`` of ``max_connections``: a burst of concurrent calls waits for a
    connection rather than failing with "Too many connections" at the pool's limit.

    Replica acknowledgements (``replica_acks`` > 0) are not implemented for redis.asyncio: such a
    setting raises here rather than writing without the durability it asks for.
    """
    import redis.asyncio
    import redis.asyncio.retry
    import redis.asyncio.sentinel

    url = resolve_url(url)
    acks, _ack_timeout_ms = _replica_ack_settings(replica_acks, replica_ack_timeout_ms)
    if acks > 0:
        raise NotImplementedError(f"replica_acks={acks}: waiting for replica acknowledgements is implemented for "
                                  "the synchronous Client only; use Client, or replica_acks=0")
    options = dict(
        retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        **extra,
    )
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(url, redis_class=redis.asyncio.Redis, sentinel_class=redis.asyncio.sentinel.Sentinel,
                                max_connections=max_connections, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=max_connections, **options)
    return redis.asyncio.Redis.from_pool(pool)


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- replica acknowledgements ---------------------------------------------------------------------

def _replica_ack_settings(acks: int | None, timeout_ms: int | None) -> tuple[int, int]:
    """Explicit arguments, else ``QUEUEBERT_REPLICA_ACKS`` / ``QUEUEBERT_REPLICA_ACK_TIMEOUT_MS``."""
    if acks is None:
        acks = int(os.environ.get(env_name("replica_acks")) or 0)
    if timeout_ms is None:
        timeout_ms = int(os.environ.get(env_name("replica_ack_timeout_ms")) or DEFAULT_REPLICA_ACK_TIMEOUT_MS)
    if acks < 0 or timeout_ms <= 0:
        raise ValueError(f"replica_acks must be >= 0 and replica_ack_timeout_ms > 0 (got {acks}, {timeout_ms})")
    return acks, timeout_ms


class ReplicaAckTimeout(redis.ConnectionError):
    """Fewer replicas than asked acknowledged a write within the timeout: it counts as not written.

    A ``ConnectionError`` on purpose: redis-py's ``Retry`` (and every retry loop in queuebert that
    rides out a Redis outage) re-sends the write, which is safe because queuebert's writes are
    idempotent, and a watched transaction ends in ``WatchError`` so its caller re-checks instead.
    """


#: Commands that change no data (or only connection state), so they skip the ``WAIT``. A list of
#: reads rather than of writes because the two mistakes differ: a read missing here costs one
#: needless ``WAIT`` (it returns at once while the replicas are connected), a write missing from a
#: list of writes would silently go unacknowledged. It covers what queuebert, RQ and redis-py's
#: own helpers send; ``EVAL``/``EVALSHA`` count as writes (only the ``_RO`` forms are known reads).
READ_COMMANDS = frozenset("""
    GET MGET STRLEN GETRANGE SUBSTR EXISTS TYPE TTL PTTL EXPIRETIME PEXPIRETIME KEYS SCAN RANDOMKEY DBSIZE
    HGET HMGET HGETALL HKEYS HVALS HLEN HEXISTS HSCAN HSTRLEN HRANDFIELD
    LRANGE LLEN LINDEX LPOS
    SMEMBERS SISMEMBER SMISMEMBER SCARD SSCAN SRANDMEMBER SINTER SUNION SDIFF SINTERCARD
    ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE ZRANGEBYLEX ZREVRANGEBYLEX ZCARD ZSCORE ZMSCORE
    ZCOUNT ZLEXCOUNT ZRANK ZREVRANK ZSCAN ZRANDMEMBER
    XRANGE XREVRANGE XLEN XREAD XPENDING
    EVAL_RO EVALSHA_RO FCALL_RO
    PING ECHO TIME ROLE LASTSAVE INFO DUMP
    WAIT WAITAOF MULTI EXEC DISCARD WATCH UNWATCH SELECT AUTH HELLO QUIT RESET READONLY READWRITE
    PUBLISH SUBSCRIBE UNSUBSCRIBE PSUBSCRIBE PUNSUBSCRIBE
""".split())
#: Container commands whose subcommands are all administration or introspection
#: (``CLIENT SETNAME``, ``SCRIPT LOAD``, ``CONFIG GET``, ``XINFO STREAM``...), never data writes
#: that a failover could lose (a script's effects replicate, not the script).
ADMIN_COMMANDS = frozenset("""
    CLIENT CONFIG SCRIPT COMMAND OBJECT MEMORY XINFO DEBUG SLOWLOG LATENCY PUBSUB MODULE ACL SENTINEL CLUSTER
""".split())


def is_write(command_name: Any) -> bool:
    """Whether a command (``"SET"``, ``"CLIENT SETNAME"``, ``b"hset"``) needs replica acks."""
    name = command_name.decode() if isinstance(command_name, bytes) else str(command_name)
    first = name.split(" ", 1)[0].upper()
    return first not in READ_COMMANDS and first not in ADMIN_COMMANDS


class _MissingAckLog:
    """One warning per interval, not one per attempt: during a failover every write of every
    thread misses its acks for seconds, and the log should say so once, with a count."""

    interval = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0.0
        self._suppressed = 0

    def warn(self, wanted: int, acked: Any, timeout_ms: int, command: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._suppressed += 1
                return
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
        log.warning("writes not acknowledged by enough replicas; retrying them", wanted=wanted, acked=acked,
                    timeout_ms=timeout_ms, command=command, also_missed_since_last_warning=suppressed)


_missing_acks = _MissingAckLog()


class _AckingMixin(CommandHooks):
    """What :class:`AckingRedis` and :class:`AckingPipeline` share: the ``WAIT`` and its check."""

    #: Set per class by :func:`acking_redis_class` (class attributes, so RQ code that rebuilds a
    #: client as ``type(connection)(connection_pool=...)`` keeps the setting).
    replica_acks = 0
    replica_ack_timeout_ms = DEFAULT_REPLICA_ACK_TIMEOUT_MS

    def _wait_args(self) -> tuple[str, int, int]:
        return ("WAIT", self.replica_acks, self.replica_ack_timeout_ms)

    def _check_acks(self, acked: Any, command: str) -> None:
        if isinstance(acked, int) and acked >= self.replica_acks:
            return
        _missing_acks.warn(self.replica_acks, acked, self.replica_ack_timeout_ms, command)
        raise ReplicaAckTimeout(f"{command}: {acked} of {self.replica_acks} replica(s) acknowledged it "
                                f"within {self.replica_ack_timeout_ms} ms")

    def send_and_parse(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        """A write and its ``WAIT`` go out together (one round trip, the same connection: ``WAIT``
        counts the acks of this connection's own writes). Runs inside redis-py's retry loop, so a
        missing ack disconnects and re-sends the command like a dropped connection would.

        Blocking writes (``BLMOVE`` with a timeout) work unchanged: Redis runs the queued ``WAIT``
        once the blocked command returns."""
        if not is_write(command_name):
            return super().send_and_parse(conn, command_name, *args, **options)
        conn.send_packed_command(conn.pack_commands([args, self._wait_args()]))
        error: redis.ResponseError | None = None
        response = None
        try:
            response = self.parse_response(conn, command_name, **options)
        except redis.ResponseError as exc:
            error = exc  # read the WAIT reply first, so the connection stays in step
        try:
            acked = conn.read_response()
        except redis.ResponseError as exc:
            acked = exc
        if error is not None:
            raise error  # the command failed (NOSCRIPT, WRONGTYPE, READONLY...): its own error wins
        if isinstance(acked, Exception):
            raise acked
        self._check_acks(acked, str(command_name))
        return response


class AckingPipeline(_AckingMixin, PipelineHooks):
    """A pipeline whose writes count only once ``replica_acks`` replicas have them.

    Non-transactional: ``WAIT`` goes out as the last command of the same round trip.
    Transactional: ``WAIT`` follows ``EXEC`` in a second round trip on the same connection (inside
    ``MULTI`` it would not block). Commands sent before ``MULTI`` while watching (``WATCH``, reads)
    go through :meth:`send_and_parse` like single commands.
    """

    def run_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        if not any(is_write(args[0]) for args, _ in commands):
            return super().run_pipeline(connection, commands, raise_on_error)
        responses = super().run_pipeline(connection, [*commands, (self._wait_args(), {})], False)
        acked = responses.pop()
        if raise_on_error:
            self.raise_first_error(commands, responses)
        if isinstance(acked, Exception):
            raise acked
        self._check_acks(acked, f"pipeline of {len(commands)}")
        return responses

    def run_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        watched = self.watching
        data = super().run_transaction(connection, commands, raise_on_error)
        if not any(is_write(args[0]) for args, _ in commands):
            return data
        connection.send_command(*self._wait_args())
        acked = connection.read_response()
        try:
            self._check_acks(acked, f"transaction of {len(commands)}")
        except ReplicaAckTimeout:
            # EXEC cleared the watch, so redis-py would re-send this transaction unguarded. Put the
            # flag back: its retry handler then raises WatchError, and the caller re-reads the
            # watched keys and decides again, as for any transaction whose keys moved.
            self.watching = watched
            raise
        return data


class AckingRedis(_AckingMixin, redis.Redis):
    """``redis.Redis`` whose write commands, and pipelines holding writes, are followed by
    ``WAIT replica_acks replica_ack_timeout_ms`` on the same connection; fewer acks than asked
    raise :class:`ReplicaAckTimeout` inside redis-py's retry, so the write is sent again (after
    backoff) until enough replicas have it, or the retries run out and the caller sees a
    ``ConnectionError``. Make one with :func:`acking_redis_class`."""

    pipeline_class: type[AckingPipeline] = AckingPipeline

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return self.pipeline_class(self.connection_pool, self.response_callbacks, transaction, shard_hint)


@functools.cache
def acking_redis_class(replica_acks: int, timeout_ms: int = DEFAULT_REPLICA_ACK_TIMEOUT_MS) -> type[AckingRedis]:
    """An :class:`AckingRedis` subclass bound to ``replica_acks`` and ``timeout_ms`` (a class, so
    ``Sentinel.master_for(redis_class=...)`` and ``from_url`` can build it)."""
    check_redis_hooks()
    settings = {"replica_acks": replica_acks, "replica_ack_timeout_ms": timeout_ms}
    pipeline_class = type(f"AckingPipeline{replica_acks}", (AckingPipeline,), settings)
    return type(f"AckingRedis{replica_acks}", (AckingRedis,), {**settings, "pipeline_class": pipeline_class})
