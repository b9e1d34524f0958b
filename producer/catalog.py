"""Which models a gateway serves, and the queue each one's requests go to (``queuebert serve``).

One gateway fronts many models, one queue per model. It learns them from two places:

- **the workers registered in Redis:** each RQ worker hash lists the worker's queues (RQ's own
  ``queues`` field) and what it serves (``queuebert.keys.WORKER_MODEL_FIELDS``). A queue's model is
  the one most of its live workers serve (:func:`producer.tei.served_model`), and it is reachable
  under its **model id as the workers registered it** (``qb_model``: the hub id or local path the
  worker loaded, e.g. ``cross-encoder/ms-marco-MiniLM-L-6-v2``), the name /info has always shown;
- **a static map**, ``QUEUEBERT_MODELS="name=queue,..."`` (``GatewaySettings.models``): names for
  queues whose workers may be scaled to zero, when no worker is left to say what the queue serves.
  A map name is also an alias: ``sentiment=sentiment-q`` lets clients say ``sentiment`` whatever
  model id the workers load. A bare ``name`` means ``name=name``.

Precedence, so a name always means one queue: a map name wins over a model id of the same
spelling; a model id served (as the majority) on several queues goes to the gateway's default
queue if it is one of them, else to the one with the most live workers (then the first by name).
A request that names no model goes to the default queue (``--queue``), as before: TEI clients,
which name none, keep working unchanged.

Names come from requests, so they are checked (:func:`check_model_name`) but never used to build a
Redis key: a name is only ever looked up here, and an unknown one is refused (:class:`ModelError`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tei import ModelInfo, served_model

#: Longest model name a request may send (hub ids are at most 96 characters; a local path can be
#: longer, and an alias is the operator's choice).
MAX_MODEL_NAME = 256

#: What Infinity's request models send when the caller names no model (``model: str =
#: "default/not-specified"`` in ``infinity_emb/fastapi_schemas/pymodels.py``): the default model.
INFINITY_UNSPECIFIED = "default/not-specified"

#: A queue name in the static map: what RQ queue names usually are, and nothing that would read
#: as another entry (``,``, ``=``), a Redis key separator or hash tag, or whitespace.
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

#: Characters a model name may not hold: control characters and whitespace other than a plain
#: space (model ids and paths have none; a name with a newline is an attack on someone's logs).
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


class ModelError(Exception):
    """A request's model name the gateway cannot route: malformed (``unknown`` False) or not
    served here (``unknown`` True). Each route family answers it in its own shape."""

    def __init__(self, message: str, *, unknown: bool) -> None:
        super().__init__(message)
        self.message = message
        self.unknown = unknown


def check_model_name(value: Any, field_name: str = "model") -> str:
    """``value`` as a model name, or :class:`ModelError`: a string of 1 to ``MAX_MODEL_NAME``
    characters without control characters."""
    if not isinstance(value, str):
        raise ModelError(f"{field_name} must be a string naming a model, got {type(value).__name__}", unknown=False)
    if not value or len(value) > MAX_MODEL_NAME or _BAD_NAME.search(value):
        raise ModelError(f"{field_name} {json.dumps(value[:80])} is not a model name: 1 to {MAX_MODEL_NAME} "
                         "characters, no control characters", unknown=False)
    return value


def parse_model_map(entries: Iterable[str]) -> dict[str, str]:
    """``QUEUEBERT_MODELS`` (already split on commas) as ``{name: queue}``: ``name=queue`` or a
    bare ``name`` (its own queue). ValueError names the bad entry, so a typo stops the gateway at
    start instead of sending a model's requests nowhere."""
    mapping: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        name, sep, queue = entry.partition("=")
        name, queue = name.strip(), (queue.strip() if sep else name.strip())
        try:
            check_model_name(name)
        except ModelError as exc:
            raise ValueError(f"QUEUEBERT_MODELS entry {entry!r}: {exc.message}") from None
        if QUEUE_NAME.fullmatch(queue) is None:
            raise ValueError(f"QUEUEBERT_MODELS entry {entry!r}: queue {queue!r} must be 1-128 letters, digits, "
                             "'_', '.' or '-', starting with a letter or digit")
        if mapping.get(name, queue) != queue:
            raise ValueError(f"QUEUEBERT_MODELS names {name!r} twice, for queues {mapping[name]!r} and {queue!r}")
        mapping[name] = queue
    return mapping


