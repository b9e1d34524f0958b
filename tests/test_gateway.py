"""``queuebert serve`` as a real HTTP server in front of real workers and a real Redis: a TEI
client nobody here wrote (huggingface_hub's InferenceClient), httpx on every route, SSE that
drops and resumes, pressure (429, 504, deadlines), auth, and 256 concurrent one-text requests
with a worker SIGKILLed among them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from queuebert.procs import LoggedProcess, stop_processes

from helpers import start_gateway, start_worker

API_KEY = "s3cret-token"


def _pipeline(model: Path, inputs: list, **kwargs) -> list:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model), device="cpu", dtype="float32")
    return pipe(inputs, top_k=None, **kwargs)


@pytest.fixture(scope="module")
def served(redis_server, tiny_models) -> Iterator[dict[str, object]]:
    """A classifier (bert) on queue "cls" and a cross-encoder on queue "rr", each with a worker
    and a gateway; the "cls" gateway asks for a bearer token."""
    procs: list[LoggedProcess] = []
    try:
        procs.append(start_worker(redis_server.url, tiny_models["bert"], "gw-cls", QUEUEBERT_QUEUES="cls"))
        procs.append(start_worker(redis_server.url, tiny_models["crossencoder"], "gw-rr", QUEUEBERT_QUEUES="rr"))
        cls_proc, cls = start_gateway(redis_server.url, "cls", api_key=API_KEY)
        rr_proc, rr = start_gateway(redis_server.url, "rr")
        procs += [cls_proc, rr_proc]
        client = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        deadline = time.monotonic() + 120
        while client.get(cls + "/health").status_code != 200 or httpx.get(rr + "/health").status_code != 200:
            assert time.monotonic() < deadline, "workers never became healthy"
            time.sleep(0.2)
        yield {"cls": cls, "rr": rr, "client": client, "procs": procs}
        client.close()
    finally:
        stop_processes(procs, 15)


def test_inference_client_matches_pipeline(served, tiny_models):
    """huggingface_hub's InferenceClient, pointed at the gateway, gets the pipeline's labels and
    scores. With HF_HUB_OFFLINE=1 it refuses even a local URL, so it runs in a process without it."""
    texts = ["I loved this film", "terrible service, cold food", "東京の寿司は最高でした。"]
    script = (
        "import json, sys\n"
        "from huggingface_hub import InferenceClient\n"
        f"c = InferenceClient(model={served['cls']!r}, token={API_KEY!r})\n"
        "texts = json.loads(sys.argv[1])\n"
        "out = [[{'label': e.label, 'score': e.score} for e in c.text_classification(t)] for t in texts]\n"
        "top2 = [{'label': e.label, 'score': e.score} for e in c.text_classification(texts[0], top_k=1)]\n"
        "print(json.dumps({'all': out, 'top1': top2}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = _pipeline(tiny_models["bert"], texts)
    for g, w in zip(got["all"], want):
        assert [e["label"] for e in g] == [e["label"] for e in w]
        assert [e["score"] for e in g] == pytest.approx([e["score"] for e in w], abs=1e-5)
    assert got["top1"] == [pytest.approx(want[0][0])] or got["top1"][0]["label"] == want[0][0]["label"]
    assert len(got["top1"]) == 1


def test_tei_routes_with_httpx(served, tiny_models):
    client: httpx.Client = served["client"]  # type: ignore[assignment]
    cls, rr = served["cls"], served["rr"]
    # /predict: one text, a pair, a batch; raw_scores gives the logits.
    single = client.post(f"{cls}/predict", json={"inputs": "I loved this film"}).json()
    (want,) = _pipeline(tiny_models["bert"], ["I loved this film"])
    assert [p["label"] for p in single] == [w["label"] for w in want]
    assert [p["score"] for p in single] == pytest.approx([w["score"] for w in want], abs=1e-5)
    pair = client.post(f"{cls}/predict", json={"inputs": ["is it good?", "it is great"]}).json()
    (want,) = _pipeline(tiny_models["bert"], [{"text": "is it good?", "text_pair": "it is great"}])
    assert {p["label"]: p["score"] for p in pair} == pytest.approx({w["label"]: w["score"] for w in want}, abs=1e-5)
    batch = client.post(f"{cls}/predict", json={"inputs": [["a"], ["b", "c"], ["d"]]}).json()
    assert len(batch) == 3 and all(len(b) == 2 for b in batch)
    raw = client.post(f"{cls}/predict", json={"inputs": "x", "raw_scores": True}).json()
    want = _pipeline(tiny_models["bert"], ["x"], function_to_apply="none")[0]
    assert {p["label"]: p["score"] for p in raw} == pytest.approx({w["label"]: w["score"] for w in want}, abs=1e-5)
    # /rerank on the cross-encoder's gateway, and POST / dispatched to rerank there.
    texts = ["paris is in france", "bananas are yellow", "the capital of france is paris"]
    ranked = httpx.post(f"{rr}/rerank", json={"query": "capital of france", "texts": texts, "return_text": True},
                        timeout=60).json()
    want = _pipeline(tiny_models["crossencoder"], [{"text": "capital of france", "text_pair": t} for t in texts])
    scores = [w[0]["score"] for w in want]
    assert [r["index"] for r in ranked] == sorted(range(3), key=lambda i: -scores[i])
    assert [r["text"] for r in ranked] == [texts[r["index"]] for r in ranked]
    assert [r["score"] for r in ranked] == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    assert httpx.post(f"{rr}/", json={"query": "q", "texts": ["a"]}, timeout=60).json()[0]["index"] == 0
    # /info from what the workers publish; /health; /metrics counts requests by route and status.
    info = client.get(f"{cls}/info").json()
    assert info["model_id"] == str(tiny_models["bert"])
    assert info["model_type"]["classifier"]["id2label"] == {"0": "bert_label_0", "1": "bert_label_1"}
    assert info["max_input_length"] == 64
    assert "reranker" in httpx.get(f"{rr}/info").json()["model_type"]
    assert client.get(f"{cls}/health").status_code == 200
    metrics = client.get(f"{cls}/metrics").text
    assert 'queuebert_gateway_requests_total{route="/predict",status="200"}' in metrics
    # Bad bodies: clear JSON errors with TEI's statuses.
    bad = client.post(f"{cls}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    bad = client.post(f"{cls}/predict", json={"inputs": ["a", "b", "c"]})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"
    bad = client.post(f"{cls}/predict", json={"inputs": ""})
    assert bad.status_code == 400 and bad.json()["error_type"] == "Empty"
    assert httpx.post(f"{rr}/rerank", json={"query": "q", "texts": []}).status_code == 400


def test_auth_is_constant_time_bearer(served):
    cls = served["cls"]
    assert httpx.post(f"{cls}/predict", json={"inputs": "x"}).status_code == 401
    assert httpx.post(f"{cls}/predict", json={"inputs": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{cls}/health").status_code == 200  # probes need no token


def test_runs_stream_results_and_resumable_events(served):
    client: httpx.Client = served["client"]  # type: ignore[assignment]
    cls = served["cls"]
    lines = [json.dumps({"id": f"r{i}", "text": f"review {i}: " + "good " * (i % 5)}) for i in range(300)]
    lines.insert(7, "{broken")

    def body() -> Iterator[bytes]:  # sent in pieces that cut lines in half
        data = ("\n".join(lines) + "\n").encode()
        for i in range(0, len(data), 997):
            yield data[i:i + 997]

    created = client.post(f"{cls}/runs", content=body(), headers={"content-type": "application/x-ndjson"})
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["enqueued"] == 300 and run["unreadable_lines"][0]["line"] == 8
    with client.stream("GET", f"{cls}/runs/{run['run_id']}/results") as response:
        results = [json.loads(line) for line in response.iter_lines() if line]
    assert [r["id"] for r in results] == [f"r{i}" for i in range(300)]
    progress = client.get(f"{cls}/runs/{run['run_id']}").json()
    assert progress["done"] == 300 and progress["sealed"]
    assert client.get(f"{cls}/runs/nope").status_code == 404
    # SSE: read 100 events, drop the connection, resume with Last-Event-ID.
    seen: list[str] = []
    last = None
    with client.stream("GET", f"{cls}/runs/{run['run_id']}/events") as response:
        for line in response.iter_lines():
            if line.startswith("id:"):
                last = line[3:].strip()
            elif line.startswith("data:") and last is not None:
                seen.append(json.loads(line[5:])["id"])
                if len(seen) == 100:
                    break
    ended = False
    with client.stream("GET", f"{cls}/runs/{run['run_id']}/events", headers={"Last-Event-ID": last}) as response:
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "result":
                seen.append(json.loads(line[5:])["id"])
            elif line.startswith("data:") and event == "end":
                ended = True
                break
    assert ended
    counts = Counter(seen)
    assert len(counts) == 300 and set(counts.values()) == {1}


def test_runs_read_lines_as_queuebert_enqueue_does(served):
    """Fields other than text and id go to meta, a bare string is a text, and the CLI's field
    options are query parameters."""
    client: httpx.Client = served["client"]  # type: ignore[assignment]
    cls = served["cls"]
    lines = [{"id": "a", "text": "good film", "source": "web", "stars": 5}, "a bare string",
             {"id": 7, "text": "bad film"}, {"id": "no-text", "body": "x"}]
    created = client.post(f"{cls}/runs", content="\n".join(json.dumps(x) for x in lines).encode(),
                          headers={"content-type": "application/x-ndjson"})
    run = created.json()
    assert created.status_code == 201 and run["enqueued"] == 3
    assert run["unreadable_lines"] == [{"line": 4, "error": "line 4: field 'text' missing or not a string"}]
    with client.stream("GET", f"{cls}/runs/{run['run_id']}/results") as response:
        results = [json.loads(line) for line in response.iter_lines() if line]
    assert results[0]["id"] == "a" and results[0]["meta"] == {"source": "web", "stars": 5}
    assert "meta" not in results[1] and results[2]["id"] == "7" and "meta" not in results[2]
    assert all(r["label"] for r in results)

    pairs = [{"key": "p1", "q": "is it good?", "passage": "it is great", "lang": "en"}]
    created = client.post(f"{cls}/runs?text_field=q&text_pair_field=passage&id_field=key",
                          content=json.dumps(pairs[0]).encode(), headers={"content-type": "application/x-ndjson"})
    run = created.json()
    assert created.status_code == 201 and run["enqueued"] == 1, run
    with client.stream("GET", f"{cls}/runs/{run['run_id']}/results") as response:
        (result,) = [json.loads(line) for line in response.iter_lines() if line]
    assert result["id"] == "p1" and result["meta"] == {"lang": "en"}
    pair = client.post(f"{cls}/predict", json={"inputs": ["is it good?", "it is great"]}).json()
    assert result["scores"] == pytest.approx({p["label"]: p["score"] for p in pair}, abs=1e-5)

    # The job options are query parameters too, checked like the clients' (422, nothing enqueued).
    created = client.post(f"{cls}/runs?top_k=1&function_to_apply=none", content=b'"good film"\n',
                          headers={"content-type": "application/x-ndjson"})
    assert created.status_code == 201, created.text
    with client.stream("GET", f"{cls}/runs/{created.json()['run_id']}/results") as response:
        (result,) = [json.loads(line) for line in response.iter_lines() if line]
    raw = client.post(f"{cls}/predict", json={"inputs": "good film", "raw_scores": True}).json()
    assert result["scores"] == pytest.approx({raw[0]["label"]: raw[0]["score"]}, abs=1e-5)
    for query in ("top_k=0", "top_k=two", "function_to_apply=relu"):
        refused = client.post(f"{cls}/runs?{query}", content=b'"x"\n', headers={"content-type": "application/x-ndjson"})
        assert refused.status_code == 422 and query.split("=")[0] in refused.json()["error"], refused.text


def test_pressure_429_and_504_with_deadline(redis_server, served):
    """No worker on queue "idle": a request whose result does not come within its timeout gets
    504, its job carrying that deadline while it waits and taken off the queue once it gave up;
    past max-queue-depth requests get 429 with Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    import redis as redis_py
    from rq import Queue

    from queuebert.serializer import JSONSerializer

    proc, base = start_gateway(redis_server.url, "idle", request_timeout="2", max_queue_depth="2")
    conn = redis_py.Redis.from_url(redis_server.url)
    queue = Queue("idle", connection=conn, serializer=JSONSerializer)
    try:
        with ThreadPoolExecutor(2) as pool:
            started = time.time()
            late = pool.submit(httpx.post, f"{base}/predict", json={"inputs": "nobody computes this"}, timeout=30)
            while not queue.count:
                assert time.time() - started < 2, "the request's job never appeared"
                time.sleep(0.02)
            (job,) = queue.get_jobs()
            assert started < job.kwargs["deadline"] <= time.time() + 2.5  # a worker drops it past that
            second = pool.submit(httpx.post, f"{base}/predict", json={"inputs": "second"}, timeout=30)
            while queue.count < 2:
                assert time.time() - started < 2, "the second request's job never appeared"
                time.sleep(0.02)
            time.sleep(0.1)  # past the gateway's cached queue depth
            full = httpx.post(f"{base}/predict", json={"inputs": "third"}, timeout=30)
            assert full.status_code == 429 and full.headers["Retry-After"] == "1"
            for waited in (late, second):
                assert waited.result().status_code == 504 and waited.result().json()["error_type"] == "Overloaded"
        deadline = time.time() + 5
        while queue.count:  # nobody waits for them any more: dropped unstarted
            assert time.time() < deadline, queue.get_job_ids()
            time.sleep(0.05)
    finally:
        conn.close()
        stop_processes([proc], 10)


