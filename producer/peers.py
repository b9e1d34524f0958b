"""Infinity's and Cohere's HTTP shapes for classification and reranking, without the HTTP.

``queuebert serve`` answers them beside TEI's (:mod:`producer.tei`) so that clients written for
those servers work with a model named in the request. As ``tei.py``, this module turns bodies into
queuebert items and item results into the peer's response bodies and errors; the gateway does the
rest. The shapes were read from the peers' own source:

- **Infinity** (``michaelfeil/infinity`` at fcb951cb679d0de185bf254600d9b7d2cd3a263a, v0.0.77+):
  ``libs/infinity_emb/infinity_emb/infinity_server.py`` (the routes ``{url_prefix}/classify``,
  ``/rerank``, ``/models``; ``url_prefix`` defaults to empty, deployments often set ``/v1``: both
  are served), ``fastapi_schemas/pymodels.py`` (``ClassifyInput``, ``ClassifyResult``,
  ``RerankInput``, ``ReRankResult``, ``ModelInfo``, ``OpenAIModelInfo``),
  ``fastapi_schemas/errors.py`` (``OpenAIException``: ``{"error": {"message", "type", "param",
  "code"}}``; an unknown model is 400 ``Invalid model: ...``), ``inference/batch_handler.py``
  (rerank: sigmoid of the logit unless ``raw_scores``, sorted best first, cut to ``top_n``);
  request bodies that fail validation get FastAPI's 422 ``{"detail": [{"loc", "msg", "type"}]}``,
  which the ``infinity-client`` package parses as ``HTTPValidationError``.
- **Cohere** v2 rerank (``cohere-ai/cohere-python`` at bc495daab7817a2e1389d71257c056dd75bbb0df:
  ``src/cohere/v2/raw_client.py`` ``rerank`` posts ``{"model", "query", "documents", "top_n"?,
  "max_tokens_per_doc"?, "priority"?}`` to ``v2/rerank`` under the client's ``base_url``;
  ``v2/types/v2rerank_response.py``: ``{"id"?, "results": [{"index", "relevance_score"}],
  "meta"?}``); errors are ``{"id", "message"}`` with Cohere's statuses (docs.cohere.com,
  "Errors": 400 ``invalid request: ...``, 404 for an unknown model, 429, 500), which the SDK raises
  as ``BadRequestError``, ``NotFoundError``, ... carrying that body.

Where queuebert does otherwise, on purpose:

- ``raw_scores`` on Infinity's ``/classify`` gives the logits (as TEI's ``raw_scores``); Infinity
  accepts the flag and ignores it. Scores otherwise follow the model's own rule, as the
  text-classification pipeline (and so Infinity's classifier) applies it.
- ``usage`` counts no tokens (0): the gateway holds no tokenizer.
- Cohere's ``max_tokens_per_doc`` and ``priority`` are accepted and ignored: inputs are truncated
  to the model's own length, as everywhere in queuebert.
- Infinity strips leading and trailing whitespace from every input (its pydantic
  ``strip_whitespace``); queuebert classifies the text it is sent, as the pipeline does.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from queuebert.schema import Item, ItemResult, JobOptions

from . import tei
from .catalog import INFINITY_UNSPECIFIED, ModelError, check_model_name
from .pairs import relevance


class PeerError(Exception):
    """A refusal already in the peer's own shape: ``status`` and the JSON ``body`` to send."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(json.dumps(body)[:200])
        self.status = status
        self.body = body


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4()}"


# --- Infinity ------------------------------------------------------------------------------------


def infinity_validation(loc: Sequence[str | int], msg: str, kind: str) -> PeerError:
    """FastAPI's 422 for a body that fails Infinity's pydantic models (``HTTPValidationError``)."""
    return PeerError(422, {"detail": [{"type": kind, "loc": ["body", *loc], "msg": msg}]})


