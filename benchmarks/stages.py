"""CPU time of a worker by stage, measured with each thread's own CPU clock.

:func:`instrument` wraps the functions that make up each stage of ``worker`` (whatever checkout is
imported) so that every call adds its thread's CPU time (``time.thread_time``: the thread's own
work, native code on that thread included, never time asleep or blocked) to its stage, less what
the stages it calls took (exclusive time, so nothing counts twice). What no stage claims (the
threads' loops, logging, the interpreter, other threads' CPU) is the process CPU minus the sum.

Run the tokenizer on its calling thread (``TOKENIZERS_PARALLELISM=false``) when measuring: its own
thread pool's CPU is invisible to the calling thread's clock. A stage whose functions a checkout
lacks is simply not measured (so an older checkout can be profiled with this file).
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections import defaultdict
from typing import Any

#: stage -> (module, "Class.method" or "function") whose CPU is the stage's. The module attribute
#: is replaced, so functions imported by name into another module are listed under that module.
STAGES: dict[str, list[tuple[str, str]]] = {
    "take (Redis script, rows parsed)": [("worker.job_store", "JobStore.take")],
    "decode and validate jobs": [("worker.taker", "Taker._read"), ("worker.taker", "split_items")],
    "tokenize": [("worker.engine", "Engine.encode")],
    "pool: add and cut batches": [("worker.scheduler", "BatchScheduler.add"),
                                  ("worker.scheduler", "BatchScheduler.next_batch"),
                                  ("worker.scheduler", "BatchScheduler.ready_batch")],
    "collate (tensors)": [("worker.engine", "Engine._collate")],
    "device (simulated: its CPU, not its sleep)": [("sim_worker", "SimulatedDevice.forward"),
                                                   ("sim_worker", "SimulatedDevice._start_forward"),
                                                   ("sim_worker", "SimulatedDevice._wait_forward")],
    "score and build results": [("worker.engine", "Engine.run_batch"), ("worker.engine", "Engine.finish")],
    "settle and hand on": [("worker.slots", "Inflight.settle"), ("worker.slots", "Finished.put"),
                           ("worker.slots", "Finished.next")],
    "results to JSON": [("worker.rq_completion", "encode_results")],
    "complete (Redis script)": [("worker.job_store", "JobStore.complete")],
    "complete (the rest)": [("worker.completer", "Completer.complete")],
    "heartbeat and maintenance": [("worker.job_store", "JobStore.heartbeat"),
                                  ("worker.batch_worker", "BatchWorker.recover_abandoned"),
                                  ("worker.batch_worker", "BatchWorker.clean_registries")],
}

_cpu: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_local = threading.local()
_lock = threading.Lock()


def _wrap(stage: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        children = getattr(_local, "children", None)
        if children is None:
            children = _local.children = [0.0]
        children.append(0.0)  # CPU of stages this call makes, to subtract
        began = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - began
            inner = children.pop()
            children[-1] += spent
            with _lock:
                _cpu[stage] += spent - inner
                _calls[stage] += 1

    return timed


def targets(extra_modules: dict[str, Any] | None = None) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """``(stage, owner, attribute)`` of every stage function found, and the ``module:name`` of
    those not found. ``extra_modules`` maps a module name of :data:`STAGES` to an object holding
    its classes (the simulated device, defined inside ``sim_worker.main``)."""
    found, missing = [], []
    for stage, entries in STAGES.items():
        for module_name, qualname in entries:
            holder: Any = (extra_modules or {}).get(module_name)
            if holder is None:
                try:
                    holder = importlib.import_module(module_name)
                except ImportError:
                    missing.append(f"{module_name}:{qualname}")
                    continue
            *owners, name = qualname.split(".")
            owner = holder
            for part in owners:
                owner = getattr(owner, part, None)
            if owner is None or getattr(owner, name, None) is None:
                missing.append(f"{module_name}:{qualname}")
                continue
            found.append((stage, owner, name))
    return found, missing


def instrument(extra_modules: dict[str, Any] | None = None) -> list[str]:
    """Wrap every stage function that exists; returns the ``module:name`` entries not found."""
    found, missing = targets(extra_modules)
    for stage, owner, name in found:
        setattr(owner, name, _wrap(stage, getattr(owner, name)))
    return missing


def report(process_cpu: float, texts: int) -> dict[str, Any]:
    """Per stage: CPU seconds, calls and microseconds per text; the rest is 'unattributed'."""
    with _lock:
        cpu, calls = dict(_cpu), dict(_calls)
    out = {k: {"cpu_s": v, "calls": calls[k], "us_per_text": 1e6 * v / texts if texts else 0.0}
           for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
    rest = process_cpu - sum(cpu.values())
    out["unattributed (loops, logging, interpreter, other threads)"] = {
        "cpu_s": rest, "calls": 0, "us_per_text": 1e6 * rest / texts if texts else 0.0}
    return out
