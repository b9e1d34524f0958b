"""From a job's items to the rows the model runs, and from the rows' results back to the items'.

A text or a pair is one row. A zero-shot item is one (text, hypothesis) pair per candidate label,
run as ``pipeline("zero-shot-classification")`` runs them: the hypothesis is the template with the
label put in, the text is truncated first (``only_first``), and the answer comes from the pairs'
raw logits. Its pairs are rows like any other, batched with other jobs' texts and pairs; its
answer is assembled by :func:`finish` when the job's last row settles, so it is written with the
job's results, and the run record (once per job) makes it appear once, whichever worker ran it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, cast

import numpy as np
import structlog

from queuebert.schema import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    INFERENCE_ERROR,
    Item,
    ItemResult,
    JobOptions,
    JobRequest,
    check_item,
    error_result,
)

log = structlog.get_logger(__name__)
#: The label sets already warned about (once per model, not once per job).
_warned: set[tuple[str, ...]] = set()


class Raw(enum.Enum):
    """What a row asks of the engine instead of its job's options when its result is its raw
    logits (``{"id", "logits": [...]}``): a zero-shot item's pairs, which :func:`finish` turns into
    the item's answer. Not a :class:`JobOptions`, so no job can ask for it."""

    LOGITS = "raw logits"


#: What the engine scores a row by: its job's options, or ``Raw.LOGITS``.
RowOptions: TypeAlias = JobOptions | Literal[Raw.LOGITS]


@dataclass(slots=True)
class Group:
    """A zero-shot item and where its pairs' results are."""

    item: Item
    position: int  # the item's place in its job's results
    first: int  # the place of its first pair's result, past the job's items
    entailment: int  # which logits answer (see entailment_ids)
    contradiction: int


@dataclass
class JobRows:
    """A checked job as rows: what goes to the model, and where each row's result goes."""

    rows: list[Item] = field(default_factory=list)
    options: list[RowOptions] = field(default_factory=list)
    #: Where each row's result goes in :attr:`results`.
    positions: list[int] = field(default_factory=list)
    #: One per job item (item errors already filled in), then one per zero-shot pair.
    results: list[ItemResult | None] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)


def split_items(request: JobRequest, max_chars: int, label2id: Mapping[str, int]) -> JobRows:
    """Check each item alone (a bad one gets its error result, the others go on) and lay the
    valid ones out as rows; ``label2id`` is the model's, for zero-shot items."""
    n = len(request.items)
    out = JobRows(results=[None] * n)
    ids: tuple[int, int] | None = None
    for pos, raw in enumerate(request.items):
        item, error = check_item(raw, max_chars)
        if item is None:
            out.results[pos] = error
        elif "candidate_labels" in item:
            template = item.get("hypothesis_template", DEFAULT_HYPOTHESIS_TEMPLATE)
            ids = ids or entailment_ids(label2id)
            out.groups.append(Group(item, pos, len(out.results), *ids))
            for label in item["candidate_labels"]:
                out.rows.append({"id": item["id"], "text": item["text"], "text_pair": template.format(label),
                                 "truncation": "only_first"})
                out.options.append(Raw.LOGITS)
                out.positions.append(len(out.results))
                out.results.append(None)
        else:
            out.rows.append(item)
            out.options.append(request.options)
            out.positions.append(pos)
    return out


def entailment_ids(label2id: Mapping[str, int]) -> tuple[int, int]:
    """The zero-shot pipeline's choice of logits: entailment is the first label whose name starts
    with "entail" (-1, the last logit, when none does, as the pipeline falls back), contradiction
    is logit 0, or the last one when entailment is 0."""
    entailment = next((i for label, i in label2id.items() if label.lower().startswith("entail")), -1)
    if entailment == -1 and tuple(label2id) not in _warned:
        # The pipeline warns too: such a model's zero-shot scores are only as good as that guess.
        _warned.add(tuple(label2id))
        log.warning("zero-shot item on a model with no 'entailment' label: using its last logit, as the "
                    "pipeline does; zero-shot needs an NLI model", labels=list(label2id))
    return entailment, (-1 if entailment == 0 else 0)


def settled(results: list[ItemResult | None]) -> list[ItemResult]:
    """A finished job's results, as its readers see them: every slot filled (the last row to
    settle filled the last one)."""
    return cast("list[ItemResult]", results)


def finish(results: list[ItemResult | None], groups: list[Group], n_items: int) -> list[ItemResult]:
    """The job's item results, with each zero-shot item's answer assembled from its pairs' logits
    (or, if a pair failed, that pair's error, which is then the item's)."""
    if not groups:
        return cast("list[ItemResult]", results)  # every slot filled by the engine
    for group in groups:
        item = group.item
        pairs = results[group.first:group.first + len(item["candidate_labels"])]
        failed = next((r for r in pairs if r is None or "error" in r), None)
        if failed is not None:
            error = failed.get("error") if failed else None
            kind, message = (error["type"], error["message"]) if error else (INFERENCE_ERROR, "a pair has no result")
            results[group.position] = error_result(item["id"], kind, message, item.get("meta"))
        else:
            logits = np.array([r["logits"] for r in pairs if r is not None], dtype=np.float32)  # (none is None)
            results[group.position] = answer(item, logits, group.entailment, group.contradiction)
    return cast("list[ItemResult]", results[:n_items])  # the items' own slots, each filled now


def answer(item: Item, logits: np.ndarray, entailment: int, contradiction: int) -> ItemResult:
    """The pipeline's postprocess for one text: ``logits`` is (labels, model outputs), float32."""
    labels = item["candidate_labels"]
    if item.get("multi_label", False) or len(labels) == 1:
        # Each label alone: softmax of entailment against contradiction.
        pair = logits[:, [contradiction, entailment]]
        scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[:, 1]
    else:
        # The labels against each other: softmax of the entailment logits.
        entail = logits[:, entailment]
        scores = np.exp(entail) / np.exp(entail).sum(-1, keepdims=True)
    top = list(reversed(scores.argsort()))
    result: ItemResult = {"id": item["id"], "labels": [labels[i] for i in top], "scores": scores[top].tolist()}
    if "meta" in item:
        result["meta"] = item["meta"]
    return result
