"""Can the worker feed a fast device? The simulated-device rows, old and new code in one invocation.

For each device speed (padded tokens per second) the queue is filled first with the texts in stream
jobs of 64, then one ``benchmarks/sim_worker.py`` in burst mode takes them all; its report gives the
device's busy fraction and the texts per second over the span of its forwards. Beside them, what the
tokenizer alone does on the same cores (the fast Rust tokenizer, chunks of 256 as the worker's taker
tokenizes): a worker cannot feed a device faster than its own tokenization, so ``worker/tokenizer``
is how much of that ceiling the rest of the worker leaves. Rows of one code and of the other run
interleaved, repeat by repeat, so the machine's drift falls on both alike::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/simdevice.py --baseline HEAD~3
    options: --texts N (20000)  --speeds 5e5,2e6,8e6  --repeats R (3)  --data PATH  --out DIR

``--baseline REF`` checks REF out in a temporary git worktree and runs its ``worker`` package with
this checkout's ``sim_worker.py``. Writes ``DIR/simdevice.json`` and ``DIR/simdevice.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.corpus import generate, read_jsonl

DEFAULT_DATA = harness.REPO.parent / "shared" / "data" / "texts-mixed.jsonl"


def tokenizer_alone(model: Path, texts: list[str], chunk: int = 256) -> float:
    """Texts per second of the fast tokenizer alone, as the worker calls it (truncated, no offsets)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length=min(tok.model_max_length, 512))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encode(texts[:chunk], add_special_tokens=True)  # warm
    began = time.perf_counter()
    for start in range(0, len(texts), chunk):
        encode(texts[start:start + chunk], add_special_tokens=True)
    return len(texts) / (time.perf_counter() - began)


def run_one(code: Path, model: Path, texts: list[str], speed: float, logdir: Path, label: str,
            extra_args: list[str] | None = None, env_extra: dict[str, str] | None = None,
            processes: int = 1) -> dict[str, Any]:
    """``processes`` burst workers of ``code`` over all texts, queued beforehand, sharing one
    simulated device (a lock file); the device's figures over all of them."""
    from producer import Client
    from queuebert.procs import start_process, stop_process

    server = harness.new_redis()
    try:
        client = Client.from_url(server.url)
        run = client.enqueue_stream(texts, chunk_size=64)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
        env.setdefault("HF_HUB_OFFLINE", "1")
        if processes > 1:
            # What `queuebert worker --workers-per-device N` gives each of its processes.
            from worker.supervisor import shared_host_env

            env.update(shared_host_env(processes, "cuda:0", env))
        env.update(env_extra or {})
        lock = logdir / f"{label}.device"
        procs, reports = [], []
        for i in range(processes):
            name = label if processes == 1 else f"{label}-p{i}"
            reports.append(logdir / f"{name}.json")
            procs.append(start_process(
                [sys.executable, str(harness.BENCH_DIR / "sim_worker.py"), "--redis-url", server.url,
                 "--model", str(model), "--tokens-per-s", str(speed), "--burst", "--name", name,
                 "--report", str(reports[-1]), *(["--device-lock", str(lock)] if processes > 1 else []),
                 *(extra_args or [])],
                env=env, cwd=code, log_path=logdir / f"{name}.log", stdout="log", new_session=True))
        try:
            for proc in procs:
                proc.wait(timeout=1800)
        finally:
            for proc in procs:
                stop_process(proc, grace=30)
        for proc, report in zip(procs, reports):
            if proc.returncode != 0 or not report.exists():
                raise RuntimeError(f"{label}: worker exited with {proc.returncode}; see {report.with_suffix('.log')}")
        out = combine([json.loads(r.read_text()) for r in reports])
        done = client.run_progress(run.id)["done"]
        if done != len(texts) or out["rows"] != len(texts):
            raise RuntimeError(f"{label}: {done} results and {out['rows']} rows for {len(texts)} texts")
        return out
    finally:
        server.close()


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One device's figures from the reports of the processes that shared it: their forwards never
    overlapped (the lock), so busy seconds add up, over the span from the first forward of any to
    the last of any."""
    if len(reports) == 1:
        return reports[0]
    used = [r for r in reports if r["first"] is not None]
    span = max(r["last"] for r in used) - min(r["first"] for r in used) if used else 0.0
    out: dict[str, Any] = {k: sum(r[k] for r in reports) for k in ("forwards", "rows", "padded_tokens", "busy_s")}
    out["cpu_s"] = sum(r.get("cpu_s", 0.0) for r in reports)
    out.update(tokens_per_s=reports[0]["tokens_per_s"], span_s=span, processes=len(reports),
               busy_fraction=out["busy_s"] / span if span else 0.0, rows_per_s=out["rows"] / span if span else 0.0,
               per_process_rows=[r["rows"] for r in reports])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speeds", default="5e5,2e6,8e6", help="padded tokens per second, comma-separated")
    parser.add_argument("--host-ms", type=float, default=0.0,
                        help="CPU ms each forward holds the GIL for, as an eager forward's kernel launches "
                             "do on a real GPU (sim_worker.py --host-ms; default 0)")
    parser.add_argument("--processes", default="1",
                        help="worker processes sharing the device, comma-separated counts; the baseline "
                             "runs with one (default 1)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    speeds = [float(s) for s in args.speeds.split(",")]
    counts = [int(n) for n in args.processes.split(",")]
    corpus = read_jsonl(args.data, args.texts) if args.data else generate(args.texts)
    texts = corpus.texts
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / "simdevice-logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="qb-simdevice-"))
    codes = checkouts(args.baseline, tmp)
    try:
        model, model_desc = model_of(args, tmp)
        configs = [(name, code, 1) for name, code in codes.items() if name == "old"]
        configs += [(f"new x{n}" if n > 1 else "new", harness.REPO, n) for n in counts]
        harness.say(f"{len(texts)} texts of {corpus.name}; model {model_desc}; runs {[c[0] for c in configs]}; "
                    f"speeds {speeds}")
        rows: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            tok = tokenizer_alone(model, texts)
            rows.append({"repeat": rep, "code": "tokenizer alone", "texts_per_s": tok})
            harness.say(f"repeat {rep}: tokenizer alone {tok:,.0f} texts/s")
            for speed in speeds:
                for name, code, n in configs:
                    label = f"{name.replace(' ', '')}-{speed:.0e}-r{rep}"
                    r = run_one(code, model, texts, speed, logdir, label, processes=n,
                                extra_args=["--host-ms", str(args.host_ms)] if args.host_ms else None)
                    rows.append({"repeat": rep, "code": name, "speed": speed, "texts_per_s": r["rows_per_s"],
                                 "busy": r["busy_fraction"], "vs_tokenizer": r["rows_per_s"] / tok, **r,
                                 "loadavg": os.getloadavg()[0]})
                    harness.say(f"  {label}: {r['rows_per_s']:,.0f} texts/s, device busy {r['busy_fraction']:.2f}, "
                                f"{r['rows_per_s'] / tok:.2f}x the tokenizer alone")
        names = [c[0] for c in configs]
        summary = summarise(rows, names, speeds)
        result = {"machine": harness.machine_info(), "corpus": corpus.describe(), "model": model_desc,
                  "host_ms": args.host_ms,
                  "baseline": args.baseline, "rows": rows, "summary": summary}
        (args.out / "simdevice.json").write_text(json.dumps(result, indent=1))
        (args.out / "simdevice.md").write_text(markdown(summary, names, rows, len(texts), corpus.name, args.host_ms))
        print(markdown(summary, names, rows, len(texts), corpus.name, args.host_ms))
    finally:
        remove_checkouts(codes, tmp)
    return 0


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options this script and ``stage_profile.py`` share."""
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="git ref of the old code to run beside this checkout")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else None)
    parser.add_argument("--model", type=Path, default=None,
                        help="classifier directory (default: the built default model, else MiniLM-L6 from its wheel)")
    parser.add_argument("--out", type=Path, default=harness.BENCH_DIR / "results")


