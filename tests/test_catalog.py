"""The gateway's model catalog and the peer shapes, without HTTP or Redis: which name goes to
which queue (producer/catalog.py), and what Infinity's and Cohere's bodies become or are refused
with (producer/peers.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer import peers, tei
from producer.catalog import INFINITY_UNSPECIFIED, ModelError, build_catalog, check_model_name, parse_model_map
from queuebert import keys


def worker(queues: str, model: str, labels: list[str] | None = None) -> dict[str, Any]:
    """An RQ worker hash as the gateway reads it (bytes, as redis-py returns them)."""
    values = (model, "cpu", "float32", json.dumps(labels or ["NEG", "POS"]), "64", "softmax")
    return {"queues": queues.encode(), **{k: str(v).encode() for k, v in zip(keys.WORKER_MODEL_FIELDS, values)}}


def test_model_map_is_parsed_and_checked() -> None:
    assert parse_model_map(["sentiment=sent-q", " rerank = rr ", "toxicity", ""]) == \
        {"sentiment": "sent-q", "rerank": "rr", "toxicity": "toxicity"}
    assert parse_model_map(["org/model-v2=q"]) == {"org/model-v2": "q"}
    for bad, why in ((["a=q1", "a=q2"], "twice"), (["a=bad queue"], "queue"), (["a={tag}"], "queue"),
                     (["=q"], "not a model name"), (["a=:x"], "queue")):
        with pytest.raises(ValueError, match=why):
            parse_model_map(bad)


def test_model_names_are_checked() -> None:
    assert check_model_name("cross-encoder/ms-marco-MiniLM-L-6-v2") == "cross-encoder/ms-marco-MiniLM-L-6-v2"
    for bad in ("", "a\nb", "x\x00", "m" * 257, 7, None, ["a"]):
        with pytest.raises(ModelError) as err:
            check_model_name(bad)
        assert not err.value.unknown


def test_names_route_to_queues_with_the_map_first() -> None:
    workers = [worker("cls", "org/classifier"), worker("cls", "org/classifier"),
               worker("rr", "org/reranker", ["score"]), worker("hi,lo", "org/shared"), worker("lo", "org/shared"),
               {"queues": b"cls"}]  # a hash that expired: no model fields
    catalog = build_catalog(workers, {"sentiment": "cls", "cold": "cold-q", "org/reranker": "other"}, "cls")
    assert catalog.resolve(None).queue == "cls" and catalog.resolve(INFINITY_UNSPECIFIED).queue == "cls"
    assert catalog.resolve("org/classifier").queue == "cls"
    assert catalog.resolve("sentiment").served == catalog.resolve("org/classifier").served
    assert catalog.resolve("sentiment").workers == 2
    # A map name wins over a model id of the same spelling.
    assert catalog.resolve("org/reranker").queue == "other"
    # A model id served on several queues: the one with most live workers.
    assert catalog.resolve("org/shared").queue == "lo"
    cold = catalog.resolve("cold")
    assert cold.queue == "cold-q" and cold.served is None and cold.workers == 0
    assert catalog.without_workers() == ["cold", "org/reranker"]
    assert catalog.default().name == "sentiment"  # the map's name for the default queue first
    with pytest.raises(ModelError) as err:
        catalog.resolve("no-such-model")
    assert err.value.unknown and "no-such-model" in err.value.message


def test_default_queue_is_listed_and_health_expectation() -> None:
    empty = build_catalog([], {}, "default")
    (target, declared, default), = empty.listing()
    assert (target.name, target.queue, target.served, declared, default) == ("default", "default", None, False, True)
    assert empty.resolve("default").queue == "default"  # listed under its queue's name: reachable by it
    assert not empty.default_expected()  # a single-model gateway keeps TEI's /health meaning
    assert build_catalog([], {"sentiment": "default"}, "default").default_expected()  # scaled to zero on purpose


def test_infinity_bodies() -> None:
    parsed = peers.parse_classify({"input": ["a", "b"], "model": "m", "raw_scores": True}, max_client_batch_size=4)
    assert parsed.items == ({"id": "0", "text": "a"}, {"id": "1", "text": "b"})
    assert parsed.options.function_to_apply == "none"
    assert peers.parse_classify({"input": ["a"]}, max_client_batch_size=4).model == INFINITY_UNSPECIFIED
    for body, loc in (({}, ["body", "input"]), ({"input": "a"}, ["body", "input"]), ({"input": []}, ["body", "input"]),
                      ({"input": ["a"] * 5}, ["body", "input"]), ({"input": [1]}, ["body", "input", 0]),
                      ({"input": ["a"], "model": 3}, ["body", "model"]), ([], ["body"]),
                      ({"input": ["\ud800"]}, ["body", "input", 0])):
        with pytest.raises(peers.PeerError) as err:
            peers.parse_classify(body, max_client_batch_size=4)
        assert err.value.status == 422 and err.value.body["detail"][0]["loc"] == loc, body
    body = {"query": "q", "documents": ["d1", "d2"], "top_n": 1, "return_documents": True}
    rerank = peers.parse_infinity_rerank(body, max_client_batch_size=4)
    assert rerank.items[1] == {"id": "1", "text": "q", "text_pair": "d2"} and rerank.top_n == 1
    for bad in ({"documents": ["d"]}, {"query": "q", "documents": ["d"], "top_n": 0},
                {"query": "q", "documents": ["d"], "top_n": True}):
        with pytest.raises(peers.PeerError):
            peers.parse_infinity_rerank(bad, max_client_batch_size=4)
    assert peers.is_infinity_rerank({"query": "q", "documents": []})
    assert not peers.is_infinity_rerank({"query": "q", "texts": [], "documents": []})


def test_rerank_responses_rank_best_first_with_ties_in_input_order() -> None:
    results = [{"id": "0", "scores": {"score": 0.2}}, {"id": "1", "scores": {"score": 0.9}},
               {"id": "2", "scores": {"score": 0.2}}]
    request = peers.PeerRerankRequest("q", ("a", "b", "c"), "m", 2, return_documents=True)
    body = peers.infinity_rerank_response(request, results, "m")  # type: ignore[arg-type]
    assert body["results"] == [{"relevance_score": 0.9, "index": 1, "document": "b"},
                               {"relevance_score": 0.2, "index": 0, "document": "a"}]
    assert body["object"] == "rerank" and body["model"] == "m" and body["usage"] == {"prompt_tokens": 0,
                                                                                      "total_tokens": 0}
    cohere = peers.cohere_rerank_response(peers.PeerRerankRequest("q", ("a", "b", "c"), "m", None), results)  # type: ignore[arg-type]
    assert [r["index"] for r in cohere["results"]] == [1, 0, 2] and cohere["meta"]["api_version"]["version"] == "2"
    failed = [{"id": "0", "error": {"type": "invalid_text", "message": "bad"}}]
    with pytest.raises(tei.TEIError) as err:
        peers.ranked(failed)  # type: ignore[arg-type]
    assert err.value.status == 422


def test_cohere_bodies_and_errors() -> None:
    ok = peers.parse_cohere_rerank({"model": "m", "query": "q", "documents": ["a"], "top_n": 1,
                                    "max_tokens_per_doc": 512, "priority": 0}, max_client_batch_size=4)
    assert ok.model == "m" and ok.top_n == 1 and ok.options.function_to_apply is None
    for body, words in (({"query": "q", "documents": ["a"]}, "model is required"),
                        ({"model": "m", "query": " ", "documents": ["a"]}, "query must not be empty"),
                        ({"model": "m", "query": "q", "documents": []}, "list of documents must not be empty"),
                        ({"model": "m", "query": "q", "documents": ["a"] * 5}, "too many documents"),
                        ({"model": "m", "query": "q", "documents": [{"text": "a"}]}, "must be a string"),
                        ({"model": "m", "query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
                        ({"model": "a\nb", "query": "q", "documents": ["a"]}, "not a model name"),
                        ("nope", "JSON object")):
        with pytest.raises(peers.PeerError) as err:
            peers.parse_cohere_rerank(body, max_client_batch_size=4)
        assert err.value.status == 400 and words in err.value.body["message"], body
        assert set(err.value.body) == {"id", "message"}
    status, body = peers.cohere_refusal(ModelError("model 'x' is not served here", unknown=True), tei.internal())
    assert status == 404 and body["message"] == "model 'x' is not served here"
    status, body = peers.cohere_refusal(RuntimeError(), tei.timed_out(3))
    assert status == 504
    status, body = peers.infinity_refusal(ModelError("nope", unknown=True), tei.internal())
    assert status == 400 and body["error"]["code"] == 400 and body["error"]["message"].startswith("Invalid model")
