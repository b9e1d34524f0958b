"""Results through the queue equal transformers' pipeline in float32, whatever the batching."""

from __future__ import annotations

import pytest

from producer import Client

from conftest import MODEL_KINDS, TRICKY_TEXTS
from helpers import pipeline_reference, run_burst

TEXTS = TRICKY_TEXTS + [f"sample review number {i}: " + "good " * (i % 9) + "bad " * (i % 4) for i in range(30)]


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("chunk_size,max_batch_size", [(1, 32), (7, 4), (64, 64)])
def test_queue_matches_pipeline(kind, chunk_size, max_batch_size, conn, redis_server, tiny_models, engines, device,
                                tolerance):
    engine = engines[kind]
    engine.max_batch_size = max_batch_size
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(TEXTS, chunk_size=chunk_size)
    run_burst(conn, engine)
    results = list(run.results(timeout=10))
    reference = pipeline_reference(str(tiny_models[kind]), TEXTS, device)

    assert [r["id"] for r in results] == [str(i) for i in range(len(TEXTS))]
    for got, want in zip(results, reference):
        assert "error" not in got, got
        assert set(got["scores"]) == set(want)
        for label, score in want.items():
            assert got["scores"][label] == pytest.approx(score, abs=tolerance)
        best = max(want, key=want.get)
        # A label may differ from the pipeline's only where the two best scores tie within tolerance.
        assert got["label"] == best or want[best] - want[got["label"]] <= tolerance
        assert got["score"] == pytest.approx(want[best], abs=tolerance)
        # scores are ordered best first, like the pipeline's list
        assert list(got["scores"].values()) == sorted(got["scores"].values(), reverse=True)


def test_top_k_and_meta(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream([{"id": "a", "text": "hello", "meta": {"row": 7, "tags": ["x"]}}], top_k=3)
    run_burst(conn, engines["twenty"])
    (result,) = list(run.results(timeout=10))
    assert len(result["scores"]) == 3
    assert result["meta"] == {"row": 7, "tags": ["x"]}
    assert result["label"] == next(iter(result["scores"]))


def test_scoring_rules(engines):
    assert engines["bert"].m.function == "softmax"
    assert engines["multilabel"].m.function == "sigmoid"
    assert engines["regression"].m.function == "none"


@pytest.mark.parametrize("function", ["none", "sigmoid", "softmax"])
def test_function_to_apply_matches_pipeline(function, conn, redis_server, tiny_models, engines, device, tolerance):
    """A job's function_to_apply scores as the pipeline's parameter of that name does (``none``
    gives the logits: TEI's raw_scores), whatever the model's own rule."""
    from transformers import pipeline

    texts = TEXTS[:6]
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(texts, function_to_apply=function)
    run_burst(conn, engines["multilabel"])
    got = list(run.results(timeout=10))
    pipe = pipeline("text-classification", model=str(tiny_models["multilabel"]), top_k=None, device=device,
                    dtype="float32")
    want = pipe(texts, truncation=True, function_to_apply=function)
    for g, w in zip(got, want):
        assert g["scores"] == pytest.approx({d["label"]: d["score"] for d in w}, abs=tolerance)
