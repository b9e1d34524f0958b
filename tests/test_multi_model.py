"""One gateway, many models (issue 25): a classifier and a cross-encoder, each on its own queue
with its own worker process, behind one ``queuebert serve``, and a third model named in
``QUEUEBERT_MODELS`` whose workers are scaled to zero. Clients nobody here wrote talk to it:
Infinity's ``infinity-client`` (``/classify``, ``/rerank``, ``/models``), Cohere's ``cohere`` SDK
(``/v2/rerank`` at the gateway's base URL), and httpx on TEI's routes naming a model. Every answer
equals transformers' pipeline for the model named, within 1e-5 in float32; a request to the model
at zero waits in its queue until a worker is started after it was sent, then succeeds.

Real parts only: a redis-server of this module's own, real worker and gateway processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer.embedded_redis import RedisServer
from queuebert.procs import LoggedProcess

from helpers import reap, start_gateway, start_worker

API_KEY = "multi-model-key"
TOL = 1e-5
# Queues, and the names QUEUEBERT_MODELS gives them (cls is also the default queue).
CLS, RR, COLD = "mm-cls", "mm-rr", "mm-cold"
MODELS = f"sentiment={CLS},reranker={RR},cold={COLD}"

TEXTS = ["I loved this film", "terrible service, cold food", "東京の寿司は最高でした。", "a"]
QUERY = "capital of france"
DOCS = ["paris is in france", "bananas are yellow", "the capital of france is paris", "berlin is in germany"]


def _classify_reference(model: Path, texts: list[str]) -> list[dict[str, float]]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model), device="cpu", dtype="float32")
    return [{d["label"]: d["score"] for d in row} for row in pipe(texts, top_k=None, truncation=True)]


def _rerank_reference(model: Path, query: str, docs: list[str]) -> list[float]:
    """The cross-encoder's relevance of each document: the pipeline's score of its one label."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model), device="cpu", dtype="float32")
    rows = pipe([{"text": query, "text_pair": d} for d in docs], top_k=None, truncation=True)
    return [row[0]["score"] for row in rows]


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """A Redis of this module's own (the session one is flushed by other tests' ``conn``), a
    classifier worker on ``mm-cls``, a cross-encoder worker on ``mm-rr``, nobody on ``mm-cold``,
    and one gateway in front of all three."""
    server = RedisServer().start()
    procs: list[LoggedProcess] = []
    try:
        procs.append(start_worker(server.url, tiny_models["bert"], "mm-cls-w", QUEUEBERT_QUEUES=CLS))
        procs.append(start_worker(server.url, tiny_models["crossencoder"], "mm-rr-w", QUEUEBERT_QUEUES=RR))
        gateway, base = start_gateway(server.url, CLS, models=MODELS, api_key=API_KEY, request_timeout="90")
        procs.append(gateway)
        client = httpx.Client(base_url=base, headers=_auth(), timeout=120)

        def up(model: str) -> bool:
            return client.get("/health", params={"model": model}).status_code == 200

        _wait_for(lambda: up("sentiment") and up("reranker"), "both workers to register")
        yield {"base": base, "client": client, "url": server.url, "procs": procs}
        client.close()
    finally:
        reap(procs)
        server.close()


def test_models_list_and_health_name_the_model_without_workers(fleet, tiny_models):
    """``/v1/models`` (OpenAI's shape) and infinity-client's ``models`` list every name, the
    workers' own model ids too; the model at zero is listed with 0 workers, and /health stays 200
    (a readiness probe) while saying so; the metrics gauge says it too."""
    from infinity_client import AuthenticatedClient
    from infinity_client.api.default import models as models_api

    client: httpx.Client = fleet["client"]
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    rows = {row["id"]: row for row in listed["data"]}
    bert, cross = str(tiny_models["bert"]), str(tiny_models["crossencoder"])
    assert set(rows) == {"sentiment", "reranker", "cold", bert, cross}
    assert rows["sentiment"]["queuebert"]["queue"] == CLS and rows["sentiment"]["capabilities"] == ["classify"]
    assert rows["reranker"]["capabilities"] == ["rerank"] and rows[cross]["queuebert"]["queue"] == RR
    assert rows["cold"]["stats"]["workers"] == 0 and rows["cold"]["capabilities"] == []
    assert rows["sentiment"]["queuebert"]["default"] and rows[bert]["queuebert"]["default"]

    infinity = AuthenticatedClient(base_url=fleet["base"], token=API_KEY, timeout=httpx.Timeout(60))
    parsed = models_api.sync(client=infinity)
    assert parsed is not None and {m.id for m in parsed.data} == set(rows)
    assert {m.id: m.stats["workers"] for m in parsed.data}["cold"] == 0

    health = httpx.get(f"{fleet['base']}/health")  # open: no token, as probes send none
    assert health.status_code == 200, health.text
    assert health.json()["without_workers"] == ["cold"]
    assert health.json()["default_model"] == "sentiment"
    cold = httpx.get(f"{fleet['base']}/health", params={"model": "cold"})
    assert cold.status_code == 503 and cold.json()["error_type"] == "Unhealthy"
    assert httpx.get(f"{fleet['base']}/health", params={"model": "nope"}).status_code == 404
    metrics = client.get("/metrics").text
    assert f'queuebert_gateway_model_workers{{model="cold",queue="{COLD}"}} 0.0' in metrics
    assert f'queuebert_gateway_model_workers{{model="reranker",queue="{RR}"}} 1.0' in metrics


