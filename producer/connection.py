"""Redis connections that ride out a restart: retries with exponential backoff on every command."""

from __future__ import annotations

import os

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .settings import DEFAULT_REDIS_URL, env_name


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached at the configured URL."""


def resolve_url(url: str | None = None) -> str:
    """``--redis-url``, else ``QUEUEBERT_REDIS_URL``, else the local default."""
    return url or os.environ.get(env_name("redis_url")) or DEFAULT_REDIS_URL


SENTINEL_SCHEME = "redis+sentinel://"


def _sentinel_client(url: str, **kwargs: object) -> redis.Redis:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``: the current
    master of ``service``, found through the sentinels and found again after a failover."""
    from urllib.parse import unquote, urlsplit

    from redis.sentinel import Sentinel

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
    auth = {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None}
    sentinel = Sentinel(hosts, socket_timeout=5, **{k: v for k, v in kwargs.items() if k == "socket_connect_timeout"})
    return sentinel.master_for(service, db=db, **auth, **kwargs)  # type: ignore[arg-type]


def connect(url: str | None = None, *, retries: int = 8, check: bool = True) -> redis.Redis:
    """A client for ``url``; ``check`` pings once so a wrong URL fails here, with the URL named.

    Retries back off from 0.1 s to 5 s, about 20 s in all, so a Redis restart (or a Sentinel
    failover) is ridden out without the caller seeing it.
    """
    url = resolve_url(url)
    options = dict(
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
    )
    if url.startswith(SENTINEL_SCHEME):
        client = _sentinel_client(url, **options)
        if check:
            try:
                client.ping()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise RedisUnavailable(f"cannot reach Redis through the sentinels of {redact(url)}: {exc}") from exc
        return client
    client = redis.Redis.from_url(url, **options)  # type: ignore[arg-type]
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


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
