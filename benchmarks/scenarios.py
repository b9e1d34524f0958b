"""The measured rows: one benchmark invocation's state and every scenario it times.

    (a) (b)  transformers pipeline, batch_size 1 and 32, in-process          in_process
    (c)      Engine in-process: length-sorted, token-budget batches          engine_c
    (d) (e)  queuebert: one job per text, stream jobs of 64 (worker process) queuebert_model
    (f)      stock RQ SimpleWorker running worker.tasks.classify             stock_rq
    latency at idle and under load, 1 vs 2 workers                           latency_and_scaling
    queue overhead with a no-op model                                        noop

Every row goes into ``Bench.results`` (written to results.json after each stage); the ratios and
the markdown are made from those results alone, in ``report.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.corpus import Corpus, generate, read_jsonl
from benchmarks.harness import (
    Procs,
    batch_stats,
    batch_worker_cmd,
    check_results,
    loadavg,
    log_mark,
    machine_info,
    new_redis,
    noop_worker_cmd,
    perf,
    prepare_model,
    say,
    stock_worker_cmd,
    summary_ms,
    wait_exit,
    wait_registered,
    wait_run,
    worker_name,
)


def run_of(handle: Any) -> str:
    """The run of a handle that submit_many returned (it always makes one)."""
    run_id: str | None = handle.run_id
    assert run_id is not None
    return run_id


class Bench:
    """One invocation: its settings, texts, model, worker processes and results."""

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
        from transformers import AutoTokenizer

        from queuebert.settings import WorkerSettings
        from worker.model import resolve_dtype

        self.results["machine"] = machine_info()
        self.corpus = self.load_corpus()
        self.texts = self.corpus.texts
        self.n = len(self.texts)
        self.model_dir, model_desc = prepare_model(self.tmp)
        self.auto_dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        ws = WorkerSettings()
        self.ws = ws
        # Latency probes: a spread of texts from the same data.
        step = max(1, self.n // 40)
        self.probe_texts = self.texts[::step][:40]
        self.results["settings"] = {
            "texts": self.n, "quick": self.quick, "data": self.corpus.source,
            "corpus": self.corpus.describe(AutoTokenizer.from_pretrained(str(self.model_dir))),
            "model_dir": str(self.model_dir),
            "model": model_desc, "auto_dtype_resolves_to": self.auto_dtype,
            "worker_defaults": {"max_batch_size": ws.max_batch_size, "max_batch_tokens": ws.max_batch_tokens,
                                "max_wait_ms": ws.max_wait_ms, "max_pool_items": ws.max_pool_items,
                                "take_jobs": ws.take_jobs},
            "stock_rq_texts": self.n_stock, "noop_jobs": self.n_noop_jobs, "noop_stream_texts": self.n_noop_stream,
        }
        say(f"machine: {self.results['machine']['cpu_model']}, {self.results['machine']['cores']} cores, "
            f"torch {self.results['machine']['torch']}, transformers {self.results['machine']['transformers']}")
        say(f"model: {self.model_dir} ({model_desc}); auto dtype -> {self.auto_dtype}")
        say(f"texts: {self.n} from {self.corpus.name} ({self.corpus.source}), sha256 {self.corpus.sha256}")

    def load_corpus(self) -> Corpus:
        """``--data PATH`` if given (its first N texts), else the corpus generated from ``--seed``."""
        a = self.args
        if a.data is None:
            return generate(a.texts, a.seed)
        path = Path(a.data)
        if not path.is_file():
            raise SystemExit(f"data file not found: {path}")
        corpus = read_jsonl(path, a.texts)
        if len(corpus.texts) < a.texts:
            say(f"note: {path} has only {len(corpus.texts)} texts")
        return corpus

    @property
    def n_stock(self) -> int:
        return min(self.args.texts, 60 if self.quick else 500)

    @property
    def n_noop_jobs(self) -> int:
        return 1000 if self.quick else 5000

    @property
    def n_noop_stream(self) -> int:
        return 20_000 if self.quick else 60_000

    # -- (a) (b) (c): in-process ------------------------------------------------------------------

    def in_process(self) -> None:
        import torch
        from transformers import pipeline
        from transformers.utils import logging as hf_logging

        from queuebert.schema import Item
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

        self.items: list[Item] = [{"id": str(i), "text": s} for i, s in enumerate(texts)]
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
        with new_redis() as srv:
            client = Client.from_url(srv.url)
            name = worker_name(dtype)
            proc = self.procs.start(f"worker-{dtype}", batch_worker_cmd(srv.url, self.model_dir, dtype, name=name))
            wait_registered(client.connection, [name], self.procs)
            # warm-up: a few one-text jobs and one stream job
            warm = client.submit_many(self.texts[:8], chunk_size=1)
            wait_run(client, run_of(warm[0]), self.procs)
            wait_run(client, client.enqueue_stream(self.texts[8:72], chunk_size=64).id, self.procs)
            for _ in range(self.repeats):
                runs["c"].append(self.engine_c(dtype))
                ref = self.reference_labels.get(f"engine_{dtype}")

                mark = log_mark(proc)
                t0 = perf()
                handles = client.submit_many(self.texts, chunk_size=1)
                t_enq = perf() - t0
                t1 = wait_run(client, run_of(handles[0]), self.procs)
                runs["d"].append(t1 - t0)
                extra["d"] = {"enqueue_s": round(t_enq, 3), "worker_batches": batch_stats(proc, mark),
                              **check_results(client, run_of(handles[0]), self.n, ref)}

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
        with new_redis() as srv:
            client = Client.from_url(srv.url)
            env = {"QUEUEBERT_MODEL": str(self.model_dir), "QUEUEBERT_DTYPE": "float32", "QUEUEBERT_DEVICE": "cpu",
                   "QUEUEBERT_REDIS_URL": srv.url}
            name = worker_name("stock")
            self.procs.start("stock-rq-classify", stock_worker_cmd(srv.url, "stock", name), env)
            wait_registered(client.connection, [name], self.procs)
            warm = client.submit_many(self.texts[:4], chunk_size=1, queue="stock")  # loads the model
            wait_run(client, run_of(warm[0]), self.procs, timeout=300)
            t0 = perf()
            handles = client.submit_many(texts, chunk_size=1, queue="stock")
            t1 = wait_run(client, run_of(handles[0]), self.procs)
            ref = self.reference_labels.get("engine_float32")
            self.record("f_stock_rq", f"(f) stock RQ SimpleWorker, one job per text ({n} texts)", "float32", n,
                        t1 - t0, **check_results(client, run_of(handles[0]), n, ref[:n] if ref else None))

    # -- latency, and 1 worker vs 2 --------------------------------------------------------------

    def latency_and_scaling(self) -> None:
        from producer.client import Client

        label = f"auto:{self.auto_dtype}"
        lat = self.results["latency"]
        with new_redis() as srv:
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
        with new_redis() as srv:
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
        synthetic = [f"short text {i}: the service was {'good' if i % 3 else 'bad'} today"
                     for i in range(self.n_noop_stream)]

        # Tokenizing the synthetic texts in-process (part of every worker path; reported separately).
        tok = self.engines["float32"].m.tokenizer if hasattr(self, "engines") else None
        if tok is not None:
            t = perf()
            for i in range(0, len(synthetic), 1024):
                tok(synthetic[i:i + 1024], truncation=True, max_length=512)
            res["tokenize_texts_per_s_in_process"] = round(len(synthetic) / (perf() - t), 1)

        with new_redis() as srv:
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
                                    noop_worker_cmd(srv.url, self.model_dir, "noop-stream-notok", name,
                                                    no_tokenizer=True))
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
            t1 = wait_run(client, run_of(handles[0]), self.procs)
            wait_exit(proc)
            res["batchworker_one_text_jobs"] = {"jobs": m, "seconds": round(t1 - t0, 3),
                                                "jobs_per_s": round(m / (t1 - t0), 1)}
            say(f"  BatchWorker one-text jobs, no-op model: {res['batchworker_one_text_jobs']['jobs_per_s']} jobs/s")
            self.procs.stop_all()

            # RQ's own JSON serializer: queuebert's refuses any function but worker.tasks.classify.
            q = Queue("noop-rq", connection=conn, serializer=RQJSONSerializer)
            for i in range(0, m, 500):
                with conn.pipeline(transaction=False) as pipe:
                    q.enqueue_many([Queue.prepare_data("noop.noop",
                                                       kwargs={"items": [{"id": str(j), "text": synthetic[j]}]},
                                                       job_id=new_id()) for j in range(i, min(m, i + 500))],
                                   pipeline=pipe)
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


    # -- the whole invocation --------------------------------------------------------------------

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        """Every stage in the order it runs; its name keys ``stage_seconds`` and ``errors``."""
        return [
            ("in-process: pipeline (a) (b), single-text forward", self.in_process),
            ("float32: Engine (c), queuebert (d) (e)", lambda: self.queuebert_model("float32")),
            ("auto dtype: Engine (c), queuebert (d) (e)", lambda: self.queuebert_model("auto")),
            ("stock RQ: (f)", self.stock_rq),
            ("latency, 1 vs 2 workers", self.latency_and_scaling),
            ("queue overhead, no-op model", self.noop),
        ]

    def close(self) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)
