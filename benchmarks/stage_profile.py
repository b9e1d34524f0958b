"""Where a worker's CPU goes, per text and by stage, outside the forward; old and new code side by side.

Fills a private Redis with the texts in stream jobs of 64 and runs one ``sim_worker.py`` in burst
mode with ``--stages`` (:mod:`benchmarks.stages`: every stage's CPU from its thread's own clock).
The device is simulated, by default fast enough to wait for nothing (``--tokens-per-s 1e9``), so
what remains is the worker's own CPU path. The tokenizer runs on its calling thread
(``TOKENIZERS_PARALLELISM=false``) so its CPU is counted where it is spent::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stage_profile.py [--texts 20000] [--baseline REF] [--repeats 3]

Prints microseconds of CPU per text by stage (median over repeats) for each checkout and writes
``DIR/stages.json``. With a real model instead of the simulated device, see ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.corpus import generate, read_jsonl  # noqa: E402
from benchmarks.simdevice import add_common_args, checkouts, model_of, remove_checkouts, run_one  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-s", type=float, default=1e9, help="simulated device speed (1e9: no wait)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    corpus = read_jsonl(args.data, args.texts) if args.data else generate(args.texts)
    texts = corpus.texts
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / "stages-logs"
    logdir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qb-stages-"))
    codes = checkouts(args.baseline, tmp)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    try:
        model, model_desc = model_of(args, tmp)
        harness.say(f"{len(texts)} texts of {corpus.name}; model {model_desc}; codes {list(codes)}")
        for rep in range(args.repeats):
            for name, code in codes.items():  # interleaved: the machine's drift falls on both
                r = run_one(code, model, texts, args.tokens_per_s, logdir, f"stages-{name}-r{rep}",
                            extra_args=["--stages", "--log-level", "warning"],
                            env_extra={"TOKENIZERS_PARALLELISM": "false"})
                runs[name].append(r)
                harness.say(f"  {name} r{rep}: {1e6 * r['cpu_s'] / len(texts):.0f} us CPU/text, "
                            f"{r['rows_per_s']:,.0f} texts/s over the forwards")
    finally:
        remove_checkouts(codes, tmp)
    table = summarise(runs, len(texts))
    result = {"machine": harness.machine_info(), "corpus": corpus.describe(), "model": model_desc,
              "baseline": args.baseline, "tokens_per_s": args.tokens_per_s, "runs": runs, "summary": table}
    (args.out / "stages.json").write_text(json.dumps(result, indent=1))
    print(markdown(table, list(codes), len(texts), corpus.name, args.repeats))
    return 0


def summarise(runs: dict[str, list[dict[str, Any]]], n: int) -> dict[str, dict[str, float]]:
    """us CPU per text by stage and code (median over repeats), with the whole worker's as 'total'."""
    out: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        stage_names = {k for r in rs for k in r["stages"]}
        for stage in stage_names:
            out.setdefault(stage, {})[name] = statistics.median(
                r["stages"].get(stage, {}).get("us_per_text", 0.0) for r in rs)
        out.setdefault("total (worker process CPU)", {})[name] = statistics.median(1e6 * r["cpu_s"] / n for r in rs)
        out.setdefault("texts/s over the forwards", {})[name] = statistics.median(r["rows_per_s"] for r in rs)
    return out


def markdown(table: dict[str, dict[str, float]], codes: list[str], n: int, corpus: str, repeats: int) -> str:
    lines = [f"{n} texts of {corpus}, stream jobs of 64 queued first, one burst worker, simulated device with "
             f"no wait; us of CPU per text, medians of {repeats} interleaved repeats.", "",
             "| stage | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    last = ("total (worker process CPU)", "texts/s over the forwards")
    order = sorted((k for k in table if k not in last), key=lambda k: -max(table[k].values()))
    for stage in [*order, *last]:
        fmt = "{:,.0f}" if stage == last[1] else "{:.1f}"
        lines.append(f"| {stage} | " + " | ".join(fmt.format(table[stage].get(c, 0.0)) for c in codes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
