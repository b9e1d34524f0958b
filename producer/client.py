"""The client: submit texts, stream large inputs with backpressure, poll or subscribe for results.

What it does in Redis is :mod:`producer.protocol`'s steps, shared with ``AsyncClient``; this module
carries their effects out on a redis-py connection (:class:`_SyncDriver`) and gives them a
blocking face.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Unpack

import redis
import structlog
from rq import Queue
from rq.results import Result

from queuebert.connection import connect, resolve_url
from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE, ItemResult, JobOptionFields, JobOptions, normalize_item
from queuebert.serializer import JSONSerializer
from queuebert.settings import ClientSettings

from . import effects, jobs, pairs, protocol
from .effects import Stepper, Steps
from .jobs import JOBS_PER_ROUND_TRIP, LostWrites, ResumeError, new_id
from .protocol import (
    HandleRecord,
    JobFailed,
    ProducerProtocol,
    RedisFull,
    RunRecord,
    SubscriptionRecord,
    fit_block_ms,
    job_value,
    pick_item,
)

log = structlog.get_logger(__name__)

__all__ = ["JOBS_PER_ROUND_TRIP", "Client", "Handle", "JobFailed", "LostWrites", "RedisFull", "ResumeError", "Run",
           "Subscription", "new_id"]

T = TypeVar("T")


@dataclass
class Handle(HandleRecord):
    """One submitted item: where its result will appear."""

    client: Client

    def result(self, timeout: float | None = 0) -> ItemResult | None:
        """The item's result; waits up to ``timeout`` seconds (None: forever, 0: just look).
        Raises :class:`JobFailed` if its job failed as a whole."""
        # Without item_id, job_results gives the job's list (its return type also covers one item's).
        return self.pick(self.client.job_results(self.job_id, timeout=timeout))  # type: ignore[arg-type]


@dataclass
class Run(RunRecord):
    """A set of items submitted together; results are read back in input order or as they come."""

    client: Client
    handles: list[Handle] = field(default_factory=list)

    def progress(self) -> dict[str, int]:
        return self.client.run_progress(self.id)

    def is_done(self) -> bool:
        return self.finished(self.progress())

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Block until every item has a result; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def results(
        self, timeout: float | None = None, consume: bool = False, before_delete: Callable[[], None] | None = None,
    ) -> Iterator[ItemResult]:
        """Every item's result, in input order, as soon as the results before it are in.

        ``consume=True`` deletes each job's results from Redis once they have been handed over,
        so a long stream keeps Redis memory bounded by what is in flight. A caller that buffers
        what it took (a file) passes ``before_delete`` to make it safe first (flush, fsync).
        """
        return self.client.ordered_results(self.id, timeout=timeout, consume=consume, before_delete=before_delete)

    def subscribe(self, from_start: bool = True) -> Subscription:
        return self.client.subscribe(self.id, from_start=from_start)


class Subscription(SubscriptionRecord):
    """Item results of a run as their jobs complete, read from the run's stream; ``last_id`` says
    where to resume (see :class:`~producer.protocol.SubscriptionRecord`)."""

    client: Client

    def entries(self) -> Iterator[tuple[str, str, list[ItemResult]]]:
        """``(stream_id, job_id, results)`` per completed job, each job once."""
        for entry in self.client._driver.outputs(self.read_steps()):
            self.last_id = entry.entry_id
            yield entry.entry_id, entry.job_id, entry.results

    def __iter__(self) -> Iterator[ItemResult]:
        for entry in self.client._driver.outputs(self.read_steps()):
            yield from self.handed_over(entry)


class _SyncDriver:
    """Carries out :mod:`producer.protocol`'s effects on a redis-py connection: the whole I/O of
    the synchronous client's enqueues and reads."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def run(self, steps: Steps[T]) -> T:
        """Drive ``steps`` to its end; its return value."""
        outputs = self.outputs(steps)
        try:
            out = next(outputs)
        except StopIteration as stop:
            return stop.value
        outputs.close()
        raise RuntimeError(f"a step that streams was run for its value: {out!r}")

    def outputs(self, steps: Steps[T]) -> Generator[Any, None, T]:
        """Drive ``steps``, yielding its outputs; returns its return value."""
        stepper = Stepper(steps)
        tx: list[Any] = []  # the transaction pipeline of a checked round, once there is one
        try:
            while (effect := stepper.next()) is not effects.DONE:
                if isinstance(effect, effects.OUTPUTS):
                    yield effect
                    continue
                try:
                    stepper.reply = self._perform(effect, tx)
                except BaseException as exc:  # noqa: BLE001 - thrown into the step, which decides
                    stepper.error = exc
            return stepper.value
        finally:
            steps.close()
            if tx:
                tx[0].reset()

    def _perform(self, effect: Any, tx: list[Any]) -> Any:
        if isinstance(effect, effects.Call):
            c = effect.command
            return getattr(self.connection, c.name)(*c.args, **c.kwargs)
        if isinstance(effect, effects.Send):
            with self.connection.pipeline(transaction=False) as pipe:
                for command in effect.commands:
                    if isinstance(command, effects.ScriptCall):
                        command.function(self.connection, pipe, *command.args)
                    else:
                        getattr(pipe, command.name)(*command.args, **command.kwargs)
                return pipe.execute()
        if isinstance(effect, effects.TRANSACTION):
            if not tx:
                tx.append(self.connection.pipeline(transaction=True))
            try:
                return self._transact(tx[0], effect)
            except BaseException:
                tx[0].reset()  # a watch that failed is over: the step starts the next one afresh
                raise
        if isinstance(effect, effects.Sleep):
            time.sleep(effect.seconds)
            return None
        if isinstance(effect, effects.Notify):
            return effect.callback(*effect.args)
        if isinstance(effect, effects.NextChunk):
            return list(itertools.islice(effect.source, effect.size))
        raise TypeError(f"not an effect: {effect!r}")

    @staticmethod
    def _transact(pipe: Any, effect: effects.Watch | effects.WatchedCall | effects.Exec | effects.Unwatch) -> Any:
        if isinstance(effect, effects.Watch):
            return pipe.watch(effect.key)
        if isinstance(effect, effects.WatchedCall):
            c = effect.command
            return getattr(pipe, c.name)(*c.args, **c.kwargs)
        if isinstance(effect, effects.Exec):
            pipe.multi()
            jobs.apply(effect.commands, pipe)
            return pipe.execute()
        return pipe.reset()


