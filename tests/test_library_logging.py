"""queuebert as a library logs through the application's `logging`: nothing on the program's stdout,
nothing below warning unless the application asks for it, and an application's own structlog set-up
is left alone.

Each case is a fresh Python process (logging is process-wide) that imports `producer` and submits
to the session's redis-server.
"""

from __future__ import annotations

import subprocess

from conftest import PYTHON, REPO, subprocess_env

#: A program whose stdout is its data: it prints only the number of handles it got.
APP = """
import logging, sys
{setup}
from producer import Client

handles = Client.from_url(sys.argv[1]).submit_many(["good", "bad", "fine"], chunk_size=1)
print(len(handles))
"""


def _run_app(redis_url: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    out = subprocess.run([PYTHON, "-c", APP.format(setup=setup), redis_url], env=subprocess_env(redis_url),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_unconfigured_app_gets_nothing_on_stdout_and_nothing_below_warning(conn, redis_server):
    out = _run_app(redis_server.url)
    assert out.stdout == "3\n"
    assert "run enqueued" not in out.stderr
    assert not [line for line in out.stderr.splitlines() if "debug" in line.lower() or "info" in line.lower()]
    assert conn.llen("rq:queue:default") == 3  # the submission itself happened


def test_app_logging_config_decides_what_is_shown(conn, redis_server):
    out = _run_app(redis_server.url, setup="logging.basicConfig(level=logging.DEBUG)")
    assert out.stdout == "3\n"
    enqueued = [line for line in out.stderr.splitlines() if "run enqueued" in line]
    assert len(enqueued) == 1 and enqueued[0].startswith("DEBUG:producer.client:run enqueued run="), out.stderr
    assert "items=3" in enqueued[0] and "jobs=3" in enqueued[0]


def test_app_that_configured_structlog_keeps_its_configuration(conn, redis_server):
    setup = ("import structlog\n"
             "structlog.configure(processors=[structlog.processors.KeyValueRenderer(key_order=['event'])],\n"
             "                    logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))")
    out = _run_app(redis_server.url, setup=setup)
    assert out.stdout == "3\n"
    assert "event='run enqueued'" in out.stderr, out.stderr
