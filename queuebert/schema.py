"""What a job carries and what a result looks like: the contract between producer and worker.

Job (RQ kwargs of ``worker.tasks.classify``)::

    {"items": [item, ...], "run"?: str, "deadline"?: float, "top_k"?: int, "function_to_apply"?: str}

``deadline`` is a Unix time: a job not started by then is dropped, never run late. The others
are :class:`JobOptions`, each an RQ kwarg of its own name: ``top_k`` keeps the best labels only,
``function_to_apply`` is the text-classification pipeline's: ``default`` (the model's rule),
``softmax``, ``sigmoid`` or ``none`` (raw logits, TEI's ``raw_scores``); zero-shot items ignore both.

An item is one of three kinds, told apart by its fields:

- a text: ``{"id": str, "text": str, "meta"?: any}``;
- a pair (cross-encoders, NLI): the same with ``"text_pair": str``, tokenized as the
  text-classification pipeline tokenizes ``{"text", "text_pair"}``;
- a zero-shot text: ``{"id", "text", "candidate_labels": [str, ...], "hypothesis_template"?: str,
  "multi_label"?: bool, "meta"?}``, run as one (text, hypothesis) pair per label, as
  ``pipeline("zero-shot-classification")`` runs it.

Item result (text or pair)::

    {"id": str, "label": str, "score": float, "scores": {label: probability, ...}, "meta"?: any}

Zero-shot item result (labels best first, as the pipeline orders them)::

    {"id": str, "labels": [str, ...], "scores": [float, ...], "meta"?: any}

Item error (the other items of its job and batch are unaffected)::

    {"id": str, "error": {"type": str, "message": str}, "meta"?: any}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NotRequired, TypedDict, cast


class Item(TypedDict):
    id: str
    text: str
    text_pair: NotRequired[str]
    candidate_labels: NotRequired[list[str]]
    hypothesis_template: NotRequired[str]
    multi_label: NotRequired[bool]
    meta: NotRequired[Any]
    # Set by the worker, never sent: a pair's truncation rule (worker.job_rows).
    truncation: NotRequired[str]


class ItemError(TypedDict):
    type: str
    message: str


class ItemResult(TypedDict, total=False):
    id: str
    label: str
    score: float
    scores: dict[str, float] | list[float]  # a list, best first, for a zero-shot item
    labels: list[str]  # zero-shot items only
    error: ItemError
    meta: Any
    logits: list[float]  # a raw-logits job's rows (worker.job_rows), before they are turned into results


#: The zero-shot pipeline's default hypothesis.
DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."
#: Fields that make an item a zero-shot item (any of them; ``candidate_labels`` is required).
ZERO_SHOT_FIELDS: tuple[Literal["candidate_labels", "hypothesis_template", "multi_label"], ...] = (
    "candidate_labels", "hypothesis_template", "multi_label")
#: What the producer carries from a mapping into an item besides ``id`` and ``text``.
_CARRIED_FIELDS: tuple[Literal["text_pair", "candidate_labels", "hypothesis_template", "multi_label", "meta"], ...] = (
    "text_pair", *ZERO_SHOT_FIELDS, "meta")

# Error types a client can branch on.
INVALID_ITEM = "invalid_item"
INVALID_TEXT = "invalid_text"
TEXT_TOO_LONG = "text_too_long"
INFERENCE_ERROR = "inference_error"
INVALID_JOB = "invalid_job"
DEADLINE_EXCEEDED = "deadline_exceeded"


class JobError(ValueError):
    """The job as a whole cannot be run (not our schema, too many items): it fails in RQ, and each
    of its items gets an error result of type :attr:`kind`."""

    kind = INVALID_JOB


class DeadlineExceeded(JobError):
    """The job was not started before its deadline: it is dropped rather than run late."""

    kind = DEADLINE_EXCEEDED


def error_result(item_id: Any, kind: str, message: str, meta: Any = None) -> ItemResult:
    result: ItemResult = {"id": item_id if isinstance(item_id, str) else str(item_id)}
    result["error"] = {"type": kind, "message": message}
    if meta is not None:
        result["meta"] = meta
    return result


def is_error(result: ItemResult) -> bool:
    return "error" in result


#: The text-classification pipeline's ``function_to_apply`` values.
FUNCTIONS = ("default", "softmax", "sigmoid", "none")


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What a job asks of its items' scoring besides the items: the pipeline's ``top_k`` (None:
    every label) and ``function_to_apply`` (None: the model's own rule; ``"default"`` reads as None).

    The one place a job option is named, checked and written. A new option is a field here with
    its check in :meth:`__post_init__` (a :class:`JobError` whose message starts with the field's
    name, which the gateway prefixes with its parameter's path), a key in
    :class:`JobOptionFields`, its use in the engine (``worker.engine.Engine.run_batch``), and the
    surface that exposes it (a CLI flag, a gateway parameter). The clients take the fields as
    keyword arguments, the producer writes them as RQ kwargs (:meth:`to_kwargs`), the worker reads
    them back (:meth:`from_kwargs`) and hands them to the engine with each row, untouched by the
    code in between. Checked at construction, so a client refuses a bad option before it writes
    anything; hashable, so coalesced submits share a job only with equal options."""

    top_k: int | None = None
    function_to_apply: str | None = None

    def __post_init__(self) -> None:
        top_k = self.top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise JobError(f"top_k must be a positive integer, got {top_k!r}")
        function = self.function_to_apply
        if function is not None and function not in FUNCTIONS:
            raise JobError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
        if function == "default":  # the same job as no option at all, so it coalesces with one
            object.__setattr__(self, "function_to_apply", None)

    def to_kwargs(self) -> dict[str, Any]:
        """The options a job's kwargs carry: those that differ from their defaults (a job without
        options reads the same to a worker that knows none of them)."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) != f.default}

    def as_fields(self) -> JobOptionFields:
        """These options as the clients' keyword arguments (``client.submit(item, **o.as_fields())``)."""
        return cast("JobOptionFields", {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> JobOptions:
        """The options among a job's kwargs (others are ignored: :func:`parse_job` refuses unknown ones)."""
        return cls(**{name: kwargs[name] for name in OPTION_NAMES if name in kwargs})


class JobOptionFields(TypedDict, total=False):
    """:class:`JobOptions`' fields as keyword arguments (``Client.submit(text, top_k=3)``): what the
    clients' ``**options`` take, so a new option reaches them without a change there."""

    top_k: int | None
    function_to_apply: str | None


#: The kwargs names of the options, in field order.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(JobOptions))
#: A job's kwargs besides its options.
JOB_FIELDS = ("items", "run", "deadline")


@dataclass(frozen=True)
class JobRequest:
    """A decoded, checked job: the raw items (each still to be validated alone) and options."""

    items: list[Any]
    run: str | None
    deadline: float | None = None
    options: JobOptions = field(default_factory=JobOptions)


def job_kwargs(items: list[Item], run: str | None, deadline: float | None = None,
               options: JobOptions | None = None) -> dict[str, Any]:
    """A job's RQ kwargs, as :func:`parse_job` reads them."""
    kwargs: dict[str, Any] = {"items": items}
    if run is not None:
        kwargs["run"] = run
    if deadline is not None:
        kwargs["deadline"] = deadline
    if options is not None:
        kwargs.update(options.to_kwargs())
    return kwargs


def parse_job(args: Any, kwargs: Any, max_items: int) -> JobRequest:
    """Check a job's shape. Items are checked one by one later, so one bad item fails only itself."""
    if args:
        raise JobError(f"classify takes keyword arguments only, got {len(args)} positional")
    if not isinstance(kwargs, dict):
        raise JobError(f"job kwargs must be an object, got {type(kwargs).__name__}")
    unknown = set(kwargs).difference(JOB_FIELDS, OPTION_NAMES)
    if unknown:
        raise JobError(f"unknown job fields: {sorted(unknown)}")
    items = kwargs.get("items")
    if not isinstance(items, list):
        raise JobError(f"job 'items' must be a list, got {type(items).__name__}")
    if not items:
        raise JobError("job has no items")
    if len(items) > max_items:
        raise JobError(f"job has {len(items)} items, more than the limit of {max_items}")
    run = kwargs.get("run")
    if run is not None and not isinstance(run, str):
        raise JobError("job 'run' must be a string")
    deadline = kwargs.get("deadline")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
        raise JobError(f"deadline must be a Unix time, got {deadline!r}")
    return JobRequest(items=items, run=run, deadline=deadline, options=JobOptions.from_kwargs(kwargs))


def _text_error(value: Any, field: str, max_chars: int) -> tuple[str, str] | None:
    """Why ``value`` cannot be the item's ``field``: ``(error type, message)``, or None if it can."""
    if not isinstance(value, str):
        kind = "missing" if value is None else type(value).__name__
        return INVALID_TEXT, f"item {field!r} must be a string, got {kind}"
    if len(value) > max_chars:
        return TEXT_TOO_LONG, f"{field} has {len(value)} characters, more than the limit of {max_chars}"
    if not value.isascii():  # only non-ASCII text can hold a lone surrogate; isascii() copies nothing
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return INVALID_TEXT, f"{field} is not valid Unicode: {exc.reason} at {exc.start}"
    return None


def _zero_shot_error(raw: dict[str, Any], max_chars: int) -> str | None:
    """Why a zero-shot item's options are unusable, in the pipeline's terms; None if they are fine."""
    if "text_pair" in raw:
        return "an item has either 'text_pair' or 'candidate_labels', not both"
    labels = raw.get("candidate_labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        return "'candidate_labels' must be a non-empty list of non-empty strings"
    template = raw.get("hypothesis_template", DEFAULT_HYPOTHESIS_TEMPLATE)
    if not isinstance(template, str) or len(template) > max_chars:
        return "'hypothesis_template' must be a string"
    try:
        if template.format(labels[0]) == template:
            return f"hypothesis_template {template!r} has no '{{}}' to put the label in"
    except (IndexError, KeyError, ValueError) as exc:
        return f"hypothesis_template {template!r} is not a format string with one '{{}}': {exc}"
    if not isinstance(raw.get("multi_label", False), bool):
        return "'multi_label' must be true or false"
    return None


def check_item(raw: Any, max_chars: int) -> tuple[Item | None, ItemResult | None]:
    """Return ``(item, None)`` for a valid item, else ``(None, error_result)``."""
    if not isinstance(raw, dict):
        return None, error_result("", INVALID_ITEM, f"item must be an object, got {type(raw).__name__}")
    item_id = raw.get("id")
    meta = raw.get("meta")
    if not isinstance(item_id, str):
        return None, error_result(item_id if item_id is not None else "", INVALID_ITEM, "item 'id' must be a string",
                                  meta)
    text = raw.get("text")
    error = _text_error(text, "text", max_chars)
    if error is not None:
        return None, error_result(item_id, *error, meta)
    item: Item = {"id": item_id, "text": cast(str, text)}  # _text_error found a string
    if "text_pair" in raw:
        error = _text_error(raw["text_pair"], "text_pair", max_chars)
        if error is not None:
            return None, error_result(item_id, *error, meta)
        item["text_pair"] = raw["text_pair"]
    if not raw.keys().isdisjoint(ZERO_SHOT_FIELDS):
        message = _zero_shot_error(raw, max_chars)
        if message is not None:
            return None, error_result(item_id, INVALID_ITEM, message, meta)
        if not text:  # the zero-shot pipeline refuses an empty sequence
            return None, error_result(item_id, INVALID_TEXT, "zero-shot classification needs a non-empty text", meta)
        for f in ZERO_SHOT_FIELDS:
            if f in raw:
                item[f] = raw[f]
    if "meta" in raw:
        item["meta"] = meta
    return item, None


def normalize_item(value: Any, default_id: str) -> Item:
    """Producer side: accept a bare string or a mapping; give items without an id one. The fields
    of a pair or zero-shot item are carried as given: the worker checks them, item by item."""
    if isinstance(value, str):
        return {"id": default_id, "text": value}
    if isinstance(value, dict):
        item: Item = {"id": str(value["id"]) if value.get("id") is not None else default_id,
                      "text": cast(str, value.get("text"))}  # as given: the worker checks it (check_item)
        for f in _CARRIED_FIELDS:
            if f in value:
                item[f] = value[f]
        return item
    raise TypeError(f"an item is a str or a mapping with 'text', got {type(value).__name__}")