def _forwards(log_path: Path) -> int:
    return sum(json.loads(line).get("batches", 0) for line in log_path.read_text().splitlines()
               if line.startswith("{") and '"event": "batch"' in line)


def _concurrent(base: str, texts: list[str], headers: dict[str, str]) -> list[httpx.Response]:
    """All of ``texts`` as one-text /predict requests at once, each on its own connection."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=headers, timeout=120,
                                     limits=httpx.Limits(max_connections=len(texts))) as client:
            return await asyncio.gather(*(client.post(f"{base}/predict", json={"inputs": t}) for t in texts))

    return asyncio.run(run())


def test_256_concurrent_requests_share_forwards(redis_server, tiny_models):
    worker = start_worker(redis_server.url, tiny_models["bert"], "gw-many", QUEUEBERT_QUEUES="many")
    proc, base = start_gateway(redis_server.url, "many")
    try:
        while httpx.get(f"{base}/health").status_code != 200:
            time.sleep(0.2)
        texts = [f"request {i}: " + "fine " * (i % 7) for i in range(256)]
        responses = _concurrent(base, texts, {})
        assert [r.status_code for r in responses] == [200] * 256
        assert all(len(r.json()) == 2 for r in responses)
    finally:
        stop_processes([proc, worker], 15)
    forwards = _forwards(worker.log_path)
    assert 0 < forwards <= 256 // 8, f"{forwards} forwards for 256 requests"
    print(f"gateway: 256 concurrent one-text requests, {forwards} forwards")


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory) -> Path:
    """MiniLM-sized, so 256 requests take long enough for a worker to die among them."""
    from conftest import build_tiny_model

    return build_tiny_model("bert", tmp_path_factory.mktemp("gw-medium") / "bert", hidden=384, layers=6)


def test_worker_killed_during_requests_loses_none(redis_server, medium_model):
    """Two workers; one is SIGKILLed as soon as the first answer comes back. Every one of the 256
    requests still gets its answer (its jobs are recovered and run by the other)."""
    workers = [start_worker(redis_server.url, medium_model, f"gw-kill-{w}", QUEUEBERT_QUEUES="kill",
                            QUEUEBERT_MAX_BATCH_SIZE="8", QUEUEBERT_MAX_POOL_ITEMS="32") for w in "ab"]
    proc, base = start_gateway(redis_server.url, "kill", request_timeout="120")
    pending_at_kill: list[int] = []
    try:
        while httpx.get(f"{base}/health").status_code != 200:
            time.sleep(0.2)
        texts = [f"request {i}: " + "the service was slow but the food was good " * 4 for i in range(256)]

        async def run() -> list[httpx.Response]:
            done = 0

            async def one(client: httpx.AsyncClient, text: str) -> httpx.Response:
                nonlocal done
                response = await client.post(f"{base}/predict", json={"inputs": text})
                done += 1
                if not pending_at_kill:
                    workers[0].send_signal(signal.SIGKILL)
                    pending_at_kill.append(len(texts) - done)
                return response

            async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=256)) as client:
                return await asyncio.gather(*(one(client, t) for t in texts))

        responses = asyncio.run(run())
        assert workers[0].wait(10) == -signal.SIGKILL
        assert pending_at_kill[0] > 0, "every request was answered before the kill"
        assert [r.status_code for r in responses] == [200] * 256
        assert all(len(r.json()) == 2 for r in responses)
        print(f"gateway: worker SIGKILLed with {pending_at_kill[0]} of 256 requests unanswered; all 256 answered")
    finally:
        stop_processes([proc, *workers], 15)


def test_cached_reads_once_for_many_concurrent_requests():
    """The gateway's queue depth and served model: one read per expiry however many requests ask
    at once (each used to send its own), shared even by a request that is cancelled meanwhile."""
    from producer.gateway import Cached

    reads: list[int] = []

    async def read() -> int | None:
        reads.append(1)
        await asyncio.sleep(0.02)
        return len(reads) if len(reads) > 1 else None

    async def scenario() -> None:
        keeping = Cached(read, every=0.5, keep_none=False)
        first = await asyncio.gather(*(keeping.get() for _ in range(64)))
        assert first == [None] * 64 and len(reads) == 1
        # A None is not kept: the next call reads again, and 63 others share it with one cancelled.
        waiters = [asyncio.ensure_future(keeping.get()) for _ in range(64)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        got = await asyncio.gather(*waiters[1:])
        assert got == [2] * 63 and len(reads) == 2
        assert await keeping.get() == 2 and len(reads) == 2  # fresh
        await asyncio.sleep(0.6)
        assert await asyncio.gather(*(keeping.get() for _ in range(8))) == [3] * 8 and len(reads) == 3

    asyncio.run(scenario())