def infinity_error(status: int, message: str, error_type: str | None = None, param: str | None = None
                   ) -> dict[str, Any]:
    """Infinity's ``OpenAIException.json()``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def infinity_refusal(exc: Exception, error: tei.TEIError) -> tuple[int, dict[str, Any]]:
    """What Infinity's routes answer for a failure the gateway describes as ``error`` (TEI's
    status and words): the same status in Infinity's shape, except a model name it cannot route,
    which Infinity answers 400 ``Invalid model``."""
    if isinstance(exc, ModelError):
        return 400, infinity_error(400, f"Invalid model: {exc.message}", "invalid_request_error", "model")
    return error.status, infinity_error(error.status, error.message, error.error_type)


def _infinity_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise infinity_validation([], "Input should be a valid dictionary or object to extract fields from",
                                  "model_attributes_type")
    return body


def _infinity_texts(body: dict[str, Any], field: str, max_items: int) -> list[str]:
    """A ``conlist(str, min_length=1, max_length=max_client_batch_size)`` field."""
    if field not in body:
        raise infinity_validation([field], "Field required", "missing")
    value = body[field]
    if not isinstance(value, list):
        raise infinity_validation([field], "Input should be a valid list", "list_type")
    if not value:
        raise infinity_validation([field], "List should have at least 1 item after validation, not 0", "too_short")
    if len(value) > max_items:
        raise infinity_validation([field], f"List should have at most {max_items} items after validation, not "
                                           f"{len(value)}", "too_long")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise infinity_validation([field, i], "Input should be a valid string", "string_type")
        _unicode(text, [field, i])
    return value


def _unicode(text: str, loc: Sequence[str | int]) -> None:
    """A lone surrogate (which Python's json lets in) cannot be sent to a worker as UTF-8."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise infinity_validation(loc, "Input should be a valid string: lone surrogate", "string_unicode") from None


def _infinity_flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise infinity_validation([field], "Input should be a valid boolean", "bool_type")
    return value


def _infinity_model(body: dict[str, Any]) -> str:
    value = body.get("model", INFINITY_UNSPECIFIED)
    if not isinstance(value, str):
        raise infinity_validation(["model"], "Input should be a valid string", "string_type")
    return value


@dataclass(frozen=True)
class ClassifyRequest:
    """Infinity's ``ClassifyInput``: ``{"input": [str, ...], "model"?, "raw_scores"?}``."""

    texts: tuple[str, ...]
    model: str
    raw_scores: bool

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple({"id": str(i), "text": t} for i, t in enumerate(self.texts))

    @property
    def options(self) -> JobOptions:
        return JobOptions(function_to_apply="none" if self.raw_scores else None)


def parse_classify(body: Any, *, max_client_batch_size: int) -> ClassifyRequest:
    body = _infinity_object(body)
    texts = _infinity_texts(body, "input", max_client_batch_size)
    return ClassifyRequest(tuple(texts), _infinity_model(body), _infinity_flag(body, "raw_scores"))


@dataclass(frozen=True)
class PeerRerankRequest:
    """Infinity's ``RerankInput`` or Cohere's v2 rerank body: a query, its documents, the model,
    how many of the best to return (None: all)."""

    query: str
    documents: tuple[str, ...]
    model: str
    top_n: int | None
    return_documents: bool = False
    raw_scores: bool = False

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple({"id": str(i), "text": self.query, "text_pair": d} for i, d in enumerate(self.documents))

    @property
    def options(self) -> JobOptions:
        return JobOptions(function_to_apply="none" if self.raw_scores else None)


def is_infinity_rerank(body: Any) -> bool:
    """``POST /rerank`` serves TEI's body (``texts``) and Infinity's (``documents``): Infinity's
    when it has ``documents`` and no ``texts``."""
    return isinstance(body, dict) and "documents" in body and "texts" not in body


def parse_infinity_rerank(body: Any, *, max_client_batch_size: int) -> PeerRerankRequest:
    body = _infinity_object(body)
    if "query" not in body:
        raise infinity_validation(["query"], "Field required", "missing")
    query = body["query"]
    if not isinstance(query, str):
        raise infinity_validation(["query"], "Input should be a valid string", "string_type")
    _unicode(query, ["query"])
    documents = _infinity_texts(body, "documents", max_client_batch_size)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int)):
        raise infinity_validation(["top_n"], "Input should be a valid integer", "int_type")
    if top_n is not None and top_n <= 0:
        raise infinity_validation(["top_n"], "Input should be greater than 0", "greater_than")
    return PeerRerankRequest(query, tuple(documents), _infinity_model(body), top_n,
                             return_documents=_infinity_flag(body, "return_documents"),
                             raw_scores=_infinity_flag(body, "raw_scores"))


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "total_tokens": 0}


