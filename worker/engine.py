"""Items in, item results out: tokenize once, sort by length, cut by token budget, forward, score.

This is the compute path shared by the batching worker (many jobs pooled) and the plain RQ job
function (one job). Redis never appears here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import structlog
import torch

from queuebert.schema import INFERENCE_ERROR, INVALID_TEXT, Item, ItemResult, JobOptions, error_result

from .budget import fits
from .job_rows import Raw, RowOptions
from .model import LoadedModel, apply_scoring

log = structlog.get_logger(__name__)


class Row(list[int]):
    """A tokenized row that carries its segment ids (a pair, for models that take them; a single
    text only where the tokenizer gives it non-zero ones): its token ids, with the tokenizer's
    ``token_type_ids`` alongside. Plain rows are plain lists; the batching code moves both alike,
    and only :meth:`Engine._collate` looks at ``types``."""

    __slots__ = ("types",)

    def __init__(self, ids: list[int], types: list[int]):
        super().__init__(ids)
        self.types = types


#: How a pair is truncated to the model's length when it has no ``truncation`` of its own: the
#: tokenizer's default for ``truncation=True``, which the text-classification pipeline uses.
PAIR_TRUNCATION = "longest_first"


@dataclass
class Encoded:
    """A pool of tokenized items, ready to be cut into batches."""

    items: list[Item]
    options: list[RowOptions]
    ids: list[list[int]]  # a :class:`Row` where the segment ids matter
    #: Index into ``items`` of each valid row, sorted by token length.
    order: list[int] = field(default_factory=list)


@dataclass
class BatchStats:
    texts: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0
    #: Per forward batch: (rows, padded tokens, seconds), for the metrics histograms.
    per_batch: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


def plan_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[tuple[int, int]]:
    """Cut rows (already sorted by length, ascending) into ``[start, end)`` runs such that each
    batch has at most ``max_batch_size`` rows and ``rows x longest`` padded tokens at most
    ``max_batch_tokens`` (a single row longer than the budget still gets a batch of its own)."""
    spans: list[tuple[int, int]] = []
    start = 0
    n = len(lengths)
    while start < n:
        end = start + 1
        while end < n and fits(end - start + 1, lengths[end], max_batch_size, max_batch_tokens):
            end += 1
        spans.append((start, end))
        start = end
    return spans


def default_batch_size(device: torch.device) -> int:
    """Rows per forward, where the token budget does not bound a batch first. On a GPU only very
    short texts reach it: each eager forward costs the host milliseconds of kernel launches under
    the GIL whatever its size (MiniLM-L6: ~830 ATen calls, 4.8 ms of CPU for a one-row forward on
    a CPU here), so 64-row forwards of short texts would spend the worker's CPU launching kernels.
    On a simulated GPU (benchmarks/README.md) 512 rows gave 1.16-1.33x the texts/s of 64 at 3 ms of
    host CPU per forward, and 0.94-0.96x at none (runs of 512 sorted neighbours pad more); the
    16,384-token budget, and so device memory, is the same. A CPU's batches stay small to stay in
    cache."""
    return 512 if device.type == "cuda" else 64


def default_batch_tokens(device: torch.device) -> int:
    """CPUs run best on batches that stay in cache (measured here with MiniLM on 1,000 mixed
    texts: 4,096 padded tokens gave 82 texts/s in fp32 and 146 in bf16, against 72 and 135 at
    8,192); GPUs want large batches to fill their cores."""
    return 16384 if device.type == "cuda" else 4096


@dataclass
class Launched:
    """A batch whose forward :meth:`Engine.launch` started: :meth:`Engine.finish` waits for its
    logits and scores them."""

    items: list[Item]
    options: list[RowOptions]
    rows: list[list[int]]
    began: float
    #: What :meth:`Engine._start_forward` returned (None: not started, or it failed: ``finish``
    #: then runs the forward itself, with the out-of-memory split and row isolation).
    pending: Any = None


class OutOfMemory(RuntimeError):
    """A forward pass ran out of device memory (or a test injected that)."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (OutOfMemory, MemoryError)):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Engine:
    """The model plus the batching rules; call :meth:`encode` then :meth:`run`."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int | None = None, max_batch_tokens: int | None = None):
        self.m = loaded
        self.max_batch_size = max_batch_size or default_batch_size(loaded.device)
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(loaded.device)
        #: The model's own pad id, not the tokenizer's: decoders find each row's end by it.
        self.pad_id = loaded.pad_id
        if not loaded.pad_batches:
            self.max_batch_size = 1  # nothing tells such a model where a padded row ends
        self.pin = loaded.device.type == "cuda"
        #: Whether :meth:`launch` returns before the forward is done (CUDA: the kernels and the
        #: copy of the logits are queued on the stream), so the host can cut, collate and launch
        #: the next batch while the device runs this one. Elsewhere the forward runs in
        #: :meth:`finish` and compute keeps one batch at a time.
        self.asynchronous = loaded.device.type == "cuda"
        #: Test hook: called with (rows, padded_tokens) before each forward; raising OutOfMemory
        #: there exercises the split-and-retry path on a CPU.
        self.fault: Callable[[int, int], None] | None = None
        self.forward_calls = 0
        #: Batches split after running out of memory (a metric, and proof in the GPU tests).
        self.oom_splits = 0
        tok = loaded.tokenizer
        #: Segment ids go to models that take them, as the pipeline passes what the tokenizer gives.
        self.send_types = loaded.accepts_token_type_ids and "token_type_ids" in getattr(tok, "model_input_names", ())
        #: Whether a single text can have non-zero segment ids (XLNet's tokenizer gives its final
        #: <cls> segment 2); if not, single-text rows stay plain lists.
        try:
            self.single_types = self.send_types and any(tok("hello world").get("token_type_ids") or [])
        except Exception:  # a tokenizer that fails on plain text fails each item alone later
            self.single_types = False
        self._backend = self._fast_backend()
        self._pair_backend = self._fast_pair_backend() if self._backend is not None else None

    # -- tokenize ---------------------------------------------------------------------------

    def _fast_backend(self) -> Any:
        """The Rust tokenizer behind a fast HF tokenizer, used directly when it gives exactly the
        ids the HF call gives: the HF wrapper's per-text conversion to Python dicts costs more
        than tokenizing short texts. Checked on probe texts; any difference falls back."""
        backend = getattr(self.m.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        probes = ["", " ", "Hello, World!", "naïve café 😀 東京", "word " * (self.m.max_length * 2), "a\tb\nc"]
        try:
            expected = self.m.tokenizer(probes, truncation=True, max_length=self.m.max_length)
            self._backend = backend
            got = self._encode_fast(probes, types=self.single_types)
        except Exception:
            return None
        same = [list(r) for r in got] == expected["input_ids"]
        if same and self.single_types:
            same = [cast(Row, r).types for r in got] == expected.get("token_type_ids")  # types=True: Rows
        if not same:
            log.info("tokenizer fast path differs from the HF call; using the HF call")
            return None
        return backend

    def _encode_fast(self, texts: list[Any], strategy: str = PAIR_TRUNCATION, types: bool = False) -> list[list[int]]:
        """Token ids of texts, or of ``(text, text_pair)`` tuples; with ``types``, rows carry
        their segment ids (:class:`Row`)."""
        backend = self._backend
        # The HF call resets these on every use; set them each time so both paths can coexist.
        backend.no_padding()
        backend.enable_truncation(max_length=self.m.max_length, strategy=strategy)
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets we never use: 1.5x on short texts.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        if types:
            return [Row(e.ids, e.type_ids) for e in encode(texts, add_special_tokens=True)]
        return [e.ids for e in encode(texts, add_special_tokens=True)]

    def _fast_pair_backend(self) -> Any:
        """The fast path for pairs too, if it gives the HF call's ids and segment ids under both
        truncation rules the pipelines use."""
        tok = self.m.tokenizer
        long = "word " * self.m.max_length
        pairs = [("a question?", "an answer."), ("", "x"), (long, "short"), ("short", long), (long, long),
                 ("naïve café 😀", "東京 a\tb")]
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        try:
            for strategy in (PAIR_TRUNCATION, "only_first"):
                keep = [i for i, (a, b) in enumerate(pairs) if strategy != "only_first" or b is not long]
                want = tok([firsts[i] for i in keep], [seconds[i] for i in keep], truncation=strategy,
                           max_length=self.m.max_length)
                got = cast("list[Row]", self._encode_fast([pairs[i] for i in keep], strategy, types=True))
                if [list(r) for r in got] != want["input_ids"]:
                    raise ValueError("ids differ")
                if "token_type_ids" in want and [r.types for r in got] != want["token_type_ids"]:
                    raise ValueError("segment ids differ")
        except Exception as exc:
            log.info("tokenizer fast path differs from the HF call for pairs; pairs use the HF call", reason=str(exc))
            return None
        return self._backend

    def _encode_hf(self, texts: list[str], pairs: list[str] | None, strategy: str, types: bool) -> list[list[int]]:
        """The HF call, for tokenizers without a usable fast path (one call for many texts)."""
        kwargs: dict[str, Any] = {"truncation": strategy if pairs is not None else True,
                                  "max_length": self.m.max_length}
        out = self.m.tokenizer(texts, pairs, **kwargs) if pairs is not None else self.m.tokenizer(texts, **kwargs)
        if types and "token_type_ids" in out:
            return [Row(i, t) for i, t in zip(out["input_ids"], out["token_type_ids"])]
        return out["input_ids"]

    def _encode_group(self, items: list[Item], strategy: str | None) -> list[list[int]]:
        """Rows for items of one kind: single texts (``strategy`` None) or pairs truncated by ``strategy``."""
        if strategy is None:
            texts = [it["text"] for it in items]
            if self._backend is not None:
                return self._encode_fast(texts, types=self.single_types)
            return self._encode_hf(texts, None, "", self.single_types)
        if self._pair_backend is not None:
            return self._encode_fast([(it["text"], it["text_pair"]) for it in items], strategy, types=self.send_types)
        return self._encode_hf([it["text"] for it in items], [it["text_pair"] for it in items], strategy,
                               self.send_types)

    def encode(self, items: list[Item], options: list[RowOptions]) -> tuple[Encoded, list[tuple[int, ItemResult]]]:
        """Tokenize the items, one call per kind (texts; pairs by truncation rule); an item the
        tokenizer rejects, or that comes out with no tokens at all, becomes an error alone."""
        errors: list[tuple[int, ItemResult]] = []
        kinds: dict[str | None, list[int]] = {}
        if any("text_pair" in it for it in items):
            for i, it in enumerate(items):
                # An empty text_pair is no pair, as the pipeline's tokenizer call treats it.
                kind = it.get("truncation", PAIR_TRUNCATION) if it.get("text_pair") else None
                kinds.setdefault(kind, []).append(i)
        else:
            kinds[None] = list(range(len(items)))
        ids: list[list[int]] = [[]] * len(items)
        for strategy, idx in kinds.items():
            group = [items[i] for i in idx]
            try:
                rows = self._encode_group(group, strategy)
            except Exception:  # one bad text must not fail its neighbours: retry them one by one
                rows = []
                for n, it in enumerate(group):
                    try:
                        rows.extend(self._encode_group([it], strategy))
                    except Exception as exc:
                        rows.append([])
                        errors.append((idx[n], error_result(it["id"], INFERENCE_ERROR,
                                                            f"tokenizer failed: {type(exc).__name__}: {exc}",
                                                            it.get("meta"))))
            for i, row in zip(idx, rows):
                ids[i] = row
        bad = {i for i, _ in errors}
        for i, row in enumerate(ids):
            if not row and i not in bad:
                # A decoder tokenizer adds no special tokens, so an empty text has no tokens: the
                # pipeline refuses it too, and a score computed on padding alone would mean nothing.
                bad.add(i)
                errors.append((i, error_result(items[i]["id"], INVALID_TEXT, "text has no tokens after tokenization",
                                               items[i].get("meta"))))
        order = sorted((i for i in range(len(items)) if i not in bad), key=lambda i: len(ids[i]))
        return Encoded(items=items, options=options, ids=ids, order=order), errors

    # -- forward ----------------------------------------------------------------------------

    def _collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        if len(rows) > 1 and not self.m.pad_batches:
            # A batch cut before max_batch_size was lowered (or by a caller that set it): refused,
            # so that its rows run alone rather than be scored at a pad.
            raise ValueError("this model runs one row per forward: its config has no usable pad_token_id")
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self.send_types:
            types = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                if isinstance(r, Row):
                    types[i, : len(r)] = r.types
            batch["token_type_ids"] = torch.from_numpy(types)
        if self.pin:
            batch = {k: v.pin_memory().to(self.m.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def forward(self, rows: list[list[int]]) -> np.ndarray:
        """Logits as float32, one synchronisation (the copy back) per batch: a launch waited for
        at once (the synchronous path: OOM splits, row isolation, CPUs)."""
        return self._wait_forward(self._start_forward(rows))

    def _start_forward(self, rows: list[list[int]]) -> Any:
        """Queue a forward and the copy of its logits to the host; :meth:`_wait_forward` waits.
        One synchronisation per batch, when its logits are needed, not when the next is launched."""
        if self.fault is not None:
            self.fault(len(rows), len(rows) * max(len(r) for r in rows))
        self.forward_calls += 1
        with torch.inference_mode():
            logits = self.m.model(**self._collate(rows)).logits.float()
            host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=self.pin)
            host.copy_(logits, non_blocking=self.pin)  # pinned: an asynchronous copy on the stream
            done = None
            if self.m.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
        return host, done

    def _wait_forward(self, pending: Any) -> np.ndarray:
        host, done = pending
        if done is not None:
            done.synchronize()
        return host.numpy()

    def _forward_split(self, rows: list[list[int]]) -> list[np.ndarray | BaseException]:
        """Forward; on out-of-memory split in halves and retry, down to single rows."""
        try:
            return list(self.forward(rows))
        except Exception as exc:
            if not _is_oom(exc) and len(rows) > 1:
                raise
            if len(rows) == 1:
                # Its traceback holds the failed forward's frames, and so their activations.
                exc.__traceback__ = None
                return [exc]
        # Out of memory. Here, past the except block, the exception and the frames its traceback
        # holds (with the failed forward's activations) are released before the halves are tried.
        if self.m.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        self.oom_splits += 1
        log.warning("forward out of memory, splitting batch", rows=len(rows), width=max(map(len, rows)))
        return self._forward_split(rows[:half]) + self._forward_split(rows[half:])

    # -- the whole path -----------------------------------------------------------------------

    def run(self, enc: Encoded, stats: BatchStats | None = None) -> list[ItemResult]:
        """Results for every encoded item (in item order); failing rows get error results."""
        results: list[ItemResult | None] = [None] * len(enc.items)
        lengths = [len(enc.ids[i]) for i in enc.order]
        running: tuple[list[int], Launched] | None = None
        # On an asynchronous device the next batch is launched before the last one is waited
        # for (see worker.compute); elsewhere launch() does nothing and this is one at a time.
        # The last None is the last batch's turn to be finished.
        spans: list[tuple[int, int] | None] = [*plan_batches(lengths, self.max_batch_size, self.max_batch_tokens), None]
        for span in spans:
            launched = None
            if span is not None:
                idx = enc.order[span[0]:span[1]]
                launched = idx, self.launch([enc.items[i] for i in idx], [enc.options[i] for i in idx],
                                            [enc.ids[i] for i in idx])
            if running is not None:
                for i, result in zip(running[0], self.finish(running[1], stats)):
                    results[i] = result
            running = launched
        return cast("list[ItemResult]", results)  # enc.order covers every item

    def run_batch(self, items: list[Item], options: list[RowOptions], rows: list[list[int]],
                  stats: BatchStats | None = None) -> list[ItemResult]:
        """One forward batch (rows sorted by length, ascending): a result per item, in order,
        each scored by its own job's options (jobs with different options share a forward).
        A row that fails alone gets an error result; its neighbours still get theirs."""
        return self.finish(self.launch(items, options, rows), stats)

    def launch(self, items: list[Item], options: list[RowOptions], rows: list[list[int]]) -> Launched:
        """Start a batch's forward (:meth:`run_batch` in two halves). On an asynchronous device
        it is under way when this returns; a launch that fails (out of memory, say) is run again,
        the careful way, by :meth:`finish`."""
        launched = Launched(items, options, rows, time.perf_counter())
        if self.asynchronous:
            try:
                launched.pending = self._start_forward(rows)
            except Exception as exc:
                exc.__traceback__ = None  # its frames hold the failed forward's activations
                launched.pending = None
        return launched

    def finish(self, launched: Launched, stats: BatchStats | None = None) -> list[ItemResult]:
        """Wait for a launched batch's logits (or run its forward) and score each row."""
        items, options, rows = launched.items, launched.options, launched.rows
        outputs: list[np.ndarray | BaseException] | None = None
        if launched.pending is not None:
            try:
                outputs = list(self._wait_forward(launched.pending))
            except Exception as exc:  # an error the device reported late: run it the careful way
                log.warning("launched forward failed, running it again", error=repr(exc), rows=len(rows))
            launched.pending = None
        if outputs is None:
            outputs = self._forward_isolated(rows)
        if stats is not None:
            elapsed = time.perf_counter() - launched.began
            width = max(len(r) for r in rows)
            stats.batches += 1
            stats.texts += len(rows)
            stats.real_tokens += sum(len(r) for r in rows)
            stats.padded_tokens += len(rows) * width
            stats.forward_seconds += elapsed
            stats.per_batch.append((len(rows), len(rows) * width, elapsed))
        results: list[ItemResult | None] = [None] * len(rows)
        arrays = {n: o for n, o in enumerate(outputs) if isinstance(o, np.ndarray)}
        good = list(arrays)
        for n, o in enumerate(outputs):
            if not isinstance(o, np.ndarray):
                it = items[n]
                results[n] = error_result(it["id"], INFERENCE_ERROR, f"{type(o).__name__}: {o}", it.get("meta"))
        # Rows score by the model's rule unless their job asked for another (function_to_apply).
        by_function: dict[str, list[int]] = {}
        scored: dict[int, JobOptions] = {}
        for n in good:
            opts = options[n]
            if opts is Raw.LOGITS:
                results[n] = {"id": items[n]["id"], "logits": arrays[n].tolist()}
            else:
                scored[n] = opts
                by_function.setdefault(opts.function_to_apply or self.m.function, []).append(n)
        for function, idx in by_function.items():
            scores = apply_scoring(np.stack([arrays[n] for n in idx]), function)
            for n, result in zip(idx, self._results([items[n] for n in idx], scores, [scored[n].top_k for n in idx])):
                results[n] = result
        return cast("list[ItemResult]", results)  # each row is an error, raw logits or scored

    def _forward_isolated(self, rows: list[list[int]]) -> list[np.ndarray | BaseException]:
        """Logits per row: out of memory splits the batch, any other failure retries rows alone,
        so a row that fails gets its exception and its neighbours their logits."""
        try:
            return self._forward_split(rows)
        except Exception as exc:  # not OOM: isolate the culprit row by row
            log.warning("batch forward failed, retrying rows alone", error=repr(exc), rows=len(rows))
            outputs: list[np.ndarray | BaseException] = []
            for r in rows:
                try:
                    outputs.extend(self._forward_split([r]))
                except Exception as row_exc:
                    outputs.append(row_exc)
            return outputs

    def _results(self, items: list[Item], scores: np.ndarray, top_k: list[int | None]) -> list[ItemResult]:
        """Item results for a batch: one sort and one conversion to Python for the whole matrix."""
        labels = self.m.labels
        orders = np.argsort(-scores, axis=1, kind="stable").tolist()
        values = scores.tolist()
        out: list[ItemResult] = []
        for item, ranked, row, k in zip(items, orders, values, top_k):
            if k is not None:
                ranked = ranked[:k]
            best = ranked[0]
            result: ItemResult = {"id": item["id"], "label": labels[best], "score": row[best],
                                  "scores": {labels[j]: row[j] for j in ranked}}
            if "meta" in item:
                result["meta"] = item["meta"]
            out.append(result)
        return out

    def classify(self, items: list[Item], options: JobOptions | list[RowOptions] | None = None,
                 stats: BatchStats | None = None) -> list[ItemResult]:
        """Encode and run valid items (errors merged back in item order); ``options`` for all
        items (None: the defaults), or one per item."""
        if not isinstance(options, list):
            options = [options or JobOptions()] * len(items)
        enc, errors = self.encode(items, options)
        results = self.run(enc, stats)
        for i, err in errors:
            results[i] = err
        return results
