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


def connect(url: str | None = None, *, retries: int = 8, check: bool = True) -> redis.Redis:
    """A client for ``url``; ``check`` pings once so a wrong URL fails here, with the URL named.

    Retries back off from 0.1 s to 5 s, about 20 s in all, so a Redis restart is ridden out
    without the caller seeing it.
    """
    url = resolve_url(url)
    client = redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
    )
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