class Client:
    """Producer API. ``Client.from_url(url, queue="default")``."""

    def __init__(self, connection: redis.Redis, settings: ClientSettings | None = None):
        self.connection = connection
        self.settings = settings or ClientSettings.from_env()
        self._queues: dict[str, Queue] = {}
        self._driver = _SyncDriver(connection)
        self._protocol = ProducerProtocol(self.settings, log, functools.partial(Handle, self))

    @classmethod
    def from_url(cls, url: str | None = None, queue: str | None = None, **overrides: Any) -> Client:
        settings = ClientSettings.from_env(redis_url=resolve_url(url), queue=queue, **overrides)
        return cls(connect(settings.redis_url, replica_acks=settings.replica_acks,
                           replica_ack_timeout_ms=settings.replica_ack_timeout_ms), settings)

    def queue(self, name: str | None = None) -> Queue:
        name = name or self.settings.queue
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.connection, serializer=JSONSerializer)
        return q

    # -- submitting -------------------------------------------------------------------------

    def _enqueue_run(self, chunks: list[list[Any]], queue: str | None, options: JobOptions,
                     run_id: str | None = None) -> tuple[str, list[str]]:
        """Enqueue ``chunks`` as the jobs of a fresh, sealed run in one round trip (``submit``);
        streams use checked rounds instead (:meth:`enqueue_stream`), which can be resumed."""
        run_id = run_id or jobs.new_id()
        job_ids, commands = protocol.fresh_run_commands(self.settings, queue or self.settings.queue, chunks, run_id,
                                                        options)
        with self.connection.pipeline(transaction=False) as pipe:
            jobs.apply(commands, pipe)
            pipe.execute()
        return run_id, job_ids

    def seal(self, run_id: str, total: int | None = None) -> int:
        """Mark the run complete on the producer side: ``total`` is now final.

        The producer passes the count it enqueued itself: a pipeline retried across a Redis
        restart may have bumped the ``enqueued`` counter twice, but the producer's own tally is exact.
        """
        return self._driver.run(self._protocol.seal(run_id, total))

    def submit(
        self, text_or_item: str | dict[str, Any], *, text_pair: str | None = None, queue: str | None = None,
        **options: Unpack[JobOptionFields],
    ) -> Handle:
        """One text (or ``{"id", "text", "text_pair"?, "meta"?}``) as one job of a sealed run of its
        own, in one round trip; the handle polls its result. ``text_pair`` makes it a pair, as the
        pipeline's ``{"text", "text_pair"}``. ``options``: the job's
        :class:`~queuebert.schema.JobOptions` (``top_k``, ``function_to_apply``), checked here."""
        item = normalize_item(text_or_item, jobs.new_id())
        if text_pair is not None:
            item["text_pair"] = text_pair
        run_id, (job_id,) = self._enqueue_run([[item]], queue, JobOptions(**options))
        return Handle(self, job_id, item["id"], run_id, 0)

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Passages ranked by a cross-encoder's score for ``(query, passage)``, best first:
        ``[{"index", "score", "text"?}]`` as text-embeddings-inference's ``/rerank`` returns.
        ``label`` names the relevance label of a model with several (else it must have one)."""
        (answer,) = self.rerank_many([{"query": query, "passages": list(passages)}], top_n=top_n,
                                     return_text=return_text, label=label, timeout=timeout)
        return answer["results"]

    def rerank_many(
        self, queries: Iterable[dict[str, Any]], *, top_n: int | None = None, return_text: bool = False,
        label: str | None = None, timeout: float | None = None, run_id: str | None = None,
        chunk_size: int | None = None, max_pending: int | None = None,
        on_enqueued: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """``{"id", "results": [{"index", "score", "text"?}], "meta"?}`` per ``{"id"?, "query",
        "passages"}``, in input order. All pairs go out as one run (``enqueue_stream``, with its
        backpressure) while answers come back, and each query's results leave Redis once read."""
        return pairs.rerank_stream(self, queries, run_id=run_id or jobs.new_id(), top_n=top_n,
                                   return_text=return_text, label=label, chunk_size=chunk_size,
                                   max_pending=max_pending, timeout=timeout, on_enqueued=on_enqueued)

    def zero_shot(
        self, texts: str | Iterable[str | dict[str, Any]], candidate_labels: Sequence[str] | str, *,
        hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE, multi_label: bool = False,
        timeout: float | None = None, run_id: str | None = None, chunk_size: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``pipeline("zero-shot-classification")`` through the queue: ``{"id", "labels",
        "scores"}`` per text, labels best first (one dict for one text, as the pipeline). The
        pairs of all texts are batched together by the workers."""
        single = isinstance(texts, str)
        values: Iterable[str | dict[str, Any]] = [texts] if isinstance(texts, str) else texts
        items = (pairs.zero_shot_item(t, candidate_labels, hypothesis_template, multi_label) for t in values)
        results = list(pairs.stream_through(self, items, run_id=run_id or jobs.new_id(), chunk_size=chunk_size,
                                            max_pending=0, timeout=timeout))
        # Zero-shot answers are plain dicts; stream_through is typed with ItemResult, a TypedDict,
        # which mypy does not take for dict[str, Any].
        return results[0] if single else results  # type: ignore[return-value]

    def submit_many(
        self,
        items: Iterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        queue: str | None = None,
        run_id: str | None = None,
        **options: Unpack[JobOptionFields],
    ) -> list[Handle]:
        """Items in jobs of ``chunk_size`` (1: one job per item); one handle per item, all in one run."""
        run = self.enqueue_stream(
            items, chunk_size=chunk_size, queue=queue, run_id=run_id, max_pending=0, keep_handles=True, **options
        )
        return run.handles

    def enqueue_stream(
        self,
        iterable: Iterable[str | dict[str, Any]],
        *,
        chunk_size: int | None = None,
        max_pending: int | None = None,
        run_id: str | None = None,
        queue: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        keep_handles: bool = False,
        **options: Unpack[JobOptionFields],
    ) -> Run:
        """Enqueue an arbitrarily large iterable lazily, in pipelined round trips, as one run.

        Backpressure: while more than ``max_pending`` of this run's items are queued and not yet
        done, wait; a 10-million-line file thus never floods Redis. ``max_pending=0`` disables it.
        A Redis that refuses writes (OOM at ``maxmemory``) is waited out too, with backoff, for up to
        ``settings.redis_full_timeout`` seconds; then :class:`RedisFull` is raised.

        Each round of jobs is a transaction checked against the run's cursor, so a round whose
        reply was lost is never applied twice. Resuming: called again with the ``run_id`` of an
        interrupted call and the same input, it re-reads the input, rebuilds the same chunks (with
        the chunk size and queue stored in the run), skips the jobs already listed without sending
        them, enqueues the rest and seals the run. Item ids default to the input position, so they
        are the same on every read. A sealed run is not enqueued again: the input is only counted,
        and :class:`ResumeError` is raised if its count differs from the run's.

        Counting: the returned ``Run.enqueued`` / ``Run.jobs`` are the whole run's, items found
        already enqueued included; ``Run.skipped`` says how many of them an earlier call enqueued.
        ``on_progress`` is called once with that skipped count, when skipping ends, then with each
        round's item count, so a progress bar shows the whole run.

        ``options``: every job's :class:`~queuebert.schema.JobOptions` (``top_k``,
        ``function_to_apply``), checked before anything is written.
        """
        job_options = JobOptions(**options)
        run = Run(self, run_id or jobs.new_id())
        self._driver.run(self._protocol.enqueue_stream(
            run, iter(iterable), chunk_size=chunk_size, max_pending=max_pending, queue=queue,
            options=job_options, on_progress=on_progress, keep_handles=keep_handles))
        return run

    # -- reading results --------------------------------------------------------------------

    def run_progress(self, run_id: str) -> dict[str, int]:
        return self._driver.run(self._protocol.run_progress(run_id))

    def job_results(
        self, job_id: str, timeout: float | None = 0, item_id: str | None = None
    ) -> list[ItemResult] | ItemResult | None:
        """A job's item results (or item ``item_id``'s: the first with that id) from RQ's result
        stream; None if not there within ``timeout`` (0: just look; None: wait for ever);
        :class:`JobFailed` if the job failed as a whole."""
        if timeout == 0:
            value = self._driver.run(self._protocol.latest_result(job_id))
        else:
            block = 0 if timeout is None else max(1, int(timeout * 1000))
            response: Any = self.connection.xread({Result.get_key(job_id): "0-0"}, block=block)
            entries = response[0][1][-1:] if response else []
            value = job_value(job_id, entries[-1][1]) if entries else None
        return value if value is None or item_id is None else pick_item(value, item_id)

    def subscribe(
        self, run_id: str, from_start: bool = True, last_id: str | None = None, timeout: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> Subscription:
        """Item results as jobs complete; resumable from ``last_id``. ``from_start=False`` starts
        after the entries already in the stream now."""
        start = last_id or ("0-0" if from_start else self._driver.run(self._protocol.stream_tail(run_id)))
        return Subscription(self, run_id, last_id=start, timeout=timeout, on_idle=on_idle)

    def ordered_results(
        self, run_id: str, timeout: float | None = None, on_idle: Callable[[], None] | None = None,
        consume: bool = False, before_delete: Callable[[], None] | None = None,
    ) -> Iterator[ItemResult]:
        """The run's item results in input order, each yielded as soon as all before it are in
        (see :meth:`producer.protocol.ProducerProtocol.ordered_results`: ``consume`` deletes each
        job's results once taken, after ``before_delete``; ``timeout`` bounds the whole read)."""
        steps = self._protocol.ordered_results(run_id, block_ms=fit_block_ms(self.connection, 1000), timeout=timeout,
                                               consume=consume, on_idle=on_idle, before_delete=before_delete)
        for out in self._driver.outputs(steps):
            yield from out.results