def test_infinity_client_gets_each_models_answers(fleet, tiny_models):
    """infinity-client's ``classify`` and ``rerank`` with a ``model``: each reaches its own model,
    by alias or by the workers' model id, with the pipeline's scores."""
    from infinity_client import AuthenticatedClient
    from infinity_client.api.default import classify, rerank
    from infinity_client.models import ClassifyInput, ClassifyResult, RerankInput, ReRankResult

    infinity = AuthenticatedClient(base_url=fleet["base"], token=API_KEY, timeout=httpx.Timeout(60))
    want = _classify_reference(tiny_models["bert"], TEXTS)
    for name in ("sentiment", str(tiny_models["bert"])):
        got = classify.sync(client=infinity, body=ClassifyInput(input_=TEXTS, model=name))
        assert isinstance(got, ClassifyResult), got
        assert got.model == name and len(got.data) == len(TEXTS)
        for row, expected in zip(got.data, want):
            scores = [c.score for c in row]
            assert scores == sorted(scores, reverse=True)  # best first, as the pipeline's top_k=None
            assert {c.label: c.score for c in row} == pytest.approx(expected, abs=TOL)

    relevance = _rerank_reference(tiny_models["crossencoder"], QUERY, DOCS)
    best_first = sorted(range(len(DOCS)), key=lambda i: -relevance[i])
    got = rerank.sync(client=infinity, body=RerankInput(query=QUERY, documents=DOCS, model="reranker",
                                                        return_documents=True, top_n=3))
    assert isinstance(got, ReRankResult), got
    assert [r.index for r in got.results] == best_first[:3]
    assert [r.relevance_score for r in got.results] == pytest.approx([relevance[i] for i in best_first[:3]], abs=TOL)
    assert [r.document for r in got.results] == [DOCS[i] for i in best_first[:3]]

    # Infinity's own refusals: an unknown model is its 400 ``Invalid model``, a classifier asked
    # to rerank its 400, a bad body FastAPI's 422 (parsed by the client).
    unknown = classify.sync_detailed(client=infinity, body=ClassifyInput(input_=["x"], model="no-such-model"))
    assert unknown.status_code == 400
    error = json.loads(unknown.content)["error"]
    assert error["code"] == 400 and "Invalid model" in error["message"] and "no-such-model" in error["message"]
    wrong = rerank.sync_detailed(client=infinity, body=RerankInput(query="q", documents=["d"], model="sentiment"))
    assert wrong.status_code == 400 and "does not support `rerank`" in json.loads(wrong.content)["error"]["message"]
    empty = classify.sync_detailed(client=infinity, body=ClassifyInput(input_=[], model="sentiment"))
    assert empty.status_code == 422 and empty.parsed.detail[0].loc == ["body", "input"]


