"""text-embeddings-inference (TEI)'s HTTP API for a classifier or reranker, without the HTTP.

The gateway (``queuebert serve``) speaks TEI's API so that clients written for TEI work unchanged.
This module is the part of it that needs neither Redis nor a web framework: it turns request bodies
into queuebert items and job options, and item results into TEI's response bodies and errors. The
rules follow TEI's router at commit 0d124dc9773be6ac5a9a57d8439aba9bbbf33273 (v1.9.3):
``router/src/http/types.rs`` (``PredictRequest``, ``PredictInput``, ``RerankRequest``, ``Prediction``,
``Rank``), ``router/src/http/server.rs`` (the ``predict``, ``rerank``, ``health`` handlers, the ``/``
dispatch by model type, ``impl From<&ErrorType> for StatusCode``), ``router/src/lib.rs`` (``Info``,
``ModelType``, ``ClassifierModel``, ``ErrorType``, ``ErrorResponse``) and
``core/src/tokenization.rs`` (empty inputs).

Where queuebert does otherwise, on purpose:

- It always truncates to the model's length, as the text-classification pipeline does with
  ``truncation=True`` and as TEI does when ``truncate`` is absent (TEI's ``--auto-truncate``
  defaults to true). ``truncate: false`` is accepted but does not make a too-long input an error:
  the gateway holds no tokenizer to count tokens (it is a light producer) and the worker's contract
  has no such option. ``truncation_direction: "left"`` is refused (422): the worker cuts on the
  right, and answering a left-truncation request with right-truncated scores would be silently wrong.
- Scores come from the model's own rule, as the pipeline applies it (``function_to_apply``
  default: sigmoid for a multi-label or one-logit model, softmax otherwise, none for regression);
  TEI softmaxes every model with more than one label. They differ only for multi-label and
  regression models, where the pipeline's numbers are the meaningful ones.
- ``POST /`` with a ``parameters`` object (the Hugging Face Inference API's convention, which
  ``huggingface_hub.InferenceClient.text_classification`` posts: ``{"inputs", "parameters":
  {"top_k"?, "function_to_apply"?}}``) honours those parameters and answers one list per input even
  for a single input (``[[{"label", "score"}, ...]]``), the shape that client parses (it takes
  element 0 of the outer list). TEI ignores ``parameters`` and answers a flat list, from which that
  client would take only the best label.
- A request that waits past its timeout is 504 (TEI has no timeout); its body still uses one of
  TEI's ``error_type`` values (``Overloaded``), so clients that read the type strictly parse it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from queuebert.keys import WORKER_MODEL_FIELDS
from queuebert.schema import (
    DEADLINE_EXCEEDED,
    FUNCTIONS,
    INFERENCE_ERROR,
    INVALID_ITEM,
    INVALID_JOB,
    INVALID_TEXT,
    TEXT_TOO_LONG,
    Item,
    ItemResult,
    JobError,
    JobOptions,
)

from .pairs import RerankError, relevance

# TEI's ``enum ErrorType`` (router/src/lib.rs), serialized by variant name: clients see these strings.
UNHEALTHY = "Unhealthy"
BACKEND = "Backend"
OVERLOADED = "Overloaded"
VALIDATION = "Validation"
TOKENIZER = "Tokenizer"
EMPTY = "Empty"

#: TEI's ``impl From<&ErrorType> for StatusCode`` (router/src/http/server.rs).
STATUS = {UNHEALTHY: 503, BACKEND: 424, OVERLOADED: 429, VALIDATION: 422, TOKENIZER: 422, EMPTY: 400}

#: Status of a body that is not JSON (axum's ``JsonSyntaxError``, which TEI's ``Json`` extractor
#: returns) and of a body without a JSON content type (axum's ``MissingJsonContentType``).
BAD_JSON_STATUS = 400
BAD_CONTENT_TYPE_STATUS = 415
#: A request whose result did not come in time (no TEI counterpart: TEI waits for ever).
TIMEOUT_STATUS = 504
#: A body over the gateway's limit (TEI: axum's ``DefaultBodyLimit``, from ``--payload-limit``).
TOO_LARGE_STATUS = 413
#: A body the client did not send within the gateway's ``body_timeout`` (TEI has no such limit).
BODY_TIMEOUT_STATUS = 408
#: ``POST /runs`` under a run id whose run this body cannot continue (queuebert's own route).
CONFLICT_STATUS = 409
#: The client went away before its request was answered (nginx's "client closed request"): only
#: the gateway's log and metrics ever see it.
CLIENT_CLOSED_STATUS = 499
#: A failure the gateway did not expect (a bug): the client gets this body, never a traceback.
INTERNAL_STATUS = 500

# TEI's messages, word for word, where a client or a person may match on them.
EMPTY_INPUT = "Input validation error: `inputs` cannot be empty"  # core tokenization.rs, via Display
EMPTY_TEXTS = "`texts` cannot be empty"  # server.rs rerank
NOT_RERANKER = "Backend error: model is not a re-ranker model"  # server.rs rerank, via Display
SCORE_NAN = "score is NaN"  # server.rs predict and rerank
OVERLOADED_MESSAGE = "Model is overloaded"  # core lib.rs TextEmbeddingsError::Overloaded
UNHEALTHY_MESSAGE = "unhealthy"  # server.rs health
#: What ``PredictInput``'s visitor says it expects (types.rs ``fn expecting``).
PREDICT_INPUT_EXPECTED = ("a string, a pair of strings [string, string] or a batch of mixed strings and pairs "
                          "[[string], [string, string], ...]")
# TEI's Display prefixes of ``TextEmbeddingsError`` (core/src/lib.rs), kept on messages of the same kind.
VALIDATION_PREFIX = "Input validation error: "
BACKEND_PREFIX = "Backend error: "

#: ``truncation_direction`` spellings TEI accepts (types.rs ``TruncationDirection``: variant names
#: and serde aliases).
RIGHT, LEFT = ("Right", "right"), ("Left", "left")

#: The Inference API's ``function_to_apply`` values, as huggingface_hub types them
#: (``TextClassificationOutputTransform``); queuebert's job option takes the same words.
HF_FUNCTIONS = tuple(f for f in FUNCTIONS if f != "default")

#: How each queuebert item error becomes the error of the whole request, as TEI fails a whole
#: request for one bad input: (status, TEI error type, message prefix).
ITEM_ERRORS: dict[str, tuple[int, str, str]] = {
    INVALID_ITEM: (STATUS[VALIDATION], VALIDATION, VALIDATION_PREFIX),
    INVALID_TEXT: (STATUS[VALIDATION], VALIDATION, VALIDATION_PREFIX),
    TEXT_TOO_LONG: (STATUS[VALIDATION], VALIDATION, VALIDATION_PREFIX),
    INFERENCE_ERROR: (STATUS[BACKEND], BACKEND, BACKEND_PREFIX),
    INVALID_JOB: (STATUS[BACKEND], BACKEND, BACKEND_PREFIX),
    DEADLINE_EXCEEDED: (TIMEOUT_STATUS, OVERLOADED, ""),
}


class TEIError(Exception):
    """A request TEI would refuse, with the status and ``ErrorResponse`` body it would send."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    @classmethod
    def of(cls, error_type: str, message: str) -> TEIError:
        """An error whose status is TEI's for its type."""
        return cls(STATUS[error_type], message, error_type)

    def body(self) -> dict[str, str]:
        """TEI's ``ErrorResponse``: ``{"error", "error_type"}``."""
        return {"error": self.message, "error_type": self.error_type}

    def __repr__(self) -> str:
        return f"TEIError({self.status}, {self.message!r}, {self.error_type!r})"


