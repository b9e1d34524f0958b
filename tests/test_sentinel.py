"""High availability: a redis+sentinel:// URL finds the master through real sentinels."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from helpers import run_burst
from producer import Client
from producer.connection import connect
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