@dataclass(frozen=True)
class Target:
    """Where one request goes: the name it is answered under (the ``model`` of peer responses),
    its queue, and what that queue's live workers serve (None while none is live)."""

    name: str
    queue: str
    served: tuple[ModelInfo, int] | None

    @property
    def info(self) -> ModelInfo | None:
        return self.served[0] if self.served else None

    @property
    def workers(self) -> int:
        return self.served[1] if self.served else 0


@dataclass(frozen=True)
class Entry:
    """One servable name: its queue, whether the static map declares it, whether its queue is the
    gateway's default."""

    name: str
    queue: str
    declared: bool
    default: bool


@dataclass(frozen=True)
class Catalog:
    """What a gateway serves at one moment: every name and its queue, and each queue's model."""

    default_queue: str
    entries: Mapping[str, Entry]
    #: Each queue a name points at, the default queue and every queue a live worker serves: its
    #: model and live workers, or None while it has none.
    queues: Mapping[str, tuple[ModelInfo, int] | None] = field(default_factory=dict)

    def served(self, queue: str) -> tuple[ModelInfo, int] | None:
        return self.queues.get(queue)

    def default(self) -> Target:
        """The default queue's target, named after a name that points at it (a map name first,
        then its model id), else after the queue."""
        names = [e for e in self.entries.values() if e.queue == self.default_queue]
        names.sort(key=lambda e: (not e.declared, e.name))
        name = names[0].name if names else self.default_queue
        return Target(name, self.default_queue, self.served(self.default_queue))

    def resolve(self, name: str | None) -> Target:
        """The target of a request naming ``name`` (None, or Infinity's placeholder: the default
        model); :class:`ModelError` for a malformed or unknown name."""
        if name is None or name == INFINITY_UNSPECIFIED:
            return self.default()
        check_model_name(name)
        entry = self.entries.get(name)
        if entry is None and name == self.default().name:  # the default queue, listed under its queue's name
            return self.default()
        if entry is None:
            known = ", ".join(json.dumps(n) for n in sorted(self.entries)[:20]) or "none"
            raise ModelError(f"model {json.dumps(name[:80])} is not served here (served: {known}; GET /v1/models "
                             "lists them)", unknown=True)
        return Target(entry.name, entry.queue, self.served(entry.queue))

    def listing(self) -> list[tuple[Target, bool, bool]]:
        """Every servable name as ``(target, declared, default)``, by name; the default queue under
        the name :meth:`default` gives it when no name points at it (it is served all the same:
        requests that name no model go there)."""
        rows = [(Target(e.name, e.queue, self.served(e.queue)), e.declared, e.default)
                for e in sorted(self.entries.values(), key=lambda e: e.name)]
        if not any(default for _, _, default in rows):
            rows.append((self.default(), False, True))
        return rows

    def without_workers(self) -> list[str]:
        """Names whose queue has no live worker (requests to them queue until one starts)."""
        return sorted(n for n, e in self.entries.items() if self.served(e.queue) is None)

    def default_expected(self) -> bool:
        """Whether the default queue may be served by nobody on purpose: the static map names it
        (its workers scale to zero). Then no worker there does not make the gateway unhealthy."""
        return any(e.declared and e.queue == self.default_queue for e in self.entries.values())


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def build_catalog(workers: Sequence[Mapping[str, Any]], declared: Mapping[str, str], default_queue: str) -> Catalog:
    """The catalog from the workers' hashes (each a mapping with RQ's ``queues`` field and the
    model fields; bytes or str) and the static map."""
    by_queue: dict[str, list[Mapping[str, Any]]] = {}
    for worker in workers:
        for queue in (_text(worker.get("queues")) or "").split(","):
            if queue:
                by_queue.setdefault(queue, []).append(worker)
    queues: dict[str, tuple[ModelInfo, int] | None] = {q: served_model(ws) for q, ws in by_queue.items()}
    for queue in (default_queue, *declared.values()):
        queues.setdefault(queue, None)

    candidates: dict[str, list[str]] = {}
    for queue, served in queues.items():
        if served is not None:
            candidates.setdefault(served[0].model, []).append(queue)
    entries: dict[str, Entry] = {}
    for name, qs in candidates.items():
        if len(name) > MAX_MODEL_NAME:
            continue  # a request could never name it
        # A candidate's queues all have a served model (only those were added), so queues[q] is a tuple.
        best = default_queue if default_queue in qs else min(qs, key=lambda q: (-queues[q][1], q))  # type: ignore[index]
        entries[name] = Entry(name, best, declared=False, default=best == default_queue)
    for name, queue in declared.items():
        entries[name] = Entry(name, queue, declared=True, default=queue == default_queue)
    return Catalog(default_queue, entries, queues)