def overloaded() -> TEIError:
    """429, TEI's answer when no request permit is free; the gateway's when its queue is too deep."""
    return TEIError.of(OVERLOADED, OVERLOADED_MESSAGE)


def streams_full(limit: int) -> TEIError:
    """429 for a result stream past the gateway's ``max_streams``: TEI's answer when no request
    permit is free, with why (sent with Retry-After)."""
    return TEIError.of(OVERLOADED, f"{OVERLOADED_MESSAGE}: {limit} result streams are open, the most this gateway "
                                   "serves at once (QUEUEBERT_MAX_STREAMS); retry later")


def unhealthy() -> TEIError:
    """503 of ``GET /health`` (TEI: the backend fails its health check; here: Redis or the workers)."""
    return TEIError.of(UNHEALTHY, UNHEALTHY_MESSAGE)


def stopping() -> TEIError:
    """503 for a request still waiting when the gateway's stop grace runs out (sent with
    Retry-After: another replica, or this one restarted, can answer it)."""
    return TEIError.of(UNHEALTHY, "the gateway is stopping: retry the request")


def timed_out(seconds: float) -> TEIError:
    """504 for a request whose results did not arrive within ``seconds``."""
    return TEIError(TIMEOUT_STATUS, f"no result within {seconds:g} s", OVERLOADED)


