"""queuebert over HTTP and from asyncio: the gateway, Infinity's own server and the two clients,
on the same model and texts, in one invocation.

    python benchmarks/http_bench.py            # 1000 texts, 5 interleaved repeats (~8 min on 2 cores)
    python benchmarks/http_bench.py --quick    # 300 texts, 5 repeats (~3 min; + ~2 min the first
                                               # time, to install Infinity into its own venv)

Rows (one worker process behind every queue row; servers started and warmed before any clock):

  h0   Engine.classify in-process over all N texts at once (the worker's batching, auto dtype):
       the limit when every text is known up front, so the engine sorts all N by length
  h0b  the same Engine on consecutive groups of 32 texts: the in-process limit of one-text
       traffic at concurrency 32, where only 32 texts are ever in flight (the h1 target's
       denominator: no server, in-process or not, can sort texts it has not been sent)
  h1   one-text HTTP requests at concurrency 32 (32 keep-alive connections of a minimal HTTP/1.1
       client, see _Connection; POST /predict {"inputs": text}) through ``queuebert serve`` (its
       own process) + one ``queuebert worker`` process
  h1c  the same at concurrency 256 (how close the gateway comes to h0 when the load gives the
       worker texts to sort)
  h2   the same requests against Infinity's own HTTP server (``infinity_emb v2``, POST /classify
       {"input": [text]}) serving the same model directory in the same dtype; installed into a
       venv of its own under the cache dir if absent (torch pinned to this environment's)
  h3   AsyncClient one-text jobs: 32 coroutines doing ``await client.submit(t)`` and
       ``await handle.result()`` (coalesced into shared jobs)
  h4   Client one-text jobs: 32 threads doing ``client.submit(t).result()``, what a synchronous
       service (a thread per request) does; each submit is a job of its own
  h5   Redis time per text at concurrency 64: INFO commandstats (usec and calls summed over every
       command) before and after N one-text requests through the gateway, over N; the same for
       AsyncClient directly (64 coroutines) and for Client.submit one-text jobs (64 threads, no
       coalescing); with the redis-server process's own CPU time per text beside it

h0, h0b, h1, h1c, h2, h3 and h4 run interleaved (each repeat in a rotated order) and each row is the
median run. During every run the CPU time (utime + stime, /proc) of each process is read before
and after: this benchmark process (the load generator, or the Engine for h0), the gateway, the
worker, redis-server, Infinity, and the rest of the machine. Results: OUT/http.json and OUT/http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpus import generate, read_jsonl
from benchmarks.harness import (
    BENCH_DIR,
    PY,
    Procs,
    batch_stats,
    batch_worker_cmd,
    elapsed,
    loadavg,
    log_mark,
    machine_info,
    new_redis,
    perf,
    prepare_model,
    say,
    summary_ms,
    wait_registered,
    worker_name,
)

CONCURRENCY = 32
WIDE_CONCURRENCY = 256
REDIS_CONCURRENCY = 64
#: Infinity's package and the extras that bring its server and its torch engine (transformers).
INFINITY_REQUIREMENT = "infinity-emb[torch,server]"
#: Bounds on getting Infinity: a failed or hung step skips h2 with its reason, the rest still runs.
INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 300.0
GATEWAY_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0

# ------------------------------------------------------------------------------------------------
# CPU accounting from /proc
# ------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (a worker's or a server's own children count as it)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime + stime of ``pid`` (all its threads) and, with ``tree``, of its descendants, in seconds."""
    total = 0
    for p in _descendants(pid) if tree else [pid]:
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), every process counted."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user and nice
    return (sum(values) - idle - guest) / CLK_TCK


