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
from typing import TYPE_CHECKING, Any, Unpack

from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, INVALID_ITEM, Item, ItemResult, JobOptionFields

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
    item: dict[str, Any] = dict(text) if isinstance(text, dict) else {"text": text}
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
                   max_pending: int | None = None, timeout: float | None = None,
                   on_enqueued: Callable[[int], None] | None = None, on_sealed: Callable[[int], None] | None = None,
                   on_idle: Callable[[], None] | None = None, consume: bool = True,
                   before_delete: Callable[[], None] | None = None,
                   **options: Unpack[JobOptionFields]) -> Iterator[ItemResult]:
    """Enqueue ``items`` as one run in a background thread (with backpressure) while yielding
    their results in input order; with ``consume`` each job's results leave Redis once read.
    ``on_sealed`` hears the run's item count once everything is enqueued."""
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            run = client.enqueue_stream(items, chunk_size=chunk_size, max_pending=max_pending, run_id=run_id,
                                        on_progress=on_enqueued, **options)
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


class Reranking:
    """Queries becoming pairs and their pairs' results becoming answers, for ``rerank_many`` in
    either client (no I/O here): :meth:`pairs` as the run is enqueued, :meth:`add` for each result
    in input order, :meth:`rest` at the end. Only the queries between the one being answered and
    the enqueue front are held."""

    def __init__(self, *, top_n: int | None = None, return_text: bool = False, label: str | None = None):
        self.top_n, self.return_text, self.label = top_n, return_text, label
        self.waiting: deque[Query] = deque()
        #: Queries read so far.
        self.seen = 0
        self._results: list[ItemResult] = []

    def pairs(self, n: int, q: dict[str, Any]) -> list[Item]:
        """The pair items of query number ``n`` (``{"id"?, "query", "passages", ...}``), which now
        waits for their results (none for an unusable query: its answer is an error)."""
        self.seen = n + 1
        query_id = str(q["id"]) if q.get("id") is not None else str(n)
        passages = q.get("passages")
        meta = {k: v for k, v in q.items() if k not in ("id", "query", "passages")} or None
        if not isinstance(q.get("query"), str) or not isinstance(passages, list):
            self.waiting.append(Query(query_id, [], meta, "a query is {'query': str, 'passages': [str, ...]}"))
            return []
        self.waiting.append(Query(query_id, passages, meta))
        return pair_items(query_id, q["query"], passages)

    def add(self, result: ItemResult) -> list[dict[str, Any]]:
        """The next pair's result (input order): the answers it completes."""
        out = []
        while self.waiting and not self.waiting[0].passages:  # a query without passages has no results to wait for
            out.append(self._answer(self.waiting.popleft(), []))
        self._results.append(result)
        if len(self._results) == len(self.waiting[0].passages):
            out.append(self._answer(self.waiting.popleft(), self._results))
            self._results = []
        return out

    def rest(self) -> list[dict[str, Any]]:
        """Once every result is in: the answers of the queries left (ones without passages)."""
        out = [self._answer(query, []) for query in self.waiting]
        self.waiting.clear()
        return out

    def _answer(self, query: Query, results: list[ItemResult]) -> dict[str, Any]:
        if query.error is not None:
            return {"id": query.id, "error": {"type": INVALID_ITEM, "message": query.error}}
        out: dict[str, Any] = {"id": query.id, "results": ranking(results, query.passages if self.return_text else None,
                                                                  self.top_n, self.label)}
        errors = [r for r in results if "error" in r]
        if errors:
            out["errors"] = errors
        if query.meta:
            out["meta"] = query.meta
        return out


def rerank_stream(client: Client, queries: Iterable[dict[str, Any]], *, run_id: str, top_n: int | None = None,
                  return_text: bool = False, label: str | None = None,
                  on_sealed: Callable[[int], None] | None = None, **stream: Any) -> Iterator[dict[str, Any]]:
    """For each ``{"id"?, "query", "passages", ...}`` in order: ``{"id", "results": ranking, "meta"?}``.

    Every query's pairs go out as one run, enqueued while results are read (see :class:`Reranking`).
    ``on_sealed`` hears the number of queries once all are enqueued."""
    reranking = Reranking(top_n=top_n, return_text=return_text, label=label)

    def items() -> Iterator[Item]:
        for n, q in enumerate(queries):
            yield from reranking.pairs(n, q)

    sealed = (lambda _pairs: on_sealed(reranking.seen)) if on_sealed is not None else None
    for result in stream_through(client, items(), run_id=run_id, on_sealed=sealed, **stream):
        yield from reranking.add(result)
    yield from reranking.rest()