def classify_response(request: ClassifyRequest, results: Sequence[ItemResult], model: str,
                      labels: Sequence[str] | None) -> dict[str, Any]:
    """Infinity's ``ClassifyResult``: one list of ``{"score", "label"}`` per input, best first (the
    pipeline's ``top_k=None`` order). The first failed input fails the request (TEI's rule)."""
    if len(results) != len(request.texts):
        raise ValueError(f"{len(results)} results for {len(request.texts)} inputs")
    data = [tei.predictions(r, labels) for r in results]
    return {"object": "classify", "data": data, "model": model, "usage": _usage(), "id": _new_id("queuebert-"),
            "created": int(time.time())}


def ranked(results: Sequence[ItemResult]) -> list[tuple[int, float]]:
    """``(index, relevance)`` best first, ties in input order (Python's stable sort, as Infinity's
    ``sorted(..., reverse=True)``); one failed pair fails the request. A model with several labels
    is no reranker (:class:`RerankError`)."""
    scores = []
    for index, result in enumerate(results):
        if "error" in result:
            raise tei.item_error(result)
        score = relevance(result)
        if math.isnan(score):
            raise tei.TEIError.of(tei.BACKEND, tei.SCORE_NAN)
        scores.append((index, score))
    return sorted(scores, key=lambda s: s[1], reverse=True)


def infinity_rerank_response(request: PeerRerankRequest, results: Sequence[ItemResult], model: str) -> dict[str, Any]:
    """Infinity's ``ReRankResult``: ``{"relevance_score", "index", "document"?}`` best first."""
    out = []
    for index, score in ranked(results)[:request.top_n]:
        entry: dict[str, Any] = {"relevance_score": score, "index": index}
        if request.return_documents:
            entry["document"] = request.documents[index]
        out.append(entry)
    return {"object": "rerank", "results": out, "model": model, "usage": _usage(), "id": _new_id("queuebert-"),
            "created": int(time.time())}


def not_a_reranker(model: str, route: str) -> PeerError:
    """Infinity's 400 for a model without the capability (``ModelNotDeployedError``)."""
    return PeerError(400, infinity_error(400, f"ModelNotDeployedError: model=`{model}` does not support `{route}`. "
                                              "Reason: it has several labels; a reranker has one"))


# --- Cohere --------------------------------------------------------------------------------------


def cohere_error(status: int, message: str) -> dict[str, Any]:
    """Cohere's error body: ``{"id", "message"}``."""
    return {"id": str(uuid.uuid4()), "message": message}


def cohere_invalid(message: str) -> PeerError:
    return PeerError(400, cohere_error(400, f"invalid request: {message}"))


def cohere_refusal(exc: Exception, error: tei.TEIError) -> tuple[int, dict[str, Any]]:
    """Cohere's answer for a failure the gateway describes as ``error``: an unknown model 404, a
    malformed name or body 400 (Cohere answers bad input 400, not 422), the rest its status."""
    if isinstance(exc, ModelError):
        if exc.unknown:
            return 404, cohere_error(404, exc.message)
        return 400, cohere_error(400, f"invalid request: {exc.message}")
    status = 400 if error.status in (tei.STATUS[tei.VALIDATION], tei.BAD_JSON_STATUS) else error.status
    return status, cohere_error(status, error.message)


