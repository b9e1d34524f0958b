"""Reranking and zero-shot classification on top of the item contract.

A reranking is a query's (query, passage) pairs as ordinary pair items, whose scores are sorted
here into text-embeddings-inference's ``/rerank`` shape: ``[{"index", "score", "text"?}]`` best
first. A zero-shot text is one zero-shot item (``candidate_labels``): the worker runs its pairs
and writes its answer, ``{"id", "labels", "scores"}``, as the zero-shot pipeline gives it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, INVALID_ITEM, Item, ItemResult

if TYPE_CHECKING:
    from .client import Client


class RerankError(ValueError):
    """A passage's score cannot be read as relevance (the model has several labels and none was named)."""


def relevance(result: ItemResult, label: str | None = None) -> float:
    """A pair's relevance score: a cross-encoder's single score (the pipeline's sigmoid), or the
    score of ``label`` for a model with several labels."""
    scores = result["scores"]
    assert isinstance(scores, dict)
    if label is not None:
        if label not in scores:
            raise RerankError(f"label {label!r} is not among the model's labels {sorted(scores)}")
        return scores[label]
    if len(scores) != 1:
        raise RerankError(f"the model has {len(scores)} labels ({sorted(scores)}): a reranker scores with one "
                          "logit; name the label that means relevant (label=...)")
    return next(iter(scores.values()))


def ranking(results: Sequence[ItemResult], passages: Sequence[str] | None = None, top_n: int | None = None,
            label: str | None = None) -> list[dict[str, Any]]:
    """``[{"index", "score", "text"?}]`` best first (ties keep input order), like TEI's ``/rerank``;
    ``text`` when ``passages`` are given. A passage whose pair failed is left out (its error is
    in the run's results)."""
    scored = [(relevance(r, label), i) for i, r in enumerate(results) if "error" not in r]
    scored.sort(key=lambda s: (-s[0], s[1]))
    out = []
    for score, i in scored[:top_n]:
        entry: dict[str, Any] = {"index": i, "score": score}
        if passages is not None:
            entry["text"] = passages[i]
        out.append(entry)
    return out


def pair_items(query_id: str, query: str, passages: Sequence[str]) -> list[Item]:
    """A query's pairs, ids ``<query id>:<passage index>``."""
    return [{"id": f"{query_id}:{i}", "text": query, "text_pair": p} for i, p in enumerate(passages)]


def zero_shot_item(text: str | dict[str, Any], candidate_labels: Sequence[str] | str,
                   hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False) -> dict[str, Any]:
    """One zero-shot item; labels as a list or, as the pipeline takes them, comma-separated."""
    labels = [x.strip() for x in candidate_labels.split(",") if x.strip()] if isinstance(candidate_labels, str) \
        else list(candidate_labels)
    item = dict(text) if isinstance(text, dict) else {"text": text}
    item.update(candidate_labels=labels, hypothesis_template=hypothesis_template, multi_label=multi_label)
    return item


@dataclass
class Query:
    """A query waiting for its passages' results (they come in input order)."""

    id: str
    passages: list[str]
    meta: Any = None
    error: str | None = None  # the query itself is unusable: its line says why, the others go on


def stream_through(client: Client, items: Iterable[Any], *, run_id: str, chunk_size: int | None = None,
                   max_pending: int | None = None, timeout: float | None = None, top_k: int | None = None,
                   on_enqueued: Callable[[int], None] | None = None, on_sealed: Callable[[int], None] | None = None,
                   on_idle: Callable[[], None] | None = None, consume: bool = True,
                   before_delete: Callable[[], None] | None = None) -> Iterator[ItemResult]:
    """Enqueue ``items`` as one run in a background thread (with backpressure) while yielding
    their results in input order; with ``consume`` each job's results leave Redis once read.
    ``on_sealed`` hears the run's item count once everything is enqueued."""
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            run = client.enqueue_stream(items, chunk_size=chunk_size, max_pending=max_pending, run_id=run_id,
                                        top_k=top_k, on_progress=on_enqueued)
            if on_sealed is not None:
                on_sealed(run.enqueued)
        except BaseException as exc:  # surfaced in the reading thread
            failed.append(exc)
            client.seal(run_id)

    producer = threading.Thread(target=produce, name="qb-enqueue", daemon=True)
    producer.start()
    for result in client.ordered_results(run_id, timeout=timeout, consume=consume, on_idle=on_idle,
                                         before_delete=before_delete):
        if failed:
            break
        yield result
    producer.join()
    if failed:
        raise failed[0]


def rerank_stream(client: Client, queries: Iterable[dict[str, Any]], *, run_id: str, top_n: int | None = None,
                  return_text: bool = False, label: str | None = None,
                  on_sealed: Callable[[int], None] | None = None, **stream: Any) -> Iterator[dict[str, Any]]:
    """For each ``{"id"?, "query", "passages", ...}`` in order: ``{"id", "results": ranking, "meta"?}``.

    Every query's pairs go out as one run, enqueued while results are read; only the queries
    between the one being answered and the enqueue front are held here. ``on_sealed`` hears the
    number of queries once all are enqueued."""
    waiting: deque[Query] = deque()
    seen = 0

    def items() -> Iterator[Item]:
        nonlocal seen
        for n, q in enumerate(queries):
            seen = n + 1
            query_id = str(q["id"]) if q.get("id") is not None else str(n)
            passages = q.get("passages")
            meta = {k: v for k, v in q.items() if k not in ("id", "query", "passages")} or None
            if not isinstance(q.get("query"), str) or not isinstance(passages, list):
                waiting.append(Query(query_id, [], meta, "a query is {'query': str, 'passages': [str, ...]}"))
                continue
            waiting.append(Query(query_id, passages, meta))
            yield from pair_items(query_id, q["query"], passages)

    def answered(query: Query, results: list[ItemResult]) -> dict[str, Any]:
        if query.error is not None:
            return {"id": query.id, "error": {"type": INVALID_ITEM, "message": query.error}}
        out: dict[str, Any] = {"id": query.id, "results": ranking(results, query.passages if return_text else None,
                                                                  top_n, label)}
        errors = [r for r in results if "error" in r]
        if errors:
            out["errors"] = errors
        if query.meta:
            out["meta"] = query.meta
        return out

    results: list[ItemResult] = []
    sealed = (lambda _pairs: on_sealed(seen)) if on_sealed is not None else None
    for result in stream_through(client, items(), run_id=run_id, on_sealed=sealed, **stream):
        while waiting and not waiting[0].passages:  # a query without passages has no results to wait for
            yield answered(waiting.popleft(), [])
        results.append(result)
        if len(results) == len(waiting[0].passages):
            yield answered(waiting.popleft(), results)
            results = []
    while waiting:
        yield answered(waiting.popleft(), [])
