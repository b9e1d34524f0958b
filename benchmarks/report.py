"""What a benchmark invocation's results say: the ratios between rows, and the markdown tables.

Pure functions of the results dictionary (what results.json holds), so a report can be made again
from a saved results.json.
"""

from __future__ import annotations

from typing import Any


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios that matter (benchmarks/README.md, "Reading the numbers"); None where a row is missing."""
    th = results["throughput"]
    r: dict[str, Any] = {}

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
    noop = results["noop"]
    if "batchworker_one_text_jobs" in noop and "stock_rq_noop_jobs" in noop:
        r["noop_one_text_jobs_batchworker_over_stock_rq"] = round(
            noop["batchworker_one_text_jobs"]["jobs_per_s"] / noop["stock_rq_noop_jobs"]["jobs_per_s"], 2)
    if "stream_noop" in noop:
        r["noop_stream_texts_per_s"] = noop["stream_noop"]["texts_per_s"]
    if "stream_noop_no_tokenizer" in noop:
        r["noop_stream_no_tokenizer_texts_per_s"] = noop["stream_noop_no_tokenizer"]["texts_per_s"]
    if "producer_enqueue_stream" in noop:
        r["producer_enqueue_texts_per_s"] = noop["producer_enqueue_stream"]["texts_per_s"]
    idle = results["latency"].get("idle")
    fwd = results["single_forward"].get("auto")
    if idle and fwd and idle.get("n"):
        r["idle_p50_latency_minus_single_forward_ms"] = round(idle["p50_ms"] - fwd["p50_ms"], 2)
    return r


def markdown(results: dict[str, Any], repeats: int) -> str:
    """results.md: the throughput table, queue overhead, latency and ratios; ``repeats`` is how
    many interleaved runs each of (c), (d) and (e) had."""
    th = results["throughput"]
    m = results["machine"]
    settings = results["settings"]
    corpus = settings.get("corpus", {})
    tokens = corpus.get("tokens", {})

    def rate(key: str) -> float | None:
        row = th.get(key)
        return row.get("texts_per_s") if row else None

    def fmt_ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    lines = [
        f"# queuebert benchmark ({'quick' if settings.get('quick') else 'full'})",
        "",
        f"{m.get('date')} - {m.get('cpu_model')}, {m.get('cores')} cores (bf16 native: "
        f"{m.get('cpu_flags_bf16', {}).get('avx512_bf16')}), torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, rq {m.get('rq')}. Model: {settings.get('model')}; "
        f"auto dtype = {settings.get('auto_dtype_resolves_to')}.",
        "",
        f"Texts: {corpus.get('texts')} from {corpus.get('name')} ({corpus.get('source')}"
        + (f", seed {corpus['seed']}" if "seed" in corpus else "") + f"), sha256 `{corpus.get('sha256')}`"
        + (f"; tokens per text mean {tokens['mean']}, median {tokens['p50']}, max {tokens['max']}" if tokens else "")
        + ".",
        "",
        "| config | dtype | texts/s | vs (c) same dtype | vs (a) | vs (b) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in th.values():
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
    if repeats > 1:
        lines += ["", f"(c), (d) and (e) ran interleaved {repeats} times per dtype (c, d, e, c, d, e, ...); "
                  "each row is the median run, every run is in results.json."]
    noop = results["noop"]
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
            tokenizer = noop["tokenize_texts_per_s_in_process"]
            lines.append(f"| (tokenizer alone, in-process, same texts) | {tokenizer} texts/s |")
    lat = results["latency"]
    fwd = results["single_forward"]
    if lat or fwd:
        lines += ["", "## Latency of one text (submit -> result)", "", "| condition | p50 ms | p99 ms | n |",
                  "|---|---:|---:|---:|"]
        for v in fwd.values():
            lines.append(f"| in-process Engine.classify of one text ({v['dtype']}) | {v.get('p50_ms')} | "
                         f"{v.get('p99_ms')} | {v.get('n')} |")
        names = {"idle": "queuebert, worker idle", "paced_load_same_queue": "queuebert, under paced load, same queue",
                 "saturated_priority_queue": "queuebert, saturating stream, text on a priority queue"}
        for k, v in lat.items():
            extra = f" ({v['load']})" if "load" in v else ""
            lines.append(f"| {names.get(k, k)}{extra} | {v.get('p50_ms')} | {v.get('p99_ms')} | {v.get('n')} |")
    r = results["ratios"]
    lines += ["", "## Ratios", "", "| ratio | value |", "|---|---:|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v} |")
    if results["errors"]:
        lines += ["", "## Stages that failed", ""] + [f"- {k} (traceback in results.json)" for k in results["errors"]]
    return "\n".join(lines) + "\n"