def test_cohere_client_reranks_with_the_named_model(fleet, tiny_models):
    """Cohere's SDK (``ClientV2``) pointed at the gateway's base URL: ``rerank`` with ``top_n``
    gets the cross-encoder's ranking; an unknown model raises its ``NotFoundError``."""
    import cohere
    from cohere.errors import BadRequestError, NotFoundError, UnauthorizedError

    co = cohere.ClientV2(api_key=API_KEY, base_url=fleet["base"], timeout=60)
    relevance = _rerank_reference(tiny_models["crossencoder"], QUERY, DOCS)
    best_first = sorted(range(len(DOCS)), key=lambda i: -relevance[i])
    for model in ("reranker", str(tiny_models["crossencoder"])):
        got = co.rerank(model=model, query=QUERY, documents=DOCS, top_n=2)
        assert [r.index for r in got.results] == best_first[:2]
        assert [r.relevance_score for r in got.results] == pytest.approx([relevance[i] for i in best_first[:2]],
                                                                          abs=TOL)
    whole = co.rerank(model="reranker", query=QUERY, documents=DOCS)
    assert len(whole.results) == len(DOCS)
    with pytest.raises(NotFoundError) as missing:
        co.rerank(model="no-such-model", query=QUERY, documents=DOCS)
    assert "no-such-model" in missing.value.body["message"]
    with pytest.raises(BadRequestError) as bad:
        co.rerank(model="reranker", query=QUERY, documents=[])
    assert bad.value.body["message"] == "invalid request: list of documents must not be empty"
    with pytest.raises(UnauthorizedError):
        cohere.ClientV2(api_key="wrong-key", base_url=fleet["base"], timeout=60).rerank(
            model="reranker", query=QUERY, documents=DOCS)


def test_tei_routes_default_model_and_named_ones(fleet, tiny_models):
    """TEI's routes without a model go to the default (``--queue``) unchanged; a ``model`` field or
    the ``Queuebert-Model`` header reaches another; a bad name is a clear 4xx in TEI's shape."""
    client: httpx.Client = fleet["client"]
    (want,) = _classify_reference(tiny_models["bert"], ["I loved this film"])
    default = client.post("/predict", json={"inputs": "I loved this film"}).json()
    assert {p["label"]: p["score"] for p in default} == pytest.approx(want, abs=TOL)
    assert client.get("/info").json()["model_id"] == str(tiny_models["bert"])

    relevance = _rerank_reference(tiny_models["crossencoder"], QUERY, DOCS)
    ranked = client.post("/rerank", json={"model": "reranker", "query": QUERY, "texts": DOCS}).json()
    assert {r["index"]: r["score"] for r in ranked} == pytest.approx(dict(enumerate(relevance)), abs=TOL)
    # POST / dispatches as TEI does for the model named: rerank for the cross-encoder.
    root = client.post("/", json={"query": QUERY, "texts": DOCS[:2]}, headers={"Queuebert-Model": "reranker"}).json()
    assert {r["index"]: r["score"] for r in root} == pytest.approx(dict(enumerate(relevance[:2])), abs=TOL)
    info = client.get("/info", params={"model": "reranker"}).json()
    assert "reranker" in info["model_type"] and info["model_id"] == str(tiny_models["crossencoder"])
    # The classifier named on /rerank is TEI's 424; an unknown name 404; a name that is no name 422.
    assert client.post("/rerank", json={"model": "sentiment", "query": "q", "texts": ["t"]}).status_code == 424
    for body, status in (({"inputs": "x", "model": "nope"}, 404), ({"inputs": "x", "model": 7}, 422),
                         ({"inputs": "x", "model": "a\nb"}, 422), ({"inputs": "x", "model": "m" * 300}, 422)):
        answer = client.post("/predict", json=body)
        assert answer.status_code == status, answer.text
        assert set(answer.json()) == {"error", "error_type"}


def test_model_at_zero_queues_until_a_worker_starts(fleet, tiny_models):
    """A request for the model whose workers are scaled to zero is accepted and waits in its
    queue; /health stays 200 meanwhile. A worker started after the request was sent takes it,
    and the request succeeds with that model's (the pipeline's) answer."""
    client: httpx.Client = fleet["client"]
    conn = redis.Redis.from_url(fleet["url"])
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(
        client.post("/classify", json={"model": "cold", "input": TEXTS[:2]})), daemon=True)
    sender.start()
    try:
        _wait_for(lambda: conn.llen(f"rq:queue:{COLD}") >= 1, "the request's job in the cold queue", 30)
        assert not answer, "answered before any worker served the model"
        assert httpx.get(f"{fleet['base']}/health").status_code == 200
        worker = start_worker(fleet["url"], tiny_models["distilbert"], "mm-cold-w", QUEUEBERT_QUEUES=COLD)
        fleet["procs"].append(worker)
        sender.join(120)
        assert answer, "no answer once a worker started"
    finally:
        conn.close()
    assert answer[0].status_code == 200, answer[0].text
    body = answer[0].json()
    assert body["model"] == "cold"
    want = _classify_reference(tiny_models["distilbert"], TEXTS[:2])
    for row, expected in zip(body["data"], want):
        assert {c["label"]: c["score"] for c in row} == pytest.approx(expected, abs=TOL)
    _wait_for(lambda: "cold" not in client.get("/health").json()["without_workers"], "the cold model's worker", 30)
