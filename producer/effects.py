"""The vocabulary between :mod:`producer.protocol`'s steps and the clients that drive them.

A step is a generator. It yields an *effect* (:class:`Call` a command, :class:`Send` a pipeline,
:class:`Sleep`, the WATCH/MULTI of a checked round, :class:`NextChunk` of the input,
:class:`Notify` a caller's callback) and is sent the effect's reply, or has the effect's error
thrown into it (:class:`Stepper`), so its ``try``/``except`` read as the code of one client would.
A step that streams yields *outputs* too (:class:`Entry`, :class:`Results`), which its driver
hands to the caller. Each effect is exactly one Redis call or pipeline (or a sleep, a read of the
input, a callback): driving a step costs no round trip of its own.

Nothing here does I/O; ``producer.client._SyncDriver`` (redis-py) and
``producer.async_client._AsyncDriver`` (redis.asyncio) carry the effects out.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from queuebert.schema import ItemResult

from .jobs import Command

T = TypeVar("T")


# -- effects: what a step asks its driver to do ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Call:
    """One command on the client's connection; the reply is its reply."""

    command: Command


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A Lua script of :mod:`queuebert.results` queued on a :class:`Send`'s pipeline:
    ``function(connection, pipeline, *args)`` (awaited when it returns an awaitable)."""

    function: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Send:
    """Commands (and scripts) in one plain pipeline, one round trip; the reply is their replies."""

    commands: Sequence[Command | ScriptCall]


@dataclass(frozen=True, slots=True)
class Watch:
    """WATCH ``key`` on the driver's transaction pipeline, which then runs :class:`WatchedCall`
    commands at once on its connection until :class:`Exec` or :class:`Unwatch`. On any error of
    these three the driver resets the pipeline before it throws the error into the step."""

    key: str


@dataclass(frozen=True, slots=True)
class WatchedCall:
    """One command on the watching connection; the reply is its reply."""

    command: Command


@dataclass(frozen=True, slots=True)
class Exec:
    """MULTI, ``commands``, EXEC on the watching connection; the reply is their replies
    (WatchError when the watched key moved)."""

    commands: Sequence[Command]


@dataclass(frozen=True, slots=True)
class Unwatch:
    """End a watch that was not followed by :class:`Exec`."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Notify:
    """Call a caller's callback (awaited by the async driver when it returns an awaitable)."""

    callback: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class NextChunk:
    """The next ``size`` values of the input ``source`` (an iterator, or an async iterator for
    ``AsyncClient``); fewer once it ends."""

    source: Any
    size: int


Effect = Call | Send | Watch | WatchedCall | Exec | Unwatch | Sleep | Notify | NextChunk


# -- outputs: what a streaming step hands the caller ----------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """A run-stream entry: one completed job's item results."""

    entry_id: str
    job_id: str
    results: list[ItemResult]


@dataclass(frozen=True, slots=True)
class Results:
    """The item results of the next job of an ordered read."""

    results: list[ItemResult]


Steps = Generator[Any, Any, T]


def notify(callback: Callable[..., Any] | None, *args: Any) -> Steps[None]:
    if callback is not None:
        yield Notify(callback, args)


class _Done:
    def __repr__(self) -> str:
        return "DONE"


#: What :meth:`Stepper.next` gives once the step has ended.
DONE: Any = _Done()
#: What a streaming step hands its caller, as opposed to an effect.
OUTPUTS = (Entry, Results)
#: The effects of a checked round, carried out on one transaction pipeline.
TRANSACTION = (Watch, WatchedCall, Exec, Unwatch)


class Stepper:
    """A step as its driver advances it: ``effect = stepper.next()`` until :data:`DONE` (then the
    step's ``value``); the driver sets ``reply``, or ``error``, from carrying out each effect, and
    an error is thrown into the step, which handles it as the client's own code would."""

    def __init__(self, steps: Steps[Any]):
        self.steps = steps
        self.reply: Any = None
        self.error: BaseException | None = None
        self.value: Any = None

    def next(self) -> Any:
        reply, error = self.reply, self.error
        self.reply = self.error = None
        try:
            return self.steps.throw(error) if error is not None else self.steps.send(reply)
        except StopIteration as stop:
            self.value = stop.value
            return DONE


def next_output(inner: Stepper) -> Steps[Any]:
    """Advance ``inner`` (a streaming step, inside this one) to its next output, passing its
    effects on and their replies or errors back: the output, or None once it has ended."""
    while (out := inner.next()) is not DONE:
        if isinstance(out, OUTPUTS):
            return out
        try:
            inner.reply = yield out
        except GeneratorExit:
            inner.steps.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to inner, which decides
            inner.error = exc
    return None
