"""Sentence pairs through the queue equal transformers' pipelines in float32: text-classification
on ``{"text", "text_pair"}``, reranking with a cross-encoder, and zero-shot classification."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from producer import Client
from queuebert import keys
from queuebert.schema import JobOptions

from conftest import PAIR_KINDS, TRICKY_TEXTS
from helpers import run_burst

LONG = "The quick brown fox jumps over the lazy dog. " * 30
PAIRS = [
    ("what is the capital of France?", "Paris is the capital and largest city of France."),
    ("", "an empty first text"),
    ("an empty second text", ""),
    (LONG, "a short second text after a long first one"),
    ("a short first text", LONG),
    (LONG, LONG + " and a little more"),
    ("I loved this film 😍🎬!!", "東京の寿司は最高でした。"),
    ("Ce café était délicieux.", "Привет, как дела?"),
] + [(f"query {i}: " + "good " * (i % 5), f"passage {i}: " + "bad " * (i % 7)) for i in range(12)]


def in_background(conn: Any, produce: Callable[[], Any], engine: Any) -> Any:
    """Run ``produce`` (which enqueues and then reads its results) in a thread, run a burst worker
    once its run is sealed (everything enqueued), and return what ``produce`` returned."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(_catch(produce)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(conn.hget(keys.run_meta(r.decode()), "sealed") for r in conn.zrange(keys.RUNS, 0, -1)):
        assert time.monotonic() < deadline, "the run was never sealed"
        time.sleep(0.02)
    run_burst(conn, engine)
    thread.join(30)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _catch(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BaseException as exc:
        return exc


def pair_reference(model_dir: str, pairs: list[tuple[str, str]], device: str) -> list[dict[str, float]]:
    """The text-classification pipeline on ``{"text", "text_pair"}``, float32, all labels."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, top_k=None, device=device, dtype="float32")
    out = pipe([{"text": a, "text_pair": b} for a, b in pairs], truncation=True, batch_size=1)
    return [{d["label"]: d["score"] for d in row} for row in out]


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_pairs_match_pipeline(kind, conn, redis_server, tiny_models, engines, device, tolerance):
    """Pairs and single texts share jobs and batches; each pair equals the pipeline's answer."""
    engine = engines[kind]
    engine.max_batch_size = 4
    items: list[dict[str, Any]] = []
    for n, (a, b) in enumerate(PAIRS):
        items.append({"id": f"p{n}", "text": a, "text_pair": b})
        items.append({"id": f"t{n}", "text": TRICKY_TEXTS[n % len(TRICKY_TEXTS)]})
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(items, chunk_size=5)
    run_burst(conn, engine)
    results = {r["id"]: r for r in run.results(timeout=10)}
    reference = pair_reference(str(tiny_models[kind]), PAIRS, device)
    for n, want in enumerate(reference):
        got = results[f"p{n}"]
        assert "error" not in got, got
        assert set(got["scores"]) == set(want)
        for label, score in want.items():
            assert got["scores"][label] == pytest.approx(score, abs=tolerance), (kind, n, label)
    assert all("error" not in results[f"t{n}"] for n in range(len(PAIRS)))


def test_segment_ids_reach_the_model(engines, tolerance):
    """BERT's pairs need their segment ids: the same pair with all-zero segment ids (what a
    single-text collate sends) scores differently, so the equivalence above can tell them apart."""
    from worker.engine import Row

    engine = engines["bert"]
    enc, errors = engine.encode([{"id": "a", "text": "a question?", "text_pair": "an answer here."}], [JobOptions()])
    (row,) = enc.ids
    assert not errors and isinstance(row, Row) and 1 in row.types
    batch = engine._collate([row])
    assert batch["token_type_ids"].tolist() == [row.types]
    with_types = engine.forward([row])
    without = engine.forward([list(row)])
    assert np.abs(with_types - without).max() > 2 * tolerance
    # RoBERTa takes no segment ids at all: its pairs are plain rows.
    enc, _ = engines["roberta"].encode([{"id": "a", "text": "q", "text_pair": "p"}], [JobOptions()])
    assert "token_type_ids" not in engines["roberta"]._collate(enc.ids)


def test_pair_fields_are_checked(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream([
        {"id": "ok", "text": "q", "text_pair": "p"},
        {"id": "num", "text": "q", "text_pair": 7},
        {"id": "both", "text": "q", "text_pair": "p", "candidate_labels": ["a"]},
        {"id": "nolabels", "text": "q", "candidate_labels": []},
        {"id": "template", "text": "q", "candidate_labels": ["a"], "hypothesis_template": "no slot"},
        {"id": "long", "text": "q", "text_pair": "x" * 50},
    ], chunk_size=10)
    run_burst(conn, engines["bert"], max_text_chars=40)
    results = {r["id"]: r for r in run.results(timeout=10)}
    assert "error" not in results["ok"]
    assert results["num"]["error"]["type"] == "invalid_text" and "text_pair" in results["num"]["error"]["message"]
    assert results["both"]["error"]["type"] == "invalid_item"
    assert results["nolabels"]["error"]["type"] == "invalid_item"
    assert "no slot" in results["template"]["error"]["message"]
    assert results["long"]["error"]["type"] == "text_too_long"


def test_submit_with_text_pair(conn, redis_server, engines, tiny_models, device, tolerance):
    client = Client.from_url(redis_server.url)
    handle = client.submit("what is it?", text_pair="it is a test.")
    run_burst(conn, engines["nli"])
    got = handle.result(timeout=10)
    (want,) = pair_reference(str(tiny_models["nli"]), [("what is it?", "it is a test.")], device)
    for label, score in want.items():
        assert got["scores"][label] == pytest.approx(score, abs=tolerance)


# -- reranking ---------------------------------------------------------------------------------


def test_rerank_ranks_like_the_cross_encoder(conn, redis_server, engines, tiny_models, device, tolerance):
    passages = [b for _, b in PAIRS[:8]]
    query = "what is the capital of France?"
    client = Client.from_url(redis_server.url)
    queries = [{"id": "q1", "query": query, "passages": passages}, {"id": "q2", "query": "nothing", "passages": []},
               {"id": "q3", "query": "second", "passages": passages[:3], "lang": "en"}]
    answers = in_background(conn, lambda: list(client.rerank_many(queries, top_n=5, return_text=True, timeout=30)),
                            engines["crossencoder"])
    reference = pair_reference(str(tiny_models["crossencoder"]), [(query, p) for p in passages], device)
    want = sorted(range(len(passages)), key=lambda i: -next(iter(reference[i].values())))[:5]
    assert [a["id"] for a in answers] == ["q1", "q2", "q3"]
    got = answers[0]["results"]
    assert [g["index"] for g in got] == want
    for g in got:
        assert g["score"] == pytest.approx(next(iter(reference[g["index"]].values())), abs=tolerance)
        assert g["text"] == passages[g["index"]]
    assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
    assert answers[1]["results"] == []
    assert len(answers[2]["results"]) == 3 and answers[2]["meta"] == {"lang": "en"}


def test_rerank_needs_a_relevance_score(conn, redis_server, engines):
    from producer.pairs import RerankError

    client = Client.from_url(redis_server.url)
    with pytest.raises(RerankError, match="name the label"):
        in_background(conn, lambda: list(client.rerank_many([{"query": "q", "passages": ["a", "b"]}], timeout=30)),
                      engines["nli"])


# -- zero-shot ---------------------------------------------------------------------------------

ZS_TEXTS = ["I loved this film", "the stock market fell sharply today", LONG, " ", "東京の寿司は最高でした。",
            "word " * 200]
ZS_LABELS = ["politics", "sports", "cinema", "food", "economy"]


@pytest.mark.parametrize("kind,labels,multi_label,template", [
    ("nli", ZS_LABELS, False, "This example is {}."),
    ("nli", ZS_LABELS, True, "This example is {}."),
    ("nli", ["cinema"], False, "The topic is {}!"),  # one label: the pipeline's multi-label rule
    ("bert", ZS_LABELS[:3], False, "This example is {}."),  # no "entailment" label: the pipeline's fallback
])
def test_zero_shot_matches_pipeline(kind, labels, multi_label, template, conn, redis_server, engines, tiny_models,
                                    device, tolerance):
    from transformers import pipeline

    client = Client.from_url(redis_server.url)
    engines[kind].max_batch_size = 4  # pairs of several texts share batches
    got = in_background(conn, lambda: client.zero_shot(ZS_TEXTS, labels, hypothesis_template=template,
                                                       multi_label=multi_label, chunk_size=2, timeout=30),
                        engines[kind])
    pipe = pipeline("zero-shot-classification", model=str(tiny_models[kind]), device=device, dtype="float32")
    want = pipe(ZS_TEXTS, candidate_labels=labels, hypothesis_template=template, multi_label=multi_label)
    assert [g["id"] for g in got] == [str(i) for i in range(len(ZS_TEXTS))]
    for g, w in zip(got, want):
        assert set(g) == {"id", "labels", "scores"}
        assert g["labels"] == w["labels"]
        assert g["scores"] == pytest.approx(w["scores"], abs=tolerance)


def test_zero_shot_single_text_and_errors(conn, redis_server, engines):
    client = Client.from_url(redis_server.url)
    got = in_background(conn, lambda: client.zero_shot("a review of a film", "cinema, food", timeout=30),
                        engines["nli"])
    assert got["id"] == "0" and sorted(got["labels"]) == ["cinema", "food"]
    assert sum(got["scores"]) == pytest.approx(1.0, abs=1e-6)
    # A bad template fails its own item; its neighbours are answered.
    run = client.enqueue_stream([
        {"id": "bad", "text": "x", "candidate_labels": ["a"], "hypothesis_template": "{0} {1}"},
        {"id": "good", "text": "x", "candidate_labels": ["a", "b"], "meta": {"row": 1}},
        {"id": "empty", "text": "", "candidate_labels": ["a", "b"]},  # refused by the pipeline too
    ])
    run_burst(conn, engines["nli"])
    bad, good, empty = run.results(timeout=10)
    assert bad["error"]["type"] == "invalid_item"
    assert empty["error"]["type"] == "invalid_text"
    assert good["meta"] == {"row": 1} and len(good["scores"]) == 2


def test_text_without_tokens_is_refused(tmp_path):
    """A decoder tokenizer adds no special tokens, so an empty text has none at all: its item gets
    invalid_text (the pipeline refuses it too) instead of a score computed on padding, and its
    neighbours are classified."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from worker.engine import Engine
    from worker.model import load_model

    bpe = ByteLevelBPETokenizer()  # no post-processor: no special tokens, like GPT-2's
    bpe.train_from_iterator([t for t in TRICKY_TEXTS if t.strip()] + ["the product works well"], vocab_size=300,
                            min_frequency=1, special_tokens=["<pad>", "<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<|endoftext|>",
                                  model_max_length=64)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(str(tmp_path / "gpt2"))
    tok.save_pretrained(str(tmp_path / "gpt2"))
    assert tok("")["input_ids"] == []
    engine = Engine(load_model(str(tmp_path / "gpt2"), device="cpu", dtype="float32"))
    results = engine.classify([{"id": "empty", "text": ""}, {"id": "ok", "text": "the product works"},
                               {"id": "pair", "text": "", "text_pair": ""}])
    assert results[0]["error"]["type"] == "invalid_text" and "no tokens" in results[0]["error"]["message"]
    assert "label" in results[1]
    assert results[2]["error"]["type"] == "invalid_text"


def test_out_of_memory_split_keeps_segment_ids(conn, redis_server, engines, tiny_models, device, tolerance):
    """A batch of pairs that runs out of memory is split and retried: the halves keep their
    segment ids, so each pair still equals the pipeline's answer."""
    from worker.engine import OutOfMemory

    engine = engines["bert"]
    engine.max_batch_size = 16

    def fault(rows: int, padded: int) -> None:
        if rows > 2:
            raise OutOfMemory("injected: CUDA out of memory")

    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream([{"text": a, "text_pair": b} for a, b in PAIRS], chunk_size=len(PAIRS))
    splits = engine.oom_splits
    engine.fault = fault
    try:
        run_burst(conn, engine)
    finally:
        engine.fault = None
    assert engine.oom_splits > splits
    reference = pair_reference(str(tiny_models["bert"]), PAIRS, device)
    for got, want in zip(run.results(timeout=10), reference):
        assert "error" not in got, got
        for label, score in want.items():
            assert got["scores"][label] == pytest.approx(score, abs=tolerance)


def test_zero_shot_on_a_model_without_an_entailment_label_warns_once() -> None:
    """As the pipeline warns: such a model's zero-shot scores rest on its last logit."""
    import structlog

    from worker.job_rows import entailment_ids

    with structlog.testing.capture_logs() as logs:
        assert entailment_ids({"warn_a": 0, "warn_b": 1}) == (-1, 0)
        assert entailment_ids({"warn_a": 0, "warn_b": 1}) == (-1, 0)
        assert entailment_ids({"contradiction": 0, "entailment": 1}) == (1, 0)
    assert [e["labels"] for e in logs if e["log_level"] == "warning"] == [["warn_a", "warn_b"]]
