"""A BatchWorker with a simulated device: can the rest of the worker feed a device of a given speed?

Everything is the real worker (taking, decoding, tokenization, pooling, the engine's own collation
into tensors, scoring, results, completion) except the model: after collation, a forward sleeps
for ``padded tokens / --tokens-per-s`` seconds, releasing the GIL as a CUDA forward's wait does,
and returns zero logits. The device's busy fraction (seconds asleep over the span from the first
forward's start to the last one's end) says how well the worker keeps such a device fed.

With a worker whose engine launches forwards asynchronously (``Engine.launch``, as on CUDA), the
device is simulated as a CUDA stream: a launch costs its host CPU and queues the forward behind
the ones already queued, and waiting for its logits sleeps until the device has run it. With
``--device-lock`` (several processes on one device), or an older worker, forwards are synchronous.

It runs against whatever ``worker`` package is first on ``PYTHONPATH``, so ``benchmarks/simdevice.py``
can run an older checkout's worker with it::

    python benchmarks/sim_worker.py --redis-url URL --model DIR --tokens-per-s 2e6 --burst --report out.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", required=True, help="checkpoint directory (its tokenizer and labels are used)")
    parser.add_argument("--tokens-per-s", type=float, required=True, help="the simulated device's padded tokens/s")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="padded tokens per forward (default: the worker's default on CUDA)")
    parser.add_argument("--queue", action="append", default=None)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--report", default=None, help="write the device's figures here (JSON) at exit")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--stages", action="store_true",
                        help="measure CPU by stage (benchmarks/stages.py) into the report")
    parser.add_argument("--host-ms", type=float, default=0.0,
                        help="CPU milliseconds each forward spends holding the GIL before the device "
                             "runs it: the eager forward's kernel launches on a real GPU (default 0)")
    parser.add_argument("--device-lock", default=None,
                        help="a file several sim workers lock around each forward: one simulated device "
                             "shared by several worker processes, as replicas on one GPU share it")
    parser.add_argument("--sync", action="store_true",
                        help="a synchronous device: each forward is waited for as it is launched")
    args = parser.parse_args(argv)

    import torch

    from queuebert import logs
    from queuebert.connection import connect
    from queuebert.settings import WorkerSettings
    from worker import engine as engine_module
    from worker.batch_worker import BatchWorker
    from worker.engine import Engine
    from worker.model import load_model

    class SimulatedDevice(Engine):
        """Engine whose forward is the engine's collation, then a sleep as long as the device
        would take for the batch's padded tokens."""

        tokens_per_s = args.tokens_per_s
        busy = 0.0
        rows = 0
        padded = 0
        first: float | None = None
        last = 0.0
        free_at = 0.0  # when the simulated stream has run everything queued on it

        def forward(self, rows: list[list[int]]) -> np.ndarray:
            # time.monotonic: one clock for every process on the machine, so the reports of
            # workers sharing a device can be put on one time line.
            began = time.monotonic()
            if self.first is None:
                self.first = began
            padded = self._launch_cost(rows)
            if lock_fd is not None:
                # The device runs one process's forward at a time (a GPU time-slices the
                # contexts of processes without MPS); flock waits with the GIL released.
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                asleep = time.monotonic()
                time.sleep(padded / self.tokens_per_s)
                ended = time.monotonic()
            finally:
                if lock_fd is not None:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
            self.busy += ended - asleep
            self.rows += len(rows)
            self.padded += padded
            self.last = ended
            return np.zeros((len(rows), len(self.m.labels)), dtype=np.float32)

        def _launch_cost(self, rows: list[list[int]]) -> int:
            """The host's part of a forward: collation, then --host-ms of CPU under the GIL;
            the padded tokens the device will run."""
            self.forward_calls += 1
            padded = int(self._collate(rows)["input_ids"].numel())
            if host_s:
                # Python and torch's dispatcher launching the forward's kernels: CPU time under
                # the GIL, per forward whatever its size (MiniLM-L6 eager: ~830 aten calls).
                until = time.thread_time() + host_s
                while time.thread_time() < until:
                    pass
            return padded

        def _start_forward(self, rows: list[list[int]]) -> tuple[float, int]:
            """Queue the forward on the simulated stream: it starts when the device is free."""
            if self.first is None:
                self.first = time.monotonic()
            padded = self._launch_cost(rows)
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + padded / self.tokens_per_s
            self.busy += self.free_at - start
            self.rows += len(rows)
            self.padded += padded
            self.last = self.free_at
            return self.free_at, len(rows)

        def _wait_forward(self, pending: Any) -> np.ndarray:
            done, n = pending
            delay = done - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return np.zeros((n, len(self.m.labels)), dtype=np.float32)

        def report(self) -> dict[str, Any]:
            span = self.last - self.first if self.first is not None else 0.0
            return {"tokens_per_s": self.tokens_per_s, "forwards": self.forward_calls, "rows": self.rows,
                    "padded_tokens": self.padded, "busy_s": self.busy, "span_s": span,
                    "first": self.first, "last": self.last,
                    "busy_fraction": self.busy / span if span else 0.0,
                    "rows_per_s": self.rows / span if span else 0.0}

    host_s = args.host_ms / 1000
    lock_fd = os.open(args.device_lock, os.O_RDWR | os.O_CREAT) if args.device_lock else None
    if args.stages:
        if TYPE_CHECKING:
            from benchmarks import stages
        else:
            import stages  # benchmarks/stages.py, beside this file (run as a script: its folder is on sys.path)

        missing = stages.instrument({"sim_worker": argparse.Namespace(SimulatedDevice=SimulatedDevice)})
    logs.configure("json", args.log_level)
    # Batches as the worker cuts them on CUDA, unless QUEUEBERT_* or --max-batch-tokens say otherwise.
    # (A checkout from before default_batch_size had 64 rows on every device.)
    cuda = torch.device("cuda")
    rows = getattr(engine_module, "default_batch_size", lambda device: 64)(cuda)
    settings = WorkerSettings.from_env(redis_url=args.redis_url, queues=args.queue or ["default"], burst=args.burst,
                                       dtype="float32", device="cpu")
    settings.max_batch_size = settings.max_batch_size or rows
    settings.max_batch_tokens = (args.max_batch_tokens or settings.max_batch_tokens
                                 or engine_module.default_batch_tokens(cuda))
    engine = SimulatedDevice(load_model(args.model, device="cpu", dtype="float32"), settings.max_batch_size,
                             settings.max_batch_tokens)
    # A GPU's stream, unless processes share the device through a lock (held for a whole forward).
    engine.asynchronous = lock_fd is None and not args.sync
    worker = BatchWorker(settings.queues, connection=connect(settings.redis_url), settings=settings,
                         engine=engine, name=args.name)
    cpu_at_start = time.process_time()  # after imports and model loading: the worker's own work
    worker.work(burst=args.burst)
    if args.report:
        cpu = time.process_time() - cpu_at_start
        out: dict[str, Any] = {**engine.report(), "cpu_s": cpu}
        if args.stages:
            out["stages"] = stages.report(cpu, engine.rows)
            out["stages_not_found"] = missing
        Path(args.report).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