def too_large(size: int | str, limit: int) -> TEIError:
    """413 for a body over ``limit`` bytes (``size``: its length, or what is known of it)."""
    return TEIError(TOO_LARGE_STATUS, f"body of {size} bytes, more than {limit}", VALIDATION)


def body_timeout(message: str) -> TEIError:
    """408 for a body that did not arrive in time."""
    return TEIError(BODY_TIMEOUT_STATUS, message, VALIDATION)


def redis_unavailable() -> TEIError:
    """503 while Redis refuses, fails or cannot be reached (sent with Retry-After: nothing is wrong
    with the request; the details go to the gateway's log, not to the client)."""
    return TEIError.of(UNHEALTHY, "Redis is unavailable: retry the request")


def internal() -> TEIError:
    """500 for an error the gateway did not expect (logged with its traceback there)."""
    return TEIError(INTERNAL_STATUS, "internal error", BACKEND)


@dataclass(frozen=True)
class ModelInfo:
    """What a worker publishes about its model (``queuebert.keys.WORKER_MODEL_FIELDS``)."""

    model: str
    device: str
    dtype: str
    labels: tuple[str, ...]
    max_length: int
    scoring: str

    @property
    def reranker(self) -> bool:
        """TEI serves a one-label classifier as a reranker (lib.rs: ``n_classes > 1`` is a classifier)."""
        return len(self.labels) == 1


@dataclass(frozen=True)
class PredictRequest:
    """A parsed ``/predict`` (or ``POST /`` on a classifier) body.

    ``items`` are in input order, ids their positions. ``batch``: the answer is one list per input
    (TEI's ``PredictResponse::Batch``), else one list (``Single``). ``options``: the job's
    (``function_to_apply`` from ``raw_scores`` or ``parameters``; ``top_k`` only through
    ``parameters``, and it cuts each answer too).
    ``truncate`` is kept as sent, for logs: it does not change what the worker does."""

    items: tuple[Item, ...]
    batch: bool
    options: JobOptions = JobOptions()
    truncate: bool | None = None


@dataclass(frozen=True)
class RerankRequest:
    """A parsed ``/rerank`` body: one (query, text) pair item per text, ids their positions."""

    query: str
    texts: tuple[str, ...]
    items: tuple[Item, ...]
    return_text: bool = False
    options: JobOptions = JobOptions()
    truncate: bool | None = None


# --- the body ---------------------------------------------------------------------------------


