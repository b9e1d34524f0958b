"""A BatchWorker whose model forward returns zero logits at once: the queue's own cost per job.

Everything else is the real worker: taking jobs, validation, tokenization, batching, scoring,
results, run streams and registries. Used by ``benchmarks/run.py``; handy under py-spy too::

    python benchmarks/noop_worker.py --redis-url redis://127.0.0.1:6379/0 --model DIR [--burst]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", required=True, help="checkpoint directory (its tokenizer and labels are used)")
    parser.add_argument("--queue", action="append", default=None)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="also skip tokenization (ids from word counts): the queue's cost alone")
    args = parser.parse_args(argv)

    from queuebert import logs
    from queuebert.connection import connect
    from queuebert.schema import Item, ItemResult
    from queuebert.settings import WorkerSettings
    from worker.batch_worker import BatchWorker
    from worker.engine import Encoded, Engine
    from worker.job_rows import RowOptions
    from worker.model import load_model

    class NoopEngine(Engine):
        """Engine with a forward that costs nothing (zeros logits, float32)."""

        def forward(self, rows: list[list[int]]) -> np.ndarray:
            self.forward_calls += 1
            return np.zeros((len(rows), len(self.m.labels)), dtype=np.float32)

    class NoopTokenizerEngine(NoopEngine):
        """No-op model and no-op tokenizer: what remains is the queue."""

        def encode(self, items: list[Item], options: list[RowOptions]) -> tuple[Encoded, list[tuple[int, ItemResult]]]:
            ids = [[0] * (2 + min(len(it["text"]) // 6, 60)) for it in items]  # about a token per 6 characters
            return Encoded(items=items, options=options, ids=ids, order=[]), []

    logs.configure("json", args.log_level)
    settings = WorkerSettings.from_env(redis_url=args.redis_url, queues=args.queue or ["default"],
                                       burst=args.burst, dtype="float32", device="cpu")
    loaded = load_model(args.model, device="cpu", dtype="float32")
    engine_class = NoopTokenizerEngine if args.no_tokenizer else NoopEngine
    engine = engine_class(loaded, settings.max_batch_size, settings.max_batch_tokens)
    worker = BatchWorker(settings.queues, connection=connect(settings.redis_url), settings=settings,
                         engine=engine, name=args.name)
    worker.work(burst=args.burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
