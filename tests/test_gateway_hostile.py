"""``queuebert serve`` under hostile and unlucky traffic (issue 23, findings 8-12), as a real
process on a real Redis, a real worker where results matter, and raw sockets where a client must
misbehave in ways httpx will not: every failure is TEI's JSON with a status that says whose fault it
is and is counted; bodies are bounded before they are read; a cut upload keeps what arrived and
resumes; run ids are checked; slow clients are timed out."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import httpx
import pytest
import redis as redis_py

from queuebert.procs import LoggedProcess, free_port, start_process, stop_processes

from helpers import LOG_DIR, start_worker

#: Only a hang fails these: every answer below comes in well under a second when things work.
HANG_S = 20


def start_gateway(url: str, queue: str, **env: str) -> tuple[LoggedProcess, str]:
    """A `queuebert serve` process with ``env`` (``QUEUEBERT_*`` settings that have no flag)."""
    from conftest import PYTHON, REPO, subprocess_env

    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    proc = start_process([PYTHON, "-m", "queuebert_cli", "serve", "--queue", queue, "--port", str(port),
                          "--log-format", "json"], env=subprocess_env(url, **env), cwd=REPO,
                         log_path=LOG_DIR / f"gateway-hostile-{queue}-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(base + "/metrics", timeout=1)
            return proc, base
        except httpx.TransportError:
            assert proc.poll() is None, proc.log_path.read_text() if proc.log_path else "gateway exited"
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)


def connect(base: str) -> socket.socket:
    parts = urlsplit(base)
    return socket.create_connection((parts.hostname, parts.port), timeout=HANG_S)


def head(method: str, path: str, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answered(sock: socket.socket, wait: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the response on ``sock`` (Content-Length bodies only)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"connection closed before a response: {data!r}"
        data += got
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        got = sock.recv(65536)
        assert got, "connection closed in the middle of the response"
        body += got
    return int(status_line.split()[1]), headers, body


def tei_error(response: httpx.Response | tuple[int, dict[str, str], bytes], status: int) -> dict[str, str]:
    """The response's body, checked to be TEI's ``ErrorResponse`` with ``status``."""
    if isinstance(response, httpx.Response):
        code, headers, raw = response.status_code, dict(response.headers), response.content
    else:
        code, headers, raw = response
    assert code == status, (code, raw[:300])
    assert headers["content-type"].startswith("application/json"), (headers, raw[:300])
    body = json.loads(raw)
    assert set(body) == {"error", "error_type"} and "Traceback" not in body["error"], body
    return body


def run_ids_on(conn: redis_py.Redis, queue: str) -> list[str]:
    """The runs whose jobs go to ``queue`` (each test's gateway has a queue of its own)."""
    found = []
    for key in conn.scan_iter(match="qb:run:{*}", count=1000):
        if key.endswith(b"}") and conn.hget(key, "queue") == queue.encode():
            found.append(key.decode()[len("qb:run:{"):-1])
    return found


@pytest.fixture(scope="module")
def gateway(redis_server) -> Iterator[str]:
    """A gateway on queue "hostile" with no worker (nothing here needs a result)."""
    proc, base = start_gateway(redis_server.url, "hostile")
    yield base
    stop_processes([proc], 15)


def test_every_error_is_teis_json_and_counted(gateway, redis_server):
    """Finding 8: deeply nested JSON (on a TEI route and in a /runs line), a /runs retry whose body
    does not match its run, a Redis error and a bad Last-Event-ID each get TEI's JSON error with a
    sensible status, counted in queuebert_gateway_requests_total; none is a text/plain 500 or a
    stream cut off after its headers."""
    deep = b"[" * 100_000
    bad = httpx.post(f"{gateway}/predict", content=deep, headers={"content-type": "application/json"})
    assert "recursion" in tei_error(bad, 400)["error"]

    lines = deep + b"\n" + json.dumps({"id": "ok", "text": "fine"}).encode() + b"\n"
    created = httpx.post(f"{gateway}/runs?run_id=deep", content=lines)
    assert created.status_code == 201, created.text
    assert created.json()["enqueued"] == 1
    assert "nested too deeply" in created.json()["unreadable_lines"][0]["error"]

    # The same body again under its run id is the same run (nothing sent twice); another body is
    # a conflict the client must resolve, not a server error.
    again = httpx.post(f"{gateway}/runs?run_id=deep", content=lines)
    assert again.status_code == 201 and again.json()["enqueued"] == 1, again.text
    other = httpx.post(f"{gateway}/runs?run_id=deep", content=lines + b'"one more"\n')
    assert "is complete with 1 items but this input has 2" in tei_error(other, 409)["error"]

    # Redis refusing a command (the queue's key of the wrong type): 503 with Retry-After.
    conn = redis_py.Redis.from_url(redis_server.url)
    conn.set("rq:queue:hostile", "not a list")
    try:
        time.sleep(0.2)  # past the gateway's cached queue depth
        down = httpx.post(f"{gateway}/predict", json={"inputs": "hello"})
        assert tei_error(down, 503)["error_type"] == "Unhealthy" and down.headers["retry-after"]
    finally:
        conn.delete("rq:queue:hostile")
        conn.close()

    for last in ("9" * 5000, "abc", "1-0/", "99999999999999999999-0"):
        events = httpx.get(f"{gateway}/runs/deep/events", headers={"Last-Event-ID": last})
        assert tei_error(events, 422)["error_type"] == "Validation", last

    metrics = httpx.get(f"{gateway}/metrics").text
    for route, status in [("/predict", 400), ("/runs", 409), ("/predict", 503), ("/runs/{run_id}/events", 422)]:
        assert f'queuebert_gateway_requests_total{{route="{route}",status="{status}"}}' in metrics, (route, status)


def test_bodies_are_bounded_before_they_are_read(gateway):
    """Finding 9: a declared Content-Length over the limit is refused before any body is sent, a
    chunked body as soon as it passes the limit (the client never has to send the rest), and a
    /runs line over max_line_bytes is skipped and reported while the lines around it go in."""
    with connect(gateway) as sock:
        sock.sendall(head("POST", "/predict", content_type="application/json", content_length="100000000"))
        tei_error(read_response(sock), 413)

    with connect(gateway) as sock:
        sock.sendall(head("POST", "/predict", content_type="application/json", transfer_encoding="chunked"))
        sent = 0
        piece = b"[" + b" " * 65_535
        while not answered(sock) and sent < 20_000_000:  # the old gateway read all 20 MB, then waited for more
            try:
                sock.sendall(chunk(piece))
            except OSError:  # it closed the connection after answering
                break
            sent += len(piece)
        assert answered(sock, HANG_S), f"no answer after {sent} bytes"
        tei_error(read_response(sock), 413)
        assert sent < 10_000_000, f"the gateway read {sent} bytes of a body limited to 2 MB"

    long_line = json.dumps({"id": "long", "text": "x" * 1_500_000}).encode()
    body = b"\n".join([b'{"id": "a", "text": "before"}', long_line, b'{"id": "b", "text": "after"}']) + b"\n"
    created = httpx.post(f"{gateway}/runs", content=(body[i:i + 65_536] for i in range(0, len(body), 65_536)))
    assert created.status_code == 201, created.text
    assert created.json()["enqueued"] == 2
    (unreadable,) = created.json()["unreadable_lines"]
    assert unreadable["line"] == 2 and "longer than 1000000 bytes" in unreadable["error"]


def test_line_splitter_numbers_lines_and_bounds_them():
    """The /runs splitter (finding 9) without HTTP: lines cut across chunks come out whole and
    numbered, a blank line counts, an over-long line is reported once (its rest dropped, not
    held), and a last line without its line end is kept."""
    from producer.readers import InputError, LineSplitter

    splitter = LineSplitter(max_line_bytes=8)
    out = [*splitter.feed(b'"ab'), *splitter.feed(b'c"\n\n0123'), *splitter.feed(b"456789"),
           *splitter.feed(b"abc\n1\n"), *splitter.feed(b"tail"), *splitter.end()]
    assert [(n, line if isinstance(line, bytes) else "error") for n, line in out] == [
        (1, b'"abc"'), (2, b""), (3, "error"), (4, b"1"), (5, b"tail")]
    assert isinstance(out[2][1], InputError) and "longer than 8 bytes" in str(out[2][1])


def test_run_ids_are_checked(gateway):
    """Finding 12: a run id holds letters, digits, '_', '.' and '-' (what new_id makes, and what
    people name runs); anything else, path-like or with Redis's key syntax, is refused with 422."""
    assert httpx.post(f"{gateway}/runs?run_id=reviews-2024_06.b", content=b'"x"\n').status_code == 201
    for run_id in ("../../etc", "a}:b{", "a b", "x" * 129, ".hidden", "a\nb"):
        refused = httpx.post(f"{gateway}/runs", params={"run_id": run_id}, content=b'"x"\n')
        assert tei_error(refused, 422)["error_type"] == "Validation", run_id
    for path in (f"/runs/{quote('a}:b{')}", f"/runs/{quote('a}:b{')}/results", f"/runs/{quote('..')}x/events"):
        tei_error(httpx.get(gateway + path), 422)


def test_a_cut_upload_keeps_what_arrived_and_resumes(redis_server, tiny_models):
    """Finding 11: 1,100 lines then a disconnect. Without a run id (the client never learns the
    one made up), the run is sealed with all 1,100. With one, every whole chunk that arrived is kept
    and the run stays open; the same body sent again under that id (here with 200 more lines)
    enqueues only the rest, and the results read back complete, each item once, in order."""
    queue = "hostile-cut"
    worker = start_worker(redis_server.url, tiny_models["bert"], "hostile-cut", QUEUEBERT_QUEUES=queue)
    proc, base = start_gateway(redis_server.url, queue)
    conn = redis_py.Redis.from_url(redis_server.url)
    lines = [json.dumps({"id": f"l{i}", "text": f"line {i} " + "good " * (i % 4)}).encode() for i in range(1300)]

    def cut_upload(path: str, sent: list[bytes]) -> None:
        with connect(base) as sock:
            sock.sendall(head("POST", path, content_type="application/x-ndjson", transfer_encoding="chunked"))
            sock.sendall(chunk(b"\n".join(sent) + b"\n"))
            time.sleep(1.5)  # the gateway reads them (in milliseconds), then the client goes away

    def progress(run_id: str, sealed: bool) -> dict[str, int]:
        deadline = time.monotonic() + HANG_S
        while True:
            got = httpx.get(f"{base}/runs/{run_id}")
            if got.status_code == 200 and bool(got.json()["sealed"]) == sealed:
                return got.json()
            assert time.monotonic() < deadline, got.text
            time.sleep(0.1)

    try:
        cut_upload("/runs", lines[:1100])
        deadline = time.monotonic() + HANG_S
        while not (found := run_ids_on(conn, queue)):
            assert time.monotonic() < deadline, "no run"
            time.sleep(0.1)
        (made_up,) = found
        assert progress(made_up, sealed=True)["total"] == 1100

        cut_upload("/runs?run_id=resume-me", lines[:1100])
        kept = progress("resume-me", sealed=False)
        assert 0 < kept["enqueued"] <= 1100, kept

        retried = httpx.post(f"{base}/runs?run_id=resume-me", content=b"\n".join(lines) + b"\n", timeout=HANG_S)
        assert retried.status_code == 201, retried.text
        assert retried.json()["enqueued"] == 1300
        with httpx.stream("GET", f"{base}/runs/resume-me/results", timeout=60) as response:
            ids = [json.loads(line)["id"] for line in response.iter_lines() if line]
        assert ids == [f"l{i}" for i in range(1300)]
    finally:
        conn.close()
        stop_processes([proc, worker], 15)


def test_slow_clients_are_timed_out_and_connections_capped(redis_server):
    """Finding 10 (with QUEUEBERT_BODY_TIMEOUT=2 and QUEUEBERT_LIMIT_CONCURRENCY=8): a body trickled
    a byte every 0.5 s gets 408 once 2 s have passed instead of being read to its end, as does a
    /runs body that pauses for 2 s (keeping the lines that came); while 7 half-sent requests hold
    their connections an 8th is refused (503) at once, and once their bodies time out the gateway
    answers again."""
    proc, base = start_gateway(redis_server.url, "hostile-slow", QUEUEBERT_BODY_TIMEOUT="2",
                               QUEUEBERT_LIMIT_CONCURRENCY="8")
    held: list[socket.socket] = []
    try:
        with connect(base) as sock:
            body = b"x" * 40  # not JSON: the old gateway answered it 400, 20 s later, once all of it came
            sock.sendall(head("POST", "/predict", content_type="application/json", content_length=str(len(body))))
            for byte in body:
                if answered(sock, 0.5):
                    break
                sock.sendall(bytes([byte]))
            response = read_response(sock)
            assert "within 2 s" in tei_error(response, 408)["error"]
            assert response[1]["connection"] == "close"

        with connect(base) as sock:  # a /runs body that stops coming: 408, and what arrived is kept
            sock.sendall(head("POST", "/runs", content_type="application/x-ndjson", transfer_encoding="chunked"))
            sock.sendall(chunk(b'"one"\n"two"\n"three"\n'))
            assert answered(sock, HANG_S)
            assert "kept the 3 items that arrived; sealed with them" in tei_error(read_response(sock), 408)["error"]

        for _ in range(7):  # with the request below, 8 connections: uvicorn refuses the 8th
            sock = connect(base)
            sock.sendall(head("POST", "/predict", content_type="application/json", content_length="100") + b"{")
            held.append(sock)
        time.sleep(0.5)
        assert httpx.get(f"{base}/metrics", timeout=HANG_S).status_code == 503
        for sock in held:
            assert answered(sock, HANG_S)
            tei_error(read_response(sock), 408)
        time.sleep(0.5)
        assert httpx.get(f"{base}/metrics", timeout=HANG_S).status_code == 200
    finally:
        for sock in held:
            sock.close()
        stop_processes([proc], 15)