def check_content_type(value: str | None) -> None:
    """Refuse a body that does not say it is JSON, as axum's ``Json`` extractor does (415):
    ``application/json`` or any ``application/*+json``, parameters (charset) allowed."""
    mime = (value or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise TEIError(BAD_CONTENT_TYPE_STATUS, "Expected request with `Content-Type: application/json`", VALIDATION)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bad_json(reason: str) -> TEIError:
    return TEIError(BAD_JSON_STATUS, f"Failed to parse the request body as JSON: {reason}", VALIDATION)


def decode_body(raw: bytes | str) -> Any:
    """The JSON value of a request body; 400 for what serde_json would not parse (bad UTF-8,
    bad syntax, ``NaN``/``Infinity``, nesting too deep to parse), as TEI's extractor answers.
    Lone surrogates (``"\\ud800"``), which serde_json also refuses, are caught where texts are
    read (``predict_inputs``, ``parse_rerank``), so a big body is not walked twice."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeError, ValueError) as exc:
        raise _bad_json(str(exc)) from None
    except RecursionError:  # json's C scanner recurses per nesting level; serde_json stops at 128
        raise _bad_json("recursion limit exceeded") from None


def _invalid(message: str) -> TEIError:
    """422: the body is JSON but not the route's shape (axum's ``JsonDataError``, serde's words)."""
    return TEIError.of(VALIDATION, f"Failed to deserialize the JSON body into the target type: {message}")


def _object(body: Any) -> dict[str, Any]:
    """The body as an object. (serde would also read a struct from a JSON array of its fields in
    order; no TEI client sends that, and refusing it keeps the rules one can read here short.)"""
    if not isinstance(body, dict):
        raise _invalid(f"invalid type: {_kind(body)}, expected an object")
    return body


def _kind(value: Any) -> str:
    """serde's name for a JSON value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"number `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)[:40]}"
    return "sequence" if isinstance(value, list) else "map"


def _flag(body: dict[str, Any], field: str, *, nullable: bool) -> bool | None:
    """A boolean field: ``#[serde(default)] bool`` (absent: false, null refused) or ``Option<bool>``
    (absent or null: None)."""
    value = body.get(field)
    if field not in body or (value is None and nullable):
        return None if nullable else False
    if not isinstance(value, bool):
        raise _invalid(f"{field}: invalid type: {_kind(value)}, expected a boolean")
    return value


def _check_direction(body: dict[str, Any]) -> None:
    """``truncation_direction`` as TEI reads it; ``left`` is refused (see the module's notes)."""
    if "truncation_direction" not in body:
        return
    value = body["truncation_direction"]
    if value in LEFT:
        raise TEIError.of(VALIDATION, f"{VALIDATION_PREFIX}truncation_direction `{value}` is not supported: "
                                      "queuebert truncates on the right, as the text-classification pipeline does")
    if value not in RIGHT:
        raise _invalid(f"truncation_direction: unknown variant {_kind(value)}, expected `Left` or `Right`")


def _max_batch(n: int, max_client_batch_size: int) -> None:
    """TEI's client batch limit (``--max-client-batch-size``), 422 ``Validation``."""
    if n > max_client_batch_size:
        raise TEIError.of(VALIDATION, f"batch size {n} > maximum allowed batch size {max_client_batch_size}")


# --- /predict and POST / ----------------------------------------------------------------------

Input = tuple[str, str | None]  # TEI's ``Sequence``: Single(text) or Pair(text, text_pair)


def _sequence(value: Any) -> Input:
    """One batch element: ``[a]`` or ``[a, b]`` (types.rs ``sequence_from_vec``)."""
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _invalid(f"inputs: invalid type: {_kind(value)}, expected a sequence of strings")
    if len(value) not in (1, 2):
        raise _invalid(f"inputs: invalid length {len(value)}, expected {PREDICT_INPUT_EXPECTED}")
    return (value[0], value[1] if len(value) == 2 else None)


def predict_inputs(value: Any) -> tuple[list[Input], bool]:
    """TEI's ``PredictInput`` rules: ``(sequences, batch)``.

    A string is one input. A list whose first element is a string is ONE input: ``[a]`` a text,
    ``[a, b]`` a pair (not a batch of two), three or more an error. A list whose first element is a
    list is a batch whose elements are each ``[a]`` or ``[a, b]``. An empty list is an error. A
    lone surrogate, which serde_json refuses while parsing, is a 400 as there."""
    sequences, batch = _predict_input(value)
    for text, pair in sequences:
        _unicode(text)
        if pair is not None:
            _unicode(pair)
    return sequences, batch


def _predict_input(value: Any) -> tuple[list[Input], bool]:
    if isinstance(value, str):
        return [(value, None)], False
    if not isinstance(value, list):
        raise _invalid(f"inputs: invalid type: {_kind(value)}, expected {PREDICT_INPUT_EXPECTED}")
    if not value:
        raise _invalid(f"inputs: invalid length 0, expected {PREDICT_INPUT_EXPECTED}")
    if isinstance(value[0], str):
        if len(value) > 2:
            raise _invalid(f"inputs: invalid length 3, expected {PREDICT_INPUT_EXPECTED}")
        if len(value) == 2 and not isinstance(value[1], str):
            raise _invalid(f"inputs: invalid type: {_kind(value[1])}, expected a string")
        return [(value[0], value[1] if len(value) == 2 else None)], False
    if not isinstance(value[0], list):
        raise _invalid("inputs: data did not match any variant of untagged enum Internal")
    return [_sequence(v) for v in value], True


def _check_not_empty(sequences: Sequence[Input]) -> None:
    """TEI refuses an empty input before tokenizing it (400 ``Empty``); a pair is empty only when
    both its texts are (tokenization.rs ``EncodingInput::is_empty``)."""
    if any(not text and not pair for text, pair in sequences):
        raise TEIError.of(EMPTY, EMPTY_INPUT)


def _unicode(text: str) -> None:
    """400 for a lone surrogate, which serde_json refuses while parsing (Python's json lets it in)."""
    if not text.isascii():  # only non-ASCII text can hold one; isascii() copies nothing
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _bad_json(f"{exc.reason} at character {exc.start}") from None


def _items(sequences: Sequence[Input]) -> tuple[Item, ...]:
    """Queuebert items for the inputs, ids their positions (the gateway may rename them: answers
    are matched by position)."""
    items = []
    for i, (text, pair) in enumerate(sequences):
        item: Item = {"id": str(i), "text": text}
        if pair is not None:
            item["text_pair"] = pair
        items.append(item)
    return tuple(items)


def _parameters(value: Any, raw_scores: bool) -> JobOptions:
    """The Inference API's ``parameters`` for text classification (``top_k``, ``function_to_apply``)
    with TEI's ``raw_scores``, as the job's options."""
    if not isinstance(value, dict):
        raise _invalid(f"parameters: invalid type: {_kind(value)}, expected an object")
    function = value.get("function_to_apply")
    if function is not None and function not in HF_FUNCTIONS:  # the Inference API's words: no "default"
        raise TEIError.of(VALIDATION, f"{VALIDATION_PREFIX}parameters.function_to_apply must be one of "
                                      f"{', '.join(HF_FUNCTIONS)}, got {function!r}")
    if raw_scores and function not in (None, "none"):
        raise TEIError.of(VALIDATION, f"{VALIDATION_PREFIX}raw_scores asks for raw logits but "
                                      f"parameters.function_to_apply is {function!r}")
    try:
        return JobOptions(top_k=value.get("top_k"), function_to_apply="none" if raw_scores else function)
    except JobError as exc:  # its message starts with the option's name
        raise TEIError.of(VALIDATION, f"{VALIDATION_PREFIX}parameters.{exc}") from None


def parse_predict(body: Any, *, max_client_batch_size: int, inference_api: bool = False) -> PredictRequest:
    """A ``/predict`` body (``PredictRequest``): ``{"inputs", "raw_scores"?, "truncate"?,
    "truncation_direction"?}``; other fields are ignored, as serde ignores them.

    ``inference_api`` (``POST /``): a ``parameters`` object is read as the Inference API's and makes
    the answer one list per input (see the module's notes). Checks run in TEI's order: the body's
    shape (422), the batch size (422), empty inputs (400)."""
    body = _object(body)
    if "inputs" not in body:
        raise _invalid("missing field `inputs`")
    sequences, batch = predict_inputs(body["inputs"])
    truncate = _flag(body, "truncate", nullable=True)
    _check_direction(body)
    raw_scores = bool(_flag(body, "raw_scores", nullable=False))
    nested = inference_api and body.get("parameters") is not None
    options = _parameters(body["parameters"], raw_scores) if nested else _raw(raw_scores)
    if batch:
        _max_batch(len(sequences), max_client_batch_size)
    _check_not_empty(sequences)
    return PredictRequest(items=_items(sequences), batch=batch or nested, options=options, truncate=truncate)


def _raw(raw_scores: bool) -> JobOptions:
    """The options of a request whose only say in scoring is TEI's ``raw_scores`` (raw logits)."""
    return JobOptions(function_to_apply="none" if raw_scores else None)


# --- /rerank ----------------------------------------------------------------------------------


def parse_rerank(body: Any, *, max_client_batch_size: int, model: ModelInfo | None = None) -> RerankRequest:
    """A ``/rerank`` body (``RerankRequest``): ``{"query", "texts", "raw_scores"?, "return_text"?,
    "truncate"?, "truncation_direction"?}``. Checks run in TEI's order: the body's shape (422),
    ``texts`` empty (400), the model not a reranker (424; known once a worker has published its
    labels), the batch size (422), an empty pair (400)."""
    body = _object(body)
    for field in ("query", "texts"):
        if field not in body:
            raise _invalid(f"missing field `{field}`")
    query, texts = body["query"], body["texts"]
    if not isinstance(query, str):
        raise _invalid(f"query: invalid type: {_kind(query)}, expected a string")
    if not isinstance(texts, list):
        raise _invalid(f"texts: invalid type: {_kind(texts)}, expected a sequence")
    for text in texts:
        if not isinstance(text, str):
            raise _invalid(f"texts: invalid type: {_kind(text)}, expected a string")
    for text in (query, *texts):
        _unicode(text)
    truncate = _flag(body, "truncate", nullable=True)
    _check_direction(body)
    raw_scores = _flag(body, "raw_scores", nullable=False)
    return_text = _flag(body, "return_text", nullable=False)
    if not texts:
        raise TEIError.of(EMPTY, EMPTY_TEXTS)
    if model is not None and not model.reranker:
        raise TEIError.of(BACKEND, NOT_RERANKER)
    _max_batch(len(texts), max_client_batch_size)
    sequences = [(query, text) for text in texts]
    _check_not_empty(sequences)
    return RerankRequest(query=query, texts=tuple(texts), items=_items(sequences), return_text=bool(return_text),
                         options=_raw(bool(raw_scores)), truncate=truncate)


def root_route(model: ModelInfo | None) -> Literal["predict", "rerank"]:
    """What ``POST /`` (and ``/invocations``) serves: TEI routes it to ``rerank`` for a one-label
    model and to ``predict`` for a classifier. Until a worker has said what it serves, ``predict``,
    which is also what a classifier's clients (huggingface_hub) send."""
    return "rerank" if model is not None and model.reranker else "predict"


def parse_root(body: Any, *, max_client_batch_size: int, model: ModelInfo | None) -> PredictRequest | RerankRequest:
    """A ``POST /`` body, read as the route TEI dispatches it to for ``model``."""
    if root_route(model) == "rerank":
        return parse_rerank(body, max_client_batch_size=max_client_batch_size, model=model)
    return parse_predict(body, max_client_batch_size=max_client_batch_size, inference_api=True)


# --- responses --------------------------------------------------------------------------------


def item_error(result: ItemResult) -> TEIError:
    """The whole request's error for one failed item (TEI fails the request on its first error)."""
    error = result["error"]
    status, error_type, prefix = ITEM_ERRORS.get(error.get("type", ""), (STATUS[BACKEND], BACKEND, BACKEND_PREFIX))
    return TEIError(status, f"{prefix}{error.get('message', '')}", error_type)


def _check_results(items: Sequence[Item], results: Sequence[ItemResult]) -> None:
    if len(results) != len(items):
        raise ValueError(f"{len(results)} results for {len(items)} items")


def _finite(score: float) -> float:
    if math.isnan(score):
        raise TEIError.of(BACKEND, SCORE_NAN)
    return score


def predictions(result: ItemResult, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One input's ``Vec<Prediction>``: every label, ``{"score", "label"}``, best first.

    TEI sorts ascending (a stable sort) and reverses, so equal scores come in descending label id.
    ``labels`` (the model's, by id) lets ties follow that rule; without them ties keep the worker's
    order (ascending id, the pipeline's)."""
    if "error" in result:
        raise item_error(result)
    scores = result["scores"]
    assert isinstance(scores, dict)
    ids = {label: i for i, label in enumerate(labels)} if labels is not None else {}
    ranked = [(_finite(s), ids.get(label, -n), label) for n, (label, s) in enumerate(scores.items())]
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return [{"score": score, "label": label} for score, _, label in ranked]


def predict_response(request: PredictRequest, results: Sequence[ItemResult],
                     labels: Sequence[str] | None = None) -> list[Any]:
    """TEI's ``PredictResponse``: one input's predictions (``Single``), or a list of them
    (``Batch``; also for ``POST /`` with ``parameters``); each cut to ``top_k`` when asked.
    ``results`` are the items' results in the items' order. The first failed item, in input order,
    fails the request, as TEI's ``join_all(...).collect::<Result<..>>()`` does."""
    _check_results(request.items, results)
    answers = [predictions(r, labels)[:request.options.top_k] for r in results]
    return answers if request.batch else answers[0]


def rerank_response(request: RerankRequest, results: Sequence[ItemResult]) -> list[dict[str, Any]]:
    """TEI's ``RerankResponse``: ``[{"index", "text"?, "score"}]`` for every text, best first.

    Unlike ``producer.pairs.ranking`` (which leaves a failed pair out, for streams of queries), one
    failed pair fails the request, and ties come in descending index: TEI sorts ascending (stable)
    and reverses."""
    _check_results(request.items, results)
    ranks = []
    for index, result in enumerate(results):
        if "error" in result:
            raise item_error(result)
        try:
            score = _finite(relevance(result))
        except RerankError:
            raise TEIError.of(BACKEND, NOT_RERANKER) from None
        rank: dict[str, Any] = {"index": index}
        if request.return_text:
            rank["text"] = request.texts[index]
        rank["score"] = score
        ranks.append(rank)
    ranks.sort(key=lambda r: (r["score"], r["index"]), reverse=True)
    return ranks


# --- /info ------------------------------------------------------------------------------------


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def model_info(worker: Mapping[Any, Any]) -> ModelInfo | None:
    """What one RQ worker hash says it serves, or None when it says too little (a worker from
    before labels were published, or one still loading): fields by ``WORKER_MODEL_FIELDS``,
    ``qb_labels`` a JSON list of label names by id. Keys and values may be bytes (redis-py's
    default) or str."""
    values = [_text(worker.get(k, worker.get(k.encode()))) for k in WORKER_MODEL_FIELDS]
    if any(v is None for v in values):
        return None
    model, device, dtype, labels, max_length, scoring = values
    try:
        names = json.loads(labels)
        length = int(max_length)
    except ValueError:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return ModelInfo(model=model, device=device, dtype=dtype, labels=tuple(names), max_length=length, scoring=scoring)


def served_model(workers: Sequence[Mapping[Any, Any]]) -> tuple[ModelInfo, int] | None:
    """The model most of the queue's workers serve and how many serve it (during a rolling upgrade
    two may be served at once; the gateway describes the majority, ties to the first seen)."""
    counts = Counter(m for m in map(model_info, workers) if m is not None)
    if not counts:
        return None
    return counts.most_common(1)[0]


def queuebert_version() -> str:
    try:
        return metadata.version("queuebert")
    except metadata.PackageNotFoundError:
        return "unknown"


def info_body(served: tuple[ModelInfo, int] | None, *, max_client_batch_size: int, max_concurrent_requests: int,
              max_batch_tokens: int | None = None, version: str | None = None) -> dict[str, Any]:
    """TEI's ``Info`` for the served model; 503 ``Unhealthy`` while no worker has said what it serves.

    Filled from the workers: ``model_id`` and ``served_model_name`` (the model's name or path),
    ``model_dtype``, ``model_type`` (``classifier``, or ``reranker`` for one label, as TEI decides;
    ``id2label`` keyed by id strings, ``label2id``), ``max_input_length`` (the truncation length).
    From the gateway: ``max_client_batch_size``, ``max_concurrent_requests``, ``max_batch_tokens``
    when known, else the least it can be (one full-length input: TEI requires no less).
    As TEI marks what it does not know: ``model_sha``, ``max_batch_requests``, ``sha``,
    ``docker_label`` null. ``auto_truncate`` true (queuebert always truncates),
    ``tokenization_workers`` the workers serving it (each tokenizes its own batches), ``version``
    queuebert's. ``queuebert`` adds what TEI has no field for (device, scoring rule, workers)."""
    if served is None:
        raise TEIError.of(UNHEALTHY, "no worker has said what model it serves yet")
    model, workers = served
    classifier = {"id2label": {str(i): label for i, label in enumerate(model.labels)},
                  "label2id": {label: i for i, label in enumerate(model.labels)}}
    return {
        "model_id": model.model,
        "model_sha": None,
        "model_dtype": model.dtype,
        "served_model_name": model.model,
        "model_type": {"reranker" if model.reranker else "classifier": classifier},
        "max_concurrent_requests": max_concurrent_requests,
        "max_input_length": model.max_length,
        "max_batch_tokens": max_batch_tokens if max_batch_tokens is not None else model.max_length,
        "max_batch_requests": None,
        "max_client_batch_size": max_client_batch_size,
        "auto_truncate": True,
        "tokenization_workers": workers,
        "version": version if version is not None else queuebert_version(),
        "sha": None,
        "docker_label": None,
        "queuebert": {"device": model.device, "scoring": model.scoring, "workers": workers},
    }
