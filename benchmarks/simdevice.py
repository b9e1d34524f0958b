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

from benchmarks import harness  # noqa: E402
from benchmarks.corpus import generate, read_jsonl  # noqa: E402

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
            extra_args: list[str] | None = None, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """One burst worker of ``code`` over all texts, queued beforehand; its device report."""
    from producer import Client
    from queuebert.procs import start_process, stop_process

    server = harness.new_redis()
    try:
        client = Client.from_url(server.url)
        run = client.enqueue_stream(texts, chunk_size=64)
        report = logdir / f"{label}.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(env_extra or {})
        proc = start_process([sys.executable, str(harness.BENCH_DIR / "sim_worker.py"), "--redis-url", server.url,
                              "--model", str(model), "--tokens-per-s", str(speed), "--burst", "--name", label,
                              "--report", str(report), *(extra_args or [])],
                             env=env, cwd=code, log_path=logdir / f"{label}.log", stdout="log", new_session=True)
        try:
            proc.wait(timeout=1800)
        finally:
            stop_process(proc, grace=30)
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"{label}: worker exited with {proc.returncode}; see {logdir / f'{label}.log'}")
        out = json.loads(report.read_text())
        done = client.run_progress(run.id)["done"]
        if done != len(texts) or out["rows"] != len(texts):
            raise RuntimeError(f"{label}: {done} results and {out['rows']} rows for {len(texts)} texts")
        return out
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speeds", default="5e5,2e6,8e6", help="padded tokens per second, comma-separated")
    add_common_args(parser)
    args = parser.parse_args(argv)
    speeds = [float(s) for s in args.speeds.split(",")]
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
        harness.say(f"{len(texts)} texts of {corpus.name}; model {model_desc}; codes {list(codes)}; speeds {speeds}")
        rows: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            tok = tokenizer_alone(model, texts)
            rows.append({"repeat": rep, "code": "tokenizer alone", "texts_per_s": tok})
            harness.say(f"repeat {rep}: tokenizer alone {tok:,.0f} texts/s")
            for speed in speeds:
                for name, code in codes.items():
                    label = f"{name}-{speed:.0e}-r{rep}"
                    r = run_one(code, model, texts, speed, logdir, label)
                    rows.append({"repeat": rep, "code": name, "speed": speed, "texts_per_s": r["rows_per_s"],
                                 "busy": r["busy_fraction"], "vs_tokenizer": r["rows_per_s"] / tok, **r,
                                 "loadavg": os.getloadavg()[0]})
                    harness.say(f"  {label}: {r['rows_per_s']:,.0f} texts/s, device busy {r['busy_fraction']:.2f}, "
                                f"{r['rows_per_s'] / tok:.2f}x the tokenizer alone")
        summary = summarise(rows, codes, speeds)
        result = {"machine": harness.machine_info(), "corpus": corpus.describe(), "model": model_desc,
                  "baseline": args.baseline, "rows": rows, "summary": summary}
        (args.out / "simdevice.json").write_text(json.dumps(result, indent=1))
        (args.out / "simdevice.md").write_text(markdown(summary, codes, rows, len(texts), corpus.name))
        print(markdown(summary, codes, rows, len(texts), corpus.name))
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


def summarise(rows: list[dict[str, Any]], codes: dict[str, Path], speeds: list[float]) -> list[dict[str, Any]]:
    """Medians over repeats per (code, speed); new/old ratios within each repeat, then their median."""
    out = []
    for speed in speeds:
        entry: dict[str, Any] = {"speed": speed}
        for name in codes:
            mine = [r for r in rows if r.get("code") == name and r.get("speed") == speed]
            entry[name] = {k: statistics.median(r[k] for r in mine) for k in ("texts_per_s", "busy", "vs_tokenizer")}
        if "old" in codes:
            pairs = [(n, o) for n in rows for o in rows if n.get("speed") == o.get("speed") == speed
                     and n.get("code") == "new" and o.get("code") == "old" and n["repeat"] == o["repeat"]]
            entry["new_over_old"] = statistics.median(n["texts_per_s"] / o["texts_per_s"] for n, o in pairs)
        out.append(entry)
    return out


def markdown(summary: list[dict[str, Any]], codes: dict[str, Path], rows: list[dict[str, Any]], n: int,
             corpus: str) -> str:
    tok = statistics.median(r["texts_per_s"] for r in rows if r["code"] == "tokenizer alone")
    head = "| device (padded tokens/s) | " + " | ".join(
        f"{c}: texts/s | {c}: device busy | {c}: x tokenizer" for c in codes) + (
        " | new/old |" if "old" in codes else " |")
    lines = [f"{n} texts of {corpus}, stream jobs of 64 queued first, one burst worker; medians of "
             f"{len({r['repeat'] for r in rows})} interleaved repeats. Tokenizer alone: {tok:,.0f} texts/s.", "",
             head, "|" + "---|" * (1 + 3 * len(codes) + ("old" in codes))]
    for e in summary:
        cells = [f"{e['speed']:,.0f}"]
        for c in codes:
            cells += [f"{e[c]['texts_per_s']:,.0f}", f"{e[c]['busy']:.2f}", f"{e[c]['vs_tokenizer']:.2f}"]
        if "new_over_old" in e:
            cells.append(f"{e['new_over_old']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