def model_of(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """``--model``, else the benchmark's usual model (built under ``tmp`` if need be), and its description."""
    return (args.model, str(args.model)) if args.model else harness.prepare_model(tmp)


def checkouts(baseline: str | None, tmp: Path) -> dict[str, Path]:
    """``{"new": this checkout}``, and ``"old"``: ``baseline`` in a git worktree under ``tmp``."""
    if not baseline:
        return {"new": harness.REPO}
    old = tmp / "old"
    subprocess.run(["git", "-C", str(harness.REPO), "worktree", "add", "--detach", str(old), baseline],
                   check=True, capture_output=True)
    return {"old": old, "new": harness.REPO}


def remove_checkouts(codes: dict[str, Path], tmp: Path) -> None:
    if "old" in codes:
        subprocess.run(["git", "-C", str(harness.REPO), "worktree", "remove", "--force", str(codes["old"])],
                       capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def summarise(rows: list[dict[str, Any]], names: list[str], speeds: list[float]) -> list[dict[str, Any]]:
    """Medians over repeats per (run, speed); each run's ratio to "old" within each repeat, then
    their median."""
    out = []
    for speed in speeds:
        entry: dict[str, Any] = {"speed": speed}
        for name in names:
            mine = [r for r in rows if r.get("code") == name and r.get("speed") == speed]
            entry[name] = {k: statistics.median(r[k] for r in mine) for k in ("texts_per_s", "busy", "vs_tokenizer")}
            if "old" in names and name != "old":
                pairs = [(n, o) for n in mine for o in rows if o.get("speed") == speed and o.get("code") == "old"
                         and n["repeat"] == o["repeat"]]
                entry[name]["over_old"] = statistics.median(n["texts_per_s"] / o["texts_per_s"] for n, o in pairs)
        out.append(entry)
    return out


def markdown(summary: list[dict[str, Any]], names: list[str], rows: list[dict[str, Any]], n: int,
             corpus: str, host_ms: float = 0.0) -> str:
    tok = statistics.median(r["texts_per_s"] for r in rows if r["code"] == "tokenizer alone")
    ratio = [c for c in names if c != "old" and "old" in names]
    head = "| device (padded tokens/s) | " + " | ".join(
        f"{c}: texts/s | {c}: device busy | {c}: x tokenizer" for c in names) + "".join(
        f" | {c}/old" for c in ratio) + " |"
    lines = [(f"{n} texts of {corpus}, stream jobs of 64 queued first, then burst workers (\"x2\": two processes "
              f"sharing the simulated device); medians of {len({r['repeat'] for r in rows})} interleaved repeats. "
              f"Tokenizer alone: {tok:,.0f} texts/s. Host CPU per forward (--host-ms): {host_ms:g} ms."), "",
             head, "|" + "---|" * (1 + 3 * len(names) + len(ratio))]
    for e in summary:
        cells = [f"{e['speed']:,.0f}"]
        for c in names:
            cells += [f"{e[c]['texts_per_s']:,.0f}", f"{e[c]['busy']:.2f}", f"{e[c]['vs_tokenizer']:.2f}"]
        cells += [f"{e[c]['over_old']:.2f}" for c in ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
