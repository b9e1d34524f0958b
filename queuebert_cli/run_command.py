"""``queuebert run INPUT`` (and ``rerank``, ``zero-shot``): the whole path in one command.

Starts a private Redis when no URL is given, starts N worker processes, enqueues INPUT as a run,
streams answers in input order to OUT or stdout (answers received, out of a total, on a
terminal's stderr), and ends with a summary. Every process it started is stopped on every exit
path (normal end, Ctrl-C, SIGTERM, an exception), and its workers die with it even when it is
SIGKILLed (they get SIGTERM from the kernel: Linux's parent-death signal). The three commands
differ only in what a line of input becomes (:func:`source`) and what comes back for it
(:func:`answers`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import structlog

from producer import pairs
from producer.client import Client
from producer.outputs import Output
from producer.protocol import consumed_message
from producer.readers import InputError, guess_format, open_input, read_objects, read_records
from queuebert.connection import connect
from queuebert.procs import LoggedProcess, start_process, stop_processes
from queuebert.settings import WorkerSettings, env_name

from .job_flags import job_options
from .progress import Progress, estimate_records

log = structlog.get_logger(__name__)


class RunFailed(RuntimeError):
    pass


class Terminated(BaseException):
    """SIGTERM arrived: unwinds ``run`` like Ctrl-C's KeyboardInterrupt (so its ExitStack stops the
    workers, then Redis), and ends the command with 143 (128 + SIGTERM), as a shell reports it. A
    BaseException, so no ``except Exception`` on the way swallows it."""

    EXIT_CODE = 128 + signal.SIGTERM


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """While ``run`` runs, SIGTERM (``kill``, a container stop, systemd) raises :class:`Terminated`
    in the main thread; before this, it killed the command at once and its ExitStack never ran.
    Once only: a second SIGTERM during the stop is ignored (the stop is already under way and
    bounded by the workers' grace; SIGKILL still works, and takes the workers with it)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        # No logging here: a handler that wrote to stderr while the interrupted code was writing
        # there would fail (a reentrant call on one buffered stream). The command logs on its way out.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_command(args: argparse.Namespace, url: str, index: int) -> list[str]:
    cmd = [sys.executable, "-m", "queuebert_cli", "worker", "--redis-url", url, "--log-format", "json",
           "--log-level", args.log_level or "warning"]
    for flag in ("model", "revision", "device", "dtype", "max_batch_size", "max_batch_tokens", "max_wait_ms"):
        value = getattr(args, flag, None)
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if args.queue:
        cmd += ["--queue", args.queue]
    return cmd


def _start_workers(args: argparse.Namespace, url: str, stack: ExitStack) -> list[LoggedProcess]:
    """Start ``args.workers`` worker processes; all of them are stopped together when ``stack`` closes."""
    env = dict(os.environ)
    # Several workers on one machine share its cores instead of each claiming all of them.
    if args.workers > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    log_dir = None if args.verbose else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="queuebert-run-")))
    procs: list[LoggedProcess] = []
    # Given SIGTERM, a worker finishes its batch in progress and gives back the rest before it exits;
    # one still running after its grace is killed, and recovery hands its jobs on like any dead worker's.
    stack.callback(stop_processes, procs, WorkerSettings.from_env().stop_grace)  # also those started before a failure
    for i in range(args.workers):
        # Their own session: a Ctrl-C reaches this process, which stops them in order. And they
        # die with it (SIGTERM from the kernel, a graceful stop) however it dies: SIGKILLed, it
        # left them running for ever, re-parented to PID 1, retrying a Redis that died with it.
        # Between fork and exec the child only calls prctl, looked up beforehand (queuebert.procs):
        # the least a preexec_fn can do, where a default-model build may have left threads here.
        procs.append(start_process(_worker_command(args, url, i), env=env, new_session=True, stop_with_parent=True,
                                   log_path=log_dir / f"worker-{i}.log" if log_dir else None))
    return procs


