"""`make bench` for two versions of the code in one invocation: its ratios side by side.

A structural change keeps behaviour; this shows it does on the main benchmark. The old code is
checked out in a git worktree and each checkout's own ``benchmarks/run.py`` measures it (its
workers run with that checkout first on ``PYTHONPATH``); the two alternate, repeat by repeat, so the
machine's drift falls on both alike::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ab.py --baseline HEAD~1 [--repeats 2] -- --quick

Arguments after ``--`` go to both ``run.py``s. Writes ``OUT/ab.json`` and ``OUT/ab.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.simdevice import checkouts, remove_checkouts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git ref of the old code")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.BENCH_DIR / "results")
    args = parser.parse_args(own)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qb-ab-"))
    codes = checkouts(args.baseline, tmp)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    try:
        for rep in range(args.repeats):
            for name, code in codes.items():
                out = tmp / f"{name}-r{rep}"
                harness.say(f"repeat {rep}: {name} ({code})")
                proc = subprocess.run([sys.executable, str(code / "benchmarks" / "run.py"), "--out", str(out), *passed],
                                      cwd=code, check=False)
                if not (out / "results.json").exists():
                    raise RuntimeError(f"{name}: run.py exited with {proc.returncode} and wrote no results")
                runs[name].append(json.loads((out / "results.json").read_text()))
    finally:
        remove_checkouts(codes, tmp)
    table = side_by_side(runs)
    md = markdown(table, args.baseline, args.repeats, passed)
    (args.out / "ab.json").write_text(json.dumps({"baseline": args.baseline, "args": passed, "table": table,
                                                  "machine": harness.machine_info()}, indent=1))
    (args.out / "ab.md").write_text(md)
    print(md)
    return 0


def side_by_side(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Each ratio and each row's texts/s: the median over repeats per code, and new/old."""
    def values(res: dict[str, Any]) -> dict[str, float]:
        out = {k: v for k, v in res["ratios"].items() if isinstance(v, (int, float))}
        out.update({f"{k} (texts/s)": row["texts_per_s"] for k, row in res["throughput"].items()
                    if isinstance(row, dict) and row.get("texts_per_s")})
        return out

    per_code = {name: [values(r) for r in results] for name, results in runs.items()}
    keys = sorted({k for vals in per_code.values() for v in vals for k in v})
    table: dict[str, dict[str, float | None]] = {}
    for key in keys:
        row: dict[str, float | None] = {}
        for name, vals in per_code.items():
            got = [v[key] for v in vals if key in v]
            row[name] = statistics.median(got) if got else None
        old, new = row.get("old"), row.get("new")
        row["new/old"] = round(new / old, 3) if old and new else None
        table[key] = row
    return table


def markdown(table: dict[str, dict[str, float | None]], baseline: str, repeats: int, passed: list[str]) -> str:
    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"

    lines = [f"`benchmarks/run.py {' '.join(passed)}` for old ({baseline}) and new, alternating, medians of "
             f"{repeats} repeat(s).", "", "| | old | new | new/old |", "|---|---|---|---|"]
    lines += [f"| {k} | {cell(r['old'])} | {cell(r['new'])} | {cell(r['new/old'])} |" for k, r in table.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