class CpuMeter:
    """CPU seconds each named process used during a ``with`` block, the machine's total, and
    what the rest of the machine (other people's processes here) used in the same time.

    Each process counts with its descendants, except this one: every server and worker of the
    benchmark is its child, and is counted under its own name."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.result: dict[str, Any] = {}

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, tree=pid != os.getpid()) for name, pid in self.pids.items()}

    def __enter__(self) -> Self:
        self._before = self._read()
        self._busy = machine_busy_seconds()
        self._t = perf()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = perf() - self._t
        after = self._read()
        used = {name: round(after[name] - self._before[name], 3) for name in self.pids}
        busy = machine_busy_seconds() - self._busy
        self.result = {"wall_s": round(wall, 3), "cpu_s": used, "machine_busy_s": round(busy, 3),
                       "others_s": round(max(0.0, busy - sum(used.values())), 3)}


# ------------------------------------------------------------------------------------------------
# load generators
# ------------------------------------------------------------------------------------------------


def _top_label(scores: list[dict[str, Any]]) -> str:
    return max(scores, key=lambda s: s["score"])["label"]


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST JSON and
    read a Content-Length or chunked reply. The load generator shares 2 cores with the servers it
    measures, so it must cost little: httpx took ~1.9 ms of CPU per request here, which the worker
    then did not have; this takes a small fraction of that. Both servers get the same client."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), self.port,
                                                              len(payload), payload))
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        if chunked:
            body = b""
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                body += await self.reader.readexactly(size + 2)
                body = body[:-2]
            await self.reader.readline()
        else:
            body = await self.reader.readexactly(length or 0)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            await writer.wait_closed()


async def _http_load(base_url: str, path: str, texts: list[str], concurrency: int,
                     body: Callable[[str], dict[str, Any]], top: Callable[[Any], str]) -> dict[str, Any]:
    """``concurrency`` connections, each sending one text per request until the texts are used up."""
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    labels: list[str | None] = [None] * len(texts)
    latencies: list[float] = []
    errors: list[str] = []
    todo = iter(range(len(texts)))
    connections = [_Connection(url.hostname or "127.0.0.1", url.port or 80) for _ in range(concurrency)]

    async def one_at_a_time(http: _Connection) -> None:
        for i in todo:
            payload = json.dumps(body(texts[i])).encode()
            t = perf()
            status, reply = await asyncio.wait_for(http.post(path, payload), REQUEST_TIMEOUT_S)
            latencies.append(perf() - t)
            if status != 200:
                errors.append(f"{status} {reply[:200].decode(errors='replace')}")
                continue
            labels[i] = top(json.loads(reply))

    t0 = perf()
    try:
        await asyncio.gather(*(one_at_a_time(c) for c in connections))
        seconds = perf() - t0
    finally:
        for c in connections:
            await c.close()
    return {"seconds": seconds, "labels": labels, "latencies": latencies, "errors": errors}


def gateway_load(url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    return asyncio.run(_http_load(url, "/predict", texts, concurrency, lambda t: {"inputs": t}, _top_label))


def infinity_load(url: str, model: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    return asyncio.run(_http_load(url, "/classify", texts, concurrency, lambda t: {"input": [t], "model": model},
                                  lambda r: _top_label(r["data"][0])))


async def _async_client_load(redis_url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    from producer.async_client import AsyncClient

    labels: list[str | None] = [None] * len(texts)
    latencies: list[float] = []
    todo = iter(range(len(texts)))
    async with AsyncClient.from_url(redis_url) as client:

        async def one_at_a_time() -> None:
            for i in todo:
                t = perf()
                handle = await client.submit(texts[i])
                result = await handle.result(timeout=REQUEST_TIMEOUT_S)
                latencies.append(perf() - t)
                labels[i] = result.get("label") if result else None

        t0 = perf()
        await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
        seconds = perf() - t0
        coalesced = client.coalesced
    return {"seconds": seconds, "labels": labels, "latencies": latencies, "errors": [], "coalesced": coalesced}


def async_client_load(redis_url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    return asyncio.run(_async_client_load(redis_url, texts, concurrency))


def sync_client_load(redis_url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    """``concurrency`` threads, each submitting one text and waiting for its result, in turn."""
    from producer.client import Client

    client = Client.from_url(redis_url)
    labels: list[str | None] = [None] * len(texts)
    latencies: list[float] = []
    todo = iter(range(len(texts)))
    lock = threading.Lock()

    def one_at_a_time() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t = perf()
            result = client.submit(texts[i]).result(timeout=REQUEST_TIMEOUT_S)
            latencies.append(perf() - t)
            labels[i] = result.get("label") if result else None

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        t0 = perf()
        for f in [pool.submit(one_at_a_time) for _ in range(concurrency)]:
            f.result()
        seconds = perf() - t0
    client.connection.close()
    return {"seconds": seconds, "labels": labels, "latencies": latencies, "errors": []}


# ------------------------------------------------------------------------------------------------
# Infinity: its own venv, its own server
# ------------------------------------------------------------------------------------------------


class Skip(Exception):
    """Why a row cannot run (recorded in place of the row; the benchmark goes on)."""


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    for ln in reversed(lines):
        if ln.startswith("ERROR") or "Error" in ln or "error:" in ln:
            return ln
    return lines[-1] if lines else "(no output)"


def _run(cmd: list[str], deadline: float, what: str) -> str:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Skip(f"{what}: no time left of the {INSTALL_TIMEOUT_S:.0f} s allowed for the install")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        raise Skip(f"{what}: still running after {INSTALL_TIMEOUT_S:.0f} s in all ({' '.join(cmd[:6])} ...)") from None
    if done.returncode != 0:
        raise Skip(f"{what} failed (exit {done.returncode}): {_last_error_line(done.stdout + done.stderr)}")
    return done.stdout


def ensure_infinity(venv: Path) -> dict[str, Any]:
    """Infinity in ``venv``, installed there if it is not yet: torch first, pinned to this
    environment's version (an unpinned torch would pull a multi-GB CUDA build), then Infinity
    with a constraints file that keeps it; a dry run is checked first. Raises Skip with the reason."""
    import torch

    py = venv / "bin" / "python"
    probe = "import importlib.metadata as m; import json; print(json.dumps({p: m.version(p) for p in " \
            "('infinity_emb', 'torch', 'transformers', 'uvicorn', 'fastapi')}))"
    if (venv / "bin" / "infinity_emb").exists():
        try:
            out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120, check=True)
            return {"venv": str(venv), "installed_now": False, "versions": json.loads(out.stdout)}
        except (subprocess.SubprocessError, ValueError) as exc:
            say(f"  Infinity venv at {venv} is unusable ({exc!r}); installing it again")
            shutil.rmtree(venv, ignore_errors=True)
    torch_pin = torch.__version__.split("+")[0]
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    started = perf()
    say(f"  installing {INFINITY_REQUIREMENT} into {venv} (torch=={torch_pin})")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([PY, "-m", "venv", "--clear", str(venv)], deadline, "creating the venv")
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_pin}\n")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "install", "-c", str(constraints)]
    report = venv / "dry-run.json"
    _run(pip + ["--dry-run", "--quiet", "--report", str(report), f"torch=={torch_pin}", INFINITY_REQUIREMENT],
         deadline, "pip install --dry-run")
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}
    cuda = sorted(n for n in planned if n.startswith("nvidia-"))
    if planned.get("torch", torch_pin).split("+")[0] != torch_pin or cuda:
        raise Skip(f"the dry run would install torch {planned.get('torch')} and {cuda or 'no'} CUDA packages; "
                   f"expected torch=={torch_pin} and none")
    _run(pip + [f"torch=={torch_pin}"], deadline, f"pip install torch=={torch_pin}")
    _run(pip + [INFINITY_REQUIREMENT], deadline, f"pip install {INFINITY_REQUIREMENT}")
    versions = _run([str(py), "-c", probe], deadline, "importing infinity_emb")
    return {"venv": str(venv), "installed_now": True, "install_s": round(perf() - started, 1),
            "versions": json.loads(versions)}


def infinity_cmd(venv: Path, model_dir: Path, name: str, port: int, dtype: str, batch_size: int) -> list[str]:
    """Infinity's v2 CLI with the torch engine on the CPU, in the dtype the worker resolves
    ``auto`` to; no torch.compile (it needs a compiler and minutes) and no BetterTransformer
    (needs optimum, which is not installed): plain eager transformers, as the worker runs."""
    return [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", "cpu", "--dtype", dtype,
            "--batch-size", str(batch_size), "--no-compile", "--no-bettertransformer", "--log-level", "warning"]


def wait_http_ok(url: str, procs: Procs, proc: Any, timeout: float, what: str) -> float:
    """Poll GET ``url`` until 200; raise Skip (the process's log tail) if it dies or times out."""
    import httpx

    started = perf()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"{what} exited with {proc.returncode} while starting: {_log_tail(proc)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return perf() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise Skip(f"{what} did not answer 200 on {url} within {timeout:.0f} s: {_log_tail(proc)}")


def _log_tail(proc: Any) -> str:
    try:
        return _last_error_line(Path(proc.log_path).read_text(errors="replace")[-4000:])
    except (OSError, TypeError):
        return "(no log)"


# ------------------------------------------------------------------------------------------------
# Redis time per text
# ------------------------------------------------------------------------------------------------


def commandstats(conn: Any) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` from INFO commandstats (INFO itself left out: it is ours)."""
    stats = conn.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()
            if k != "cmdstat_info"}


def redis_cost(conn: Any, pids: dict[str, int], n: int, idle_usec_per_s: float,
               fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Redis work per text while ``fn`` sends ``n`` texts: commandstats (every client's commands,
    the worker's included; commands that Lua scripts call are counted both in EVALSHA's time and
    on their own, as Redis counts them), the server's CPU time, and the jobs the workers completed
    (RQ's ``successful_job_count``: the gateway removes its runs from ``qb:runs`` once answered, so
    that index no longer counts them)."""
    def jobs_done() -> int:
        return sum(int(conn.hget(w, "successful_job_count") or 0) for w in conn.smembers("rq:workers"))

    before, runs0 = commandstats(conn), jobs_done()
    with CpuMeter(pids) as meter:
        run = fn()
    after, runs1 = commandstats(conn), jobs_done()
    wall, redis_cpu = meter.result["wall_s"], meter.result["cpu_s"]["redis"]
    delta = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1]) for k, (c, u) in after.items()}
    calls = sum(c for c, _ in delta.values())
    usec = sum(u for _, u in delta.values())
    top = sorted(((u, c, k) for k, (c, u) in delta.items() if c), reverse=True)[:8]
    return {"texts": n, "seconds": round(run["seconds"], 3), "texts_per_s": round(n / run["seconds"], 1),
            "redis_usec_per_text": round(usec / n, 1),
            "redis_usec_per_text_less_idle": round((usec - idle_usec_per_s * wall) / n, 1),
            "redis_calls_per_text": round(calls / n, 2),
            "redis_server_cpu_usec_per_text": round(redis_cpu * 1e6 / n, 1),
            "others_cores": round(meter.result["others_s"] / wall, 2),
            "jobs": runs1 - runs0, "texts_per_job": round(n / (runs1 - runs0), 2) if runs1 > runs0 else None,
            "top_commands": [{"command": k, "calls": c, "usec": u} for u, c, k in top]}


# ------------------------------------------------------------------------------------------------
# the invocation
# ------------------------------------------------------------------------------------------------


ROWS = {
    "h0": "Engine.classify in-process, all texts (the limit)",
    "h0b": "Engine.classify in-process, groups of 32 (limit at 32 in flight)",
    "h1": "queuebert serve + 1 worker: POST /predict, 1 text, concurrency 32",
    "h1c": "queuebert serve + 1 worker: POST /predict, 1 text, concurrency 256",
    "h1-old": "--baseline's queuebert serve, same worker: POST /predict, 1 text, concurrency 32",
    "h1c-old": "--baseline's queuebert serve, same worker: POST /predict, 1 text, concurrency 256",
    "h2": "Infinity server (infinity_emb v2): POST /classify, 1 text, concurrency 32",
    "h3": "AsyncClient: 32 coroutines, submit + result, 1 text each",
    "h4": "Client: 32 threads, submit + result, 1 text each",
}


class HttpBench:
    """One invocation: its processes (worker, gateway, Infinity), its rows and its results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="queuebert-bench-http-"))
        self.logdir = self.out / "http-logs"
        shutil.rmtree(self.logdir, ignore_errors=True)
        self.logdir.mkdir(parents=True)
        self.procs = Procs(self.logdir)
        self.results: dict[str, Any] = {"machine": machine_info(), "rows": {}, "skipped": {}, "errors": {},
                                        "baseline": args.baseline}
        #: --baseline's checkout (a git worktree), whose gateway runs the h1-old rows.
        self.old: Path | None = None
        if args.baseline:
            from benchmarks.simdevice import checkouts

            self.old = checkouts(args.baseline, self.tmp)["old"]

    def save(self) -> None:
        (self.out / "http.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def run(self) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from producer.client import Client
        from queuebert import logs
        from queuebert.procs import free_port
        from queuebert.schema import Item
        from queuebert.settings import WorkerSettings
        from worker.engine import BatchStats, Engine
        from worker.model import load_model, resolve_dtype

        logs.configure("console", "warning")
        hf_logging.set_verbosity_error()
        a = self.args
        corpus = read_jsonl(Path(a.data), a.texts) if a.data else generate(a.texts, a.seed)
        texts = corpus.texts
        n = len(texts)
        model_dir, model_desc = prepare_model(self.tmp)
        ws = WorkerSettings()
        auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        m = self.results["machine"]
        self.results["settings"] = {
            "texts": n, "repeats": a.repeats, "quick": a.quick, "corpus": corpus.describe(),
            "model_dir": str(model_dir), "model": model_desc, "auto_dtype_resolves_to": auto,
            "concurrency": CONCURRENCY, "wide_concurrency": WIDE_CONCURRENCY, "redis_concurrency": REDIS_CONCURRENCY,
            "worker_defaults": {"max_batch_size": ws.max_batch_size, "max_batch_tokens": ws.max_batch_tokens,
                                "max_wait_ms": ws.max_wait_ms},
            "gateway_server": _uvicorn_impl(PY)}
        say(f"{n} texts, {a.repeats} repeats; {m['cpu_model']}, {m['cores']} cores, bf16 flags "
            f"{m['cpu_flags_bf16']}; auto dtype -> {auto}; loadavg {m['loadavg_at_start']}")

        # -- Infinity's venv (installed before any clock) -------------------------------------------
        infinity: dict[str, Any] | None = None
        if a.no_infinity:
            self.results["skipped"]["h2"] = "--no-infinity"
        else:
            try:
                infinity = ensure_infinity(Path(a.infinity_venv))
                self.results["infinity"] = infinity
                say(f"  Infinity: {infinity['versions']} in {infinity['venv']}")
            except Skip as exc:
                self.results["skipped"]["h2"] = str(exc)
                say(f"  !! h2 skipped: {exc}")
        self.save()

        # -- the in-process limit -----------------------------------------------------------------
        engine = Engine(load_model(str(model_dir), device="cpu", dtype="auto"), ws.max_batch_size, ws.max_batch_tokens)
        items: list[Item] = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
        engine.classify(items[:CONCURRENCY])
        reference = [r["label"] for r in engine.classify(items)]

        def engine_stats(stats: BatchStats, seconds: float) -> dict[str, Any]:
            return {"batches": stats.batches, "texts_per_batch_mean": round(stats.texts / max(1, stats.batches), 1),
                    "padding_ratio": round(stats.padding_ratio, 3),
                    "forward_share": round(stats.forward_seconds / seconds, 3)}

        def h0() -> dict[str, Any]:
            stats = BatchStats()
            t = perf()
            labels = [r["label"] for r in engine.classify(items, stats=stats)]
            seconds = perf() - t
            return {"seconds": seconds, "labels": labels, "errors": [], "batching": engine_stats(stats, seconds)}

        def h0b() -> dict[str, Any]:
            stats = BatchStats()
            t = perf()
            labels = []
            for i in range(0, n, CONCURRENCY):
                labels += [r["label"] for r in engine.classify(items[i:i + CONCURRENCY], stats=stats)]
            seconds = perf() - t
            return {"seconds": seconds, "labels": labels, "errors": [], "batching": engine_stats(stats, seconds)}

        with new_redis() as srv:
            conn = Client.from_url(srv.url).connection
            name = worker_name("http")
            worker = self.procs.start("worker", batch_worker_cmd(srv.url, model_dir, "auto", name=name))
            wait_registered(conn, [name], self.procs)
            gw_port = free_port()
            gateway = self.procs.start("gateway", [PY, "-m", "queuebert_cli", "serve", "--host", "127.0.0.1",
                                                   "--port", str(gw_port), "--redis-url", srv.url])
            gw_url = f"http://127.0.0.1:{gw_port}"
            try:
                wait_http_ok(f"{gw_url}/health", self.procs, gateway, GATEWAY_START_TIMEOUT_S, "queuebert serve")
            except Skip as exc:
                raise RuntimeError(str(exc)) from None
            pids = {"bench": os.getpid(), "gateway": gateway.pid, "worker": worker.pid,
                    "redis": srv.process.pid}
            old_url = None
            if self.old is not None:
                # The old code's gateway beside the new one, behind the same worker and queue: the
                # rows alternate, so only the gateway differs between h1 and h1-old.
                old_port = free_port()
                # The command line moved from queuebert.cli to queuebert_cli: run whichever the checkout has.
                cli = "queuebert_cli" if (self.old / "queuebert_cli").is_dir() else "queuebert.cli"
                old_gw = self.procs.start("gateway-old", [PY, "-m", cli, "serve", "--host", "127.0.0.1",
                                                          "--port", str(old_port), "--redis-url", srv.url],
                                          code=self.old)
                old_url = f"http://127.0.0.1:{old_port}"
                wait_http_ok(f"{old_url}/health", self.procs, old_gw, GATEWAY_START_TIMEOUT_S, "old queuebert serve")
                pids["gateway_old"] = old_gw.pid
            runners: dict[str, Callable[[], dict[str, Any]]] = {
                "h0": h0, "h0b": h0b,
                "h1": lambda: gateway_load(gw_url, texts, CONCURRENCY),
                "h1c": lambda: gateway_load(gw_url, texts, WIDE_CONCURRENCY),
                "h3": lambda: async_client_load(srv.url, texts, CONCURRENCY),
                "h4": lambda: sync_client_load(srv.url, texts, CONCURRENCY),
            }
            if old_url is not None:
                runners["h1-old"] = lambda: gateway_load(old_url, texts, CONCURRENCY)
                runners["h1c-old"] = lambda: gateway_load(old_url, texts, WIDE_CONCURRENCY)
            warm = texts[:2 * CONCURRENCY]
            gateway_load(gw_url, warm, CONCURRENCY)
            if old_url is not None:
                gateway_load(old_url, warm, CONCURRENCY)
            async_client_load(srv.url, warm, CONCURRENCY)
            sync_client_load(srv.url, warm, CONCURRENCY)

            if infinity is not None:
                try:
                    inf_port = free_port()
                    served = "bench-model"
                    # The in-process engine's batch size: what the worker's default (None) resolves to here.
                    cmd = infinity_cmd(Path(infinity["venv"]), model_dir, served, inf_port, auto, engine.max_batch_size)
                    inf = self.procs.start("infinity", cmd, {"PYTHONPATH": "", "DO_NOT_TRACK": "1",
                                                             "INFINITY_ANONYMOUS_USAGE_STATS": "0"})
                    inf_url = f"http://127.0.0.1:{inf_port}"
                    infinity["start_s"] = round(wait_http_ok(f"{inf_url}/health", self.procs, inf, START_TIMEOUT_S,
                                                             "infinity_emb v2"), 1)
                    infinity_load(inf_url, served, warm, CONCURRENCY)
                    pids["infinity"] = inf.pid
                    runners["h2"] = lambda: infinity_load(inf_url, served, texts, CONCURRENCY)
                    say(f"  Infinity serving on {inf_url} (started in {infinity['start_s']} s)")
                except Exception as exc:  # noqa: BLE001 -- whatever stops Infinity starting or answering skips its row
                    self.results["skipped"]["h2"] = f"{type(exc).__name__}: {exc}"
                    say(f"  !! h2 skipped: {exc}")

            # -- the interleaved rows -------------------------------------------------------------
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
            order = [k for k in ROWS if k in runners]
            for r in range(a.repeats):
                rotated = order[r % len(order):] + order[:r % len(order)]
                for key in rotated:
                    mark = log_mark(worker)
                    with CpuMeter(pids) as meter:
                        got = runners[key]()
                    got.update(meter.result, loadavg=loadavg())
                    if key in ("h1", "h1c", "h1-old", "h1c-old", "h3", "h4"):
                        # the worker's batch log lines of this run
                        got["batching"] = batch_stats(worker, mark)
                    runs[key].append(got)
                say(f"  repeat {r + 1}/{a.repeats}: " + ", ".join(
                    f"{k} {n / runs[k][-1]['seconds']:.1f}" for k in order) + " texts/s")
            for key in order:
                self.results["rows"][key] = _row(key, runs[key], n, reference)
            self.save()

            # -- Redis time per text at concurrency 64 ---------------------------------------------
            idle0, time0 = commandstats(conn), perf()
            time.sleep(1.0)
            idle1, idle_s = commandstats(conn), perf() - time0
            idle = (sum(u for _, u in idle1.values()) - sum(u for _, u in idle0.values())) / idle_s
            h5: dict[str, Any] = {"idle_redis_usec_per_s": round(idle, 1)}
            loads = {"gateway": lambda: gateway_load(gw_url, texts, REDIS_CONCURRENCY),
                     **({"gateway_old": lambda: gateway_load(old_url, texts, REDIS_CONCURRENCY)} if old_url else {}),
                     "async_client": lambda: async_client_load(srv.url, texts, REDIS_CONCURRENCY),
                     "client_submit": lambda: sync_client_load(srv.url, texts, REDIS_CONCURRENCY)}
            costs: dict[str, list[dict[str, Any]]] = {k: [] for k in loads}
            for _ in range(a.h5_repeats):
                for key, load in loads.items():
                    costs[key].append(redis_cost(conn, pids, n, idle, load))
            for key, each in costs.items():
                h5[key] = _median_by(each, "redis_usec_per_text")
            self.results["h5_redis_per_text"] = h5
            say(f"  h5 Redis per text at concurrency {REDIS_CONCURRENCY}: " + "; ".join(
                f"{k} {h5[k]['redis_usec_per_text']} us, {h5[k]['redis_calls_per_text']} calls" for k in loads))
            self.procs.stop_all()

        rows = self.results["rows"]

        def ratio(x: str, y: str) -> float | None:
            if x in rows and y in rows:
                return round(rows[x]["texts_per_s"] / rows[y]["texts_per_s"], 3)
            return None

        def paired(x: str, y: str) -> dict[str, Any] | None:
            """The ratio within each repeat, whose rows ran minutes apart at most: this machine's
            speed drifts by up to 1.5x over a run, which a ratio of medians takes in whole."""
            if x not in rows or y not in rows:
                return None
            each = [round(a / b, 3) for a, b in zip(rows[x]["runs_texts_per_s"], rows[y]["runs_texts_per_s"])]
            return {"median": sorted(each)[len(each) // 2], "runs": each}

        ratios = [("h1", "h0b", "gateway vs the in-process limit at the same 32 in flight; target >= 0.9"),
                  ("h1", "h0", "gateway at 32 in flight vs the Engine given all texts at once"),
                  ("h1c", "h0", "gateway at 256 in flight vs the Engine given all texts at once"),
                  ("h1", "h2", "gateway vs Infinity's server"),
                  ("h1", "h1-old", "gateway, new code vs --baseline, concurrency 32"),
                  ("h1c", "h1c-old", "gateway, new code vs --baseline, concurrency 256"),
                  ("h3", "h4", "AsyncClient vs Client, one-text jobs"),
                  ("h3", "h0", "AsyncClient vs in-process limit")]
        self.results["ratios"] = {f"{x}/{y} ({what})": ratio(x, y) for x, y, what in ratios}
        self.results["paired_ratios"] = {f"{x}/{y} ({what})": paired(x, y) for x, y, what in ratios}

    def close(self) -> None:
        self.procs.stop_all()
        if self.old is not None:
            from benchmarks.simdevice import remove_checkouts

            remove_checkouts({"old": self.old}, self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _uvicorn_impl(python: str) -> dict[str, str]:
    """Which event loop and HTTP parser uvicorn picks in ``python`` ('auto': uvloop and
    httptools when installed, else asyncio and h11)."""
    code = ("import importlib.util as u, uvicorn; print(uvicorn.__version__, "
            "'uvloop' if u.find_spec('uvloop') else 'asyncio', 'httptools' if u.find_spec('httptools') else 'h11')")
    try:
        version, loop, http = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                                             check=True).stdout.split()
    except (subprocess.SubprocessError, ValueError):
        return {}
    return {"uvicorn": version, "loop": loop, "http": http}


def _median_by(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], "runs": [r[key] for r in runs]}


def _row(key: str, runs: list[dict[str, Any]], n: int, reference: list[str]) -> dict[str, Any]:
    """The median run of a row, with its per-process CPU as cores busy (CPU seconds / wall)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    med = ordered[len(ordered) // 2]
    latencies = [x for r in runs for x in r.get("latencies", [])]
    agree = sum(a == b for a, b in zip(med["labels"], reference))
    cores = {name: round(s / med["wall_s"], 2) for name, s in med["cpu_s"].items()}
    cores["others"] = round(med["others_s"] / med["wall_s"], 2)
    cores["machine"] = round(med["machine_busy_s"] / med["wall_s"], 2)
    row = {"row": key, "what": ROWS[key], "texts": n, "seconds": round(med["seconds"], 3),
           "texts_per_s": round(n / med["seconds"], 1),
           "runs_texts_per_s": [round(n / r["seconds"], 1) for r in runs],
           "runs_others_cores": [round(r["others_s"] / r["wall_s"], 2) for r in runs],
           "cores_busy": cores, "cpu_ms_per_text": {k: round(v * 1000 / n, 2) for k, v in med["cpu_s"].items()},
           "loadavg": med["loadavg"], "errors": sum(len(r["errors"]) for r in runs),
           "label_agreement_with_h0": round(agree / n, 4)}
    if latencies:
        row["latency"] = summary_ms(latencies)
    if "batching" in med:
        row["batching"] = med["batching"]
    if "coalesced" in med:
        c = med["coalesced"]
        row["coalesced"] = {**c, "items_per_job": round(c["items"] / c["jobs"], 1) if c["jobs"] else None}
    if med["errors"]:
        row["first_error"] = med["errors"][0]
    return row


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    if "settings" not in results:
        return "HTTP benchmark failed before its first row; see errors in http.json\n"
    m, s = results["machine"], results["settings"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags_bf16"].items())
    inf = results.get("infinity", {}).get("versions", {})
    gw = s.get("gateway_server", {})
    infinity = (f"; Infinity {inf.get('infinity_emb')} (torch {inf.get('torch')}, transformers "
                f"{inf.get('transformers')}, uvicorn {inf.get('uvicorn')})") if inf else ""
    head = (f"HTTP benchmark ({m['date']}): {s['texts']} texts ({s['corpus']['name']}, sha256 "
            f"{s['corpus']['sha256'][:12]}), {s['repeats']} interleaved repeats, each row the median run; "
            f"model {s['model']}; auto dtype = {s['auto_dtype_resolves_to']}.")
    machine = (f"Machine: {m['cpu_model']}, {m['cores']} cores ({flags}), torch {m['torch']}, "
               f"transformers {m['transformers']}; loadavg at start {m['loadavg_at_start']}. "
               f"Gateway: uvicorn {gw.get('uvicorn', '?')} ({gw.get('loop', '?')}, {gw.get('http', '?')}){infinity}.")
    header = ("| row | what | texts/s | runs (others' cores) | p50 / p99 ms | cores busy: bench, gateway, worker, "
              "redis, infinity, others (machine) | texts/forward, padding | labels = h0 |")
    lines = [head, machine, "", header, "|---|---|---:|---|---|---|---|---:|"]
    for key, what in ROWS.items():
        r = results["rows"].get(key)
        if r is None:
            reason = results["skipped"].get(key) or "not run"
            lines.append(f"| {key} | {what} | skipped: {reason} | | | | | |")
            continue
        c = r["cores_busy"]
        gateway_busy = c.get("gateway_old", "-") if key.endswith("-old") else c.get("gateway", "-")
        busy = ", ".join(str(gateway_busy if k == "gateway" else c.get(k, "-"))
                         for k in ("bench", "gateway", "worker", "redis", "infinity", "others"))
        lat = r.get("latency", {})
        lat_s = f"{lat['p50_ms']} / {lat['p99_ms']}" if lat else ""
        b = r.get("batching") or {}
        batching = f"{b['texts_per_batch_mean']}, {b['padding_ratio']}" if b else ""
        each = ", ".join(f"{x} ({o})" for x, o in zip(r["runs_texts_per_s"], r["runs_others_cores"]))
        lines.append(f"| {key} | {what} | {r['texts_per_s']} | {each} | {lat_s} | {busy} "
                     f"({c['machine']}) | {batching} | {r['label_agreement_with_h0']} |")
    h5 = results.get("h5_redis_per_text")
    if h5:
        title = (f"h5: Redis work per text, {s['texts']} one-text requests at concurrency "
                 f"{s['redis_concurrency']} (idle: {h5['idle_redis_usec_per_s']} us of Redis time per second)")
        header = ("| path | Redis usec/text (commandstats) | less idle | calls/text | texts/job | "
                  "redis-server CPU usec/text | texts/s (others' cores) |")
        lines += ["", title, "", header, "|---|---:|---:|---:|---:|---:|---:|"]
        for key, what in (("gateway", "gateway POST /predict (coalesced by the gateway's AsyncClient)"),
                          ("gateway_old", "--baseline's gateway, the same requests"),
                          ("async_client", "AsyncClient submit + result, 64 coroutines (coalesced)"),
                          ("client_submit", "Client.submit one-text jobs, 64 threads (no coalescing)")):
            h = h5.get(key)
            if h is None:
                continue
            lines.append(f"| {what} | {h['redis_usec_per_text']} | {h['redis_usec_per_text_less_idle']} | "
                         f"{h['redis_calls_per_text']} | {h['texts_per_job']} | "
                         f"{h['redis_server_cpu_usec_per_text']} | {h['texts_per_s']} ({h['others_cores']}) |")
    lines += ["", "| ratio | of the medians | within each repeat: median (runs) |", "|---|---|---|"]
    for k, v in results["ratios"].items():
        p = results.get("paired_ratios", {}).get(k)
        each = f"{p['median']}x ({', '.join(map(str, p['runs']))})" if p else "-"
        lines.append(f"| {k} | {'-' if v is None else f'{v}x'} | {each} |")
    if results["skipped"]:
        lines += [""] + [f"Skipped {k}: {v}" for k, v in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from modelbuild.default_model import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 texts (~3 minutes)")
    parser.add_argument("--texts", type=int, default=None, help="texts per run (default 1000; 300 with --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="output directory (http.json, http.md)")
    parser.add_argument("--data", default=None, help="JSONL of {id, text} instead of the generated corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    parser.add_argument("--infinity-venv", default=str(cache_root() / "bench-venvs" / "infinity"),
                        help="where Infinity is (installed if absent)")
    parser.add_argument("--no-infinity", action="store_true", help="skip h2 (no install, no server)")
    parser.add_argument("--baseline", default=None,
                        help="git ref: also run its gateway (h1-old, h1c-old) behind the same worker, alternating")
    args = parser.parse_args(argv)
    args.texts = args.texts or (300 if args.quick else 1000)
    args.h5_repeats = 3
    bench = HttpBench(args)
    try:
        bench.run()
    except Exception as exc:  # noqa: BLE001 -- any failure is recorded and the report still written
        import traceback

        bench.results["errors"]["run"] = traceback.format_exc()
        say(f"!! failed: {exc!r}")
        bench.results.setdefault("ratios", {})
    finally:
        bench.close()
    bench.results["total_seconds"] = round(elapsed(), 1)
    bench.save()
    md = markdown(bench.results)
    (bench.out / "http.md").write_text(md)
    print()
    print(md)
    say(f"wrote {bench.out / 'http.json'} and {bench.out / 'http.md'}")
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