def parse_cohere_rerank(body: Any, *, max_client_batch_size: int) -> PeerRerankRequest:
    """Cohere v2 rerank's body: ``model``, ``query`` and ``documents`` (strings) required,
    ``top_n`` a positive integer; ``max_tokens_per_doc`` and ``priority`` integers, ignored."""
    if not isinstance(body, dict):
        raise cohere_invalid("the body must be a JSON object")
    for name in ("model", "query", "documents"):
        if body.get(name) is None:
            raise cohere_invalid(f"{name} is required")
    try:
        model = check_model_name(body["model"])
    except ModelError as exc:
        raise cohere_invalid(exc.message) from None
    query, documents = body["query"], body["documents"]
    if not isinstance(query, str):
        raise cohere_invalid("query must be a string")
    if not query.strip():
        raise cohere_invalid("query must not be empty or be only whitespace")
    if not isinstance(documents, list):
        raise cohere_invalid("documents must be a list of strings")
    if not documents:
        raise cohere_invalid("list of documents must not be empty")
    if len(documents) > max_client_batch_size:
        raise cohere_invalid(f"too many documents: {len(documents)}, at most {max_client_batch_size} per request")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise cohere_invalid(f"documents[{i}] must be a string")
    for text in (query, *documents):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise cohere_invalid("texts must be valid Unicode (a lone surrogate was sent)") from None
    for name in ("top_n", "max_tokens_per_doc", "priority"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise cohere_invalid(f"{name} must be an integer")
    top_n = body.get("top_n")
    if top_n is not None and top_n < 1:
        raise cohere_invalid("top_n must be at least 1")
    return PeerRerankRequest(query, tuple(documents), model, top_n)


def cohere_rerank_response(request: PeerRerankRequest, results: Sequence[ItemResult]) -> dict[str, Any]:
    """Cohere's ``V2RerankResponse``: ``{"id", "results": [{"index", "relevance_score"}], "meta"}``."""
    out = [{"index": index, "relevance_score": score} for index, score in ranked(results)[:request.top_n]]
    return {"id": str(uuid.uuid4()), "results": out, "meta": {"api_version": {"version": "2"}}}


# --- GET /v1/models ------------------------------------------------------------------------------


def models_response(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's and Infinity's model list, ``{"object": "list", "data": [...]}``; each row is
    Infinity's ``ModelInfo`` (``id``, ``object``, ``created``, ``stats``, ``backend``,
    ``capabilities``) with queuebert's own fields under ``queuebert``. No ``owned_by``: Infinity
    allows only ``"infinity"`` there (its client's ``ModelInfoOwnedBy`` enum refuses anything
    else), and OpenAI's clients read the list without it."""
    return {"object": "list", "data": list(rows)}


def model_row(name: str, queue: str, info: tei.ModelInfo | None, workers: int, *, declared: bool, default: bool,
              queued_jobs: int | None, created: int) -> dict[str, Any]:
    """One model of the list. ``capabilities`` as Infinity names them: ``rerank`` for a one-label
    model, ``classify`` for a classifier, none while no worker has said which it is."""
    capabilities = [] if info is None else (["rerank"] if info.reranker else ["classify"])
    detail: dict[str, Any] = {"queue": queue, "workers": workers, "default": default, "declared": declared}
    if info is not None:
        detail.update(model_id=info.model, labels=list(info.labels), max_input_length=info.max_length,
                      device=info.device, dtype=info.dtype)
    return {"id": name, "object": "model", "created": created,
            "stats": {"queue": queue, "workers": workers, "queued_jobs": queued_jobs},
            "backend": "queuebert", "capabilities": capabilities, "queuebert": detail}