def _check_workers(procs: list[LoggedProcess]) -> None:
    """If every worker has exited (a model that cannot load, say), stop with its message."""
    if procs and all(p.poll() is not None for p in procs):
        detail = ""
        log_path = procs[0].log_path
        stderr = log_path.read_bytes().decode(errors="replace") if log_path is not None else ""
        for line in reversed(stderr.splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") == "error":
                detail = record.get("error") or record.get("event", "")
                break
        raise RunFailed(f"workers exited (code {procs[0].returncode}): {detail or stderr[-500:]}")


def _ensure_model(args: argparse.Namespace) -> None:
    """Build the default model once here, before N workers would each wait for it."""
    model = args.model or WorkerSettings.from_env().model
    try:
        from modelbuild import DEFAULT_MODEL_NAME
        from modelbuild.default_model import ensure_default_model
    except ImportError:
        return
    if model == DEFAULT_MODEL_NAME:
        ensure_default_model(progress=not args.no_progress)


def source(args: argparse.Namespace, stream: Any, errors: list[InputError]) -> Iterator[Any]:
    """What the command enqueues: items (``run``, ``zero-shot``) or queries (``rerank``). A CSV
    header is read here, so a missing column fails before Redis and workers start."""
    if args.command == "rerank":
        return read_objects(stream, on_error=args.on_error, errors=errors)
    items: Iterator[Any] = read_records(stream, _format(args), text_field=args.text_field, id_field=args.id_field,
                                        text_pair_field=args.text_pair_field, on_error=args.on_error, errors=errors)
    if args.command == "zero-shot":
        return (pairs.zero_shot_item(it, args.labels, args.hypothesis_template, args.multi_label) for it in items)
    return items


def _format(args: argparse.Namespace) -> str:
    if args.command == "rerank":
        return "jsonl"
    return args.format or (guess_format(args.input) if args.input != "-" else "txt")


def answers(args: argparse.Namespace, client: Client, inputs: Iterator[Any], run_id: str,
            **streaming: Any) -> Iterator[Mapping[str, Any]]:
    """The command's output lines, in input order: a result per text (``run``), an answer per
    text (``zero-shot``), a ranking per query (``rerank``)."""
    if args.command == "rerank":
        return pairs.rerank_stream(client, inputs, run_id=run_id, top_n=args.top_n, return_text=args.return_text,
                                   label=args.relevance_label, **streaming)
    return pairs.stream_through(client, inputs, run_id=run_id, **streaming, **job_options(args))


def _label(answer: Mapping[str, Any]) -> str | None:
    """What the summary counts: a result's label, a zero-shot answer's best label."""
    if "label" in answer:
        return str(answer["label"])
    if answer.get("labels"):
        return str(answer["labels"][0])
    return None


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse an output that is the input: the results would replace the input they come from."""
    if args.input == "-" or args.output in (None, "-"):
        return
    try:
        same = os.path.samefile(args.input, args.output)
    except OSError:  # one of them does not exist (yet): they cannot be one file
        return
    if same:
        raise RunFailed(f"the output {args.output} is the input {args.input}: writing the results there would "
                        "replace the input; give -o another file")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    url = args.redis_url or os.environ.get(env_name("redis_url"))
    _check_paths(args)
    with ExitStack() as stack:
        stack.enter_context(_terminate_on_sigterm())  # first in, so last out: it covers every stop
        stream = stack.enter_context(open_input(args.input))  # a missing file fails before anything starts
        input_errors: list[InputError] = []
        inputs = source(args, stream, input_errors)
        # Opened before Redis, workers or a model build start, so an output that cannot be written
        # fails at once; an existing file is emptied only at the first result (producer.outputs).
        out = stack.enter_context(Output(args.output or "-"))
        if url is None:
            from producer.embedded_redis import RedisServer

            server = stack.enter_context(RedisServer().start())
            url = server.url
            log.info("started embedded redis", url=url, pid=server.process.pid if server.process else None)
        client = Client(connect(url))
        if args.queue:
            client.settings.queue = args.queue
        if args.redis_full_timeout is not None:
            client.settings.redis_full_timeout = args.redis_full_timeout
        run_id = args.run_id or f"run-{int(time.time())}-{os.getpid()}"
        if args.run_id and client.run_progress(run_id)["consumed"]:
            # Enqueueing it again finds it complete and reads nothing back: an empty output.
            raise RunFailed(consumed_message(run_id))
        if args.workers:
            _ensure_model(args)
        procs = _start_workers(args, url, stack) if args.workers else []
        # Counted while the workers load their model; the exact count replaces it once all is enqueued.
        unit = "queries" if args.command == "rerank" else "texts"
        bar = stack.enter_context(Progress("ranked" if args.command == "rerank" else "classified", unit,
                                           estimate_records(args.input, _format(args)),
                                           enabled=False if args.no_progress else None))
        enqueue_started = time.perf_counter()  # texts/s excludes a first-use model build
        enqueued = 0  # model inputs (texts, pairs), whatever the command

        def on_enqueued(n: int) -> None:
            nonlocal enqueued
            enqueued += n

        # Results are deleted from Redis as they are written (unless --keep-results); the output is
        # flushed (and a file fsynced) before each deletion so none exists only in a buffer.
        lines = answers(args, client, inputs, run_id, chunk_size=args.chunk_size, max_pending=args.max_pending,
                        on_enqueued=on_enqueued, on_sealed=bar.set_total, on_idle=lambda: _check_workers(procs),
                        consume=not args.keep_results, before_delete=out.safe_point())
        labels: Counter[str] = Counter()
        items = errors = 0
        last_check = time.monotonic()
        for answer in lines:
            out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            items += 1
            bar.update()
            if "error" in answer or answer.get("errors"):
                errors += 1
            elif (label := _label(answer)) is not None:
                labels[label] += 1
            if time.monotonic() - last_check > 1:
                last_check = time.monotonic()
                _check_workers(procs)
        elapsed = time.perf_counter() - started
        classifying = time.perf_counter() - enqueue_started
        summary = {"run": run_id, "items": items, "labels": dict(labels.most_common()), "errors": errors,
                   "unreadable_lines": len(input_errors),
                   "texts_per_s": round(enqueued / classifying, 1) if classifying else None,
                   "elapsed_s": round(elapsed, 2)}
        if args.command == "rerank":
            summary["pairs"] = enqueued
            del summary["labels"]
        out.stream.flush()
        bar.close()  # its last line before the summary, not over it
        print(json.dumps(summary), file=sys.stderr)
    return 0
