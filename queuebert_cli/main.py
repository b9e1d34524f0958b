"""The ``queuebert`` command: enqueue, results, worker (and more as they land).

Plain argparse, flags named after the settings they set; every default comes from
:mod:`queuebert.settings`, so an environment variable and its flag can never disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import structlog

from producer.outputs import open_output
from producer.readers import DEFAULT_ID_FIELD, FORMATS
from queuebert import logs
from queuebert.connection import RedisUnavailable
from queuebert.schema import DEFAULT_HYPOTHESIS_TEMPLATE
from queuebert.settings import ClientSettings, ExporterSettings, GatewaySettings, SettingError, WorkerSettings, env_name

from .job_flags import add_option_flags, check_option_flags, job_options

log = structlog.get_logger(__name__)

#: Seconds between reads of a growing run's total for the ``results --follow`` progress bar.
PROGRESS_TOTAL_EVERY = 1.0


def _comma_list(value: str) -> list[str]:
    """A comma-separated flag as the list its setting holds (as ``QUEUEBERT_*`` lists are read)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _redis_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help=f"Redis URL (default: ${env_name('redis_url')} or redis://localhost:6379/0)")


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default=None,
                   help="log lines as JSON or for a terminal (default: json unless stderr is a terminal)")
    p.add_argument("--log-level", default=None, help="debug, info, warning, error (default: info)")


def _input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", default="-", help="input file, or - for stdin (default: -)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="input format (default: from the file extension, else txt)")
    p.add_argument("--text-field", default="text", help="JSONL/CSV/TSV field holding the text (default: text)")
    p.add_argument("--id-field", default=None,
                   help=f"JSONL/CSV/TSV field holding the id (default: {DEFAULT_ID_FIELD} where present, "
                        "else generated)")
    p.add_argument("--text-pair-field", default=None,
                   help="JSONL/CSV/TSV field holding a second text: each item is a pair (cross-encoders, NLI)")
    add_option_flags(p)
    _stream_flags(p)


def _stream_flags(p: argparse.ArgumentParser) -> None:
    d = ClientSettings()
    p.add_argument("--chunk-size", type=int, default=None, help=f"items per job (default: {d.chunk_size})")
    p.add_argument("--max-pending", type=int, default=None,
                   help=f"wait while more than this many items are queued and unfinished (default: {d.max_pending})")
    p.add_argument("--queue", default=None, help=f"queue name (default: {d.queue})")
    p.add_argument("--run-id", default=None, help="run id (default: generated)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="an unreadable input line is reported and skipped, or stops the run (default: skip)")
    p.add_argument("--redis-full-timeout", type=float, default=None,
                   help="seconds to wait for room while Redis is full (OOM at maxmemory) before giving up "
                        f"(default: {d.redis_full_timeout:g})")
    _redis_flag(p)


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (there is none anyway when stderr is not a terminal)")


def _progress_enabled(args: argparse.Namespace) -> bool | None:
    """Off with --no-progress, else on exactly when stderr is a terminal."""
    return False if args.no_progress else None


def _run_flags(p: argparse.ArgumentParser, what: str) -> None:
    """What ``run``, ``rerank`` and ``zero-shot`` share: workers, output, progress."""
    _worker_flags(p)
    p.add_argument("-o", "--output", default="-", help=f"{what}, JSONL in input order (default: stdout)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes to start (default: 1; 0 uses workers already attached to --redis-url)")
    _progress_flag(p)
    p.add_argument("--verbose", action="store_true", help="show the workers' logs")
    p.add_argument("--keep-results", action="store_true",
                   help="leave results in Redis after writing them (default: delete them as they are written)")
    _log_flags(p)


def _worker_flags(p: argparse.ArgumentParser) -> None:
    d = WorkerSettings()
    p.add_argument("--model", default=None,
                   help=f"hub id or local path (default: {d.model}, built offline on first use)")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit) for hub ids")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow model code from the hub (off by default)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bf16 on CUDA that supports it (else fp16), bf16 on CPUs with native bf16, else fp32")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="texts per forward (default: 64 on CPU, 512 on CUDA)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="on CUDA, wait for each batch before launching the next (default: overlap two batches)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward (default: 4096 on CPU, 16384 on CUDA)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help=f"after a job arrives, wait this long for more to batch with it (default: {d.max_wait_ms})")


S = TypeVar("S", WorkerSettings, GatewaySettings, ExporterSettings)


def _settings(cls: type[S], args: argparse.Namespace, **extra: Any) -> S:
    """``cls`` from its ``QUEUEBERT_*`` variables, overridden by the flags given (same names)."""
    names = set(cls.__dataclass_fields__)
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    overrides.update({k: v for k, v in extra.items() if v})
    return cls.from_env(**overrides)


def _worker_settings(args: argparse.Namespace) -> WorkerSettings:
    return _settings(WorkerSettings, args, queues=getattr(args, "queue", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queuebert", description="Text classification behind Redis/RQ.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("enqueue", help="enqueue a file or stdin as a run; prints the run id",
                       description="Enqueue a file or stdin as a run. The run id is logged before the first item "
                                   "is sent and printed on stdout at the end. An interrupted enqueue (Ctrl-C, a "
                                   "full Redis, a lost connection, a killed process) is resumed by running the "
                                   "same command with --run-id: only what is missing is enqueued. Exit codes: 0 "
                                   "done, 2 error, 3 Redis stayed full, 130 interrupted.")
    _input_flags(p)
    _log_flags(p)
    _progress_flag(p)

    p = sub.add_parser("results", help="print a run's results as JSONL (input order)")
    p.add_argument("run_id")
    p.add_argument("--follow", action="store_true", help="wait for and stream results until the run ends")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: give up after this many seconds")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.add_argument("--unordered", action="store_true", help="completion order instead of input order")
    p.add_argument("--consume", action="store_true",
                   help="with --follow: delete results from Redis once written (bounded memory for long runs)")
    _progress_flag(p)
    _redis_flag(p)
    _log_flags(p)

    p = sub.add_parser("run", help="classify a file end to end: embedded Redis, workers, results, summary")
    _input_flags(p)
    _run_flags(p, "results file")

    p = sub.add_parser("rerank", help="rank passages for queries with a cross-encoder, end to end like run",
                       description="Each JSONL input line {\"id\", \"query\", \"passages\": [...]} becomes one "
                                   "output line {\"id\", \"results\": [{\"index\", \"score\"}, ...]}, best "
                                   "first (text-embeddings-inference's /rerank shape). Modes and flags as in run.")
    p.add_argument("input", nargs="?", default="-", help="JSONL queries, or - for stdin (default: -)")
    p.add_argument("--top-n", type=int, default=None, help="passages per query in the output (default: all)")
    p.add_argument("--return-text", action="store_true", help="include each passage's text in its entry")
    p.add_argument("--relevance-label", default=None,
                   help="for a model with several labels: the label whose score is relevance "
                        "(default: the model must have one)")
    _stream_flags(p)
    _run_flags(p, "rankings file")

    p = sub.add_parser("zero-shot", help="zero-shot classification of a file against candidate labels, like run",
                       description="Each text is classified against --labels as the zero-shot-classification "
                                   "pipeline does (an NLI model, one pair per label); each output line is "
                                   "{\"id\", \"labels\": [...], \"scores\": [...]}, best first.")
    _input_flags(p)
    p.add_argument("--labels", required=True, help="candidate labels, comma-separated")
    p.add_argument("--multi-label", action="store_true", help="score each label on its own (several may be true)")
    p.add_argument("--hypothesis-template", default=DEFAULT_HYPOTHESIS_TEMPLATE,
                   help=f"the hypothesis each label is put into (default: {DEFAULT_HYPOTHESIS_TEMPLATE!r})")
    _run_flags(p, "answers file")

    g = GatewaySettings()
    p = sub.add_parser("serve", help="HTTP gateway: text-embeddings-inference's routes and queuebert's runs",
                       description="An HTTP gateway that is only a producer (stateless; run any number behind a "
                                   "load balancer): TEI-compatible /predict, /rerank, / and /info, plus /runs for "
                                   "JSONL streams. Needs the http extra: pip install 'queuebert[http]'.")
    p.add_argument("--host", default=None, help=f"address to listen on (default: {g.host})")
    p.add_argument("--port", type=int, default=None, help=f"port (default: {g.port})")
    p.add_argument("--queue", default=None,
                   help=f"the default model's queue: requests that name no model go here (default: {g.queue})")
    p.add_argument("--models", default=None, type=_comma_list, metavar="NAME=QUEUE,...",
                   help="models served besides those the registered workers announce, each a name and its queue "
                        "(a bare NAME: its own queue), for models whose workers may be scaled to zero; "
                        f"also aliases (default: ${env_name('models')} or none)")
    p.add_argument("--api-key", default=None,
                   help=f"bearer token every route but /health requires (default: ${env_name('api_key')} or none)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help=f"seconds a TEI request waits for results before 504; its jobs' deadline "
                        f"(POST /runs: none unless ?job_ttl=) (default: {g.request_timeout:g})")
    p.add_argument("--max-queue-depth", type=int, default=None,
                   help=f"queued jobs beyond which requests get 429 (default: {g.max_queue_depth}; 0: no limit)")
    p.add_argument("--max-client-batch-size", type=int, default=None,
                   help=f"inputs per /predict or /rerank request (default: {g.max_client_batch_size})")
    _redis_flag(p)
    _log_flags(p)

    e = ExporterSettings()
    p = sub.add_parser("exporter", help="Prometheus gauges of each queue's depth in items, for an autoscaler",
                       description="Serves /metrics: queuebert_queue_items{queue,state} (texts waiting or started, "
                                   "not RQ's job count), queuebert_queue_oldest_item_age_seconds{queue}, read from "
                                   "Redis at each scrape. Run one per Redis. Needs the http extra.")
    p.add_argument("--host", default=None, help=f"address to listen on (default: {e.host})")
    p.add_argument("--port", type=int, default=None, help=f"port (default: {e.port})")
    p.add_argument("--queue", action="append", default=None,
                   help="queue to export even while empty; repeat for several (every queue RQ knows is exported)")
    _redis_flag(p)
    _log_flags(p)

    p = sub.add_parser("model", help="manage the built-in default model")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    b = model_sub.add_parser("build-default", help="build the offline default sentiment model into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if it exists")
    _log_flags(b)

    p = sub.add_parser("stats", help="queues, workers and runs in progress")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--all-runs", action="store_true", help="include finished runs")
    _redis_flag(p)
    _log_flags(p)

    p = sub.add_parser("worker", help="run a batching worker")
    _worker_flags(p)
    p.add_argument("--queue", action="append", default=None,
                   help="queue to listen to; repeat for several, highest priority first (default: default)")
    p.add_argument("--burst", action="store_true", default=None, help="quit when the queues are empty")
    p.add_argument("--name", default=None, help="worker name (default: generated)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (with --devices: port, port+1, ...)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices (cuda:0,cuda:1): supervised worker processes on each")
    p.add_argument("--workers-per-device", type=int, default=None, metavar="N",
                   help="worker processes per device, each with its own copy of the model: several keep a "
                        "fast GPU fed where one process's CPU cannot (default: 1)")
    _redis_flag(p)
    _log_flags(p)
    for command_parser in sub.choices.values():  # so main reports a flag's error with its command's usage
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def cmd_enqueue(args: argparse.Namespace) -> int:
    import redis

    from producer.client import Client, RedisFull, ResumeError, new_id
    from producer.readers import InputError, InputShapeError, guess_format, open_input, read_records

    from .progress import Progress, estimate_records

    client = Client.from_url(args.redis_url, queue=args.queue, redis_full_timeout=args.redis_full_timeout)
    fmt = args.format or (guess_format(args.input) if args.input != "-" else "txt")
    # Named before anything is sent: whatever happens next, the run can be resumed with this id.
    run_id = args.run_id or new_id()
    log.info("enqueueing", run=run_id, input=args.input, resume_with=f"--run-id {run_id}")
    sent = 0

    def stopped(why: str) -> str:
        return (f"{why}: run {run_id} stopped with {sent} items enqueued; run the same command with "
                f"--run-id {run_id} to enqueue the rest")

    try:
        with open_input(args.input) as stream:
            records = read_records(stream, fmt, text_field=args.text_field, id_field=args.id_field,
                                   text_pair_field=args.text_pair_field, on_error=args.on_error)
            with Progress("enqueued", "texts", estimate_records(args.input, fmt),
                          enabled=_progress_enabled(args)) as bar:

                def progress(n: int) -> None:
                    nonlocal sent
                    sent += n
                    bar.update(n)

                run = client.enqueue_stream(records, chunk_size=args.chunk_size, max_pending=args.max_pending,
                                            run_id=run_id, on_progress=progress, **job_options(args))
                bar.set_total(run.enqueued)
    except RedisFull as exc:
        log.error(str(exc), run=run_id)
        return 3
    except (ResumeError, InputShapeError) as exc:  # nothing was sent
        log.error(str(exc), run=run_id)
        return 2
    except InputError as exc:
        log.error(stopped(f"unreadable input, {exc}"), run=run_id)
        return 2
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.error(stopped(f"lost the connection to Redis ({exc})"), run=run_id)
        return 2
    except KeyboardInterrupt:
        log.error(stopped("interrupted"), run=run_id)
        return 130
    print(run.id)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    import time

    from producer.client import Client

    from .progress import Progress

    client = Client.from_url(args.redis_url)
    progress = client.run_progress(args.run_id)
    if progress["consumed"]:  # its results are gone: printing nothing with exit 0 looked like success
        from producer.protocol import consumed_message

        log.error(consumed_message(args.run_id), run=args.run_id)
        return 2
    if not progress["jobs"] and not progress["sealed"]:
        log.error("no such run", run=args.run_id)
        return 2
    # Results written out of the run's items; the total grows until the run is sealed.
    bar = Progress("classified", "texts", progress["total"], enabled=_progress_enabled(args))
    sealed = bool(progress["sealed"])
    checked = time.monotonic()
    try:
        # An existing file is emptied only at the first result, never before (producer.outputs).
        with open_output(args.output) as out:
            if args.follow or args.unordered:
                # Consuming deletes results from Redis: only once their lines are on disk (or passed on).
                source = (client.subscribe(args.run_id, timeout=args.timeout) if args.unordered
                          else client.ordered_results(args.run_id, timeout=args.timeout, consume=args.consume,
                                                      before_delete=out.safe_point()))
            else:
                source = _done_in_order(client, args.run_id)
            for result in source:
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                bar.update()
                if not sealed and time.monotonic() - checked > PROGRESS_TOTAL_EVERY:
                    checked = time.monotonic()
                    progress = client.run_progress(args.run_id)
                    sealed = bool(progress["sealed"])
                    bar.set_total(progress["total"])
    except TimeoutError as exc:
        log.error("timed out", error=str(exc))
        return 3
    finally:
        bar.close()
    progress = client.run_progress(args.run_id)
    if progress["done"] < progress["total"] or not progress["sealed"]:
        log.info("run not finished", done=progress["done"], total=progress["total"])
    return 0


def _done_in_order(client: Any, run_id: str) -> Any:
    """Without --follow: the results that exist now, in input order."""
    from queuebert import keys
    from queuebert.results import decode_entry

    done: dict[str, list[Any]] = {}
    for _entry_id, fields in client.connection.xrange(keys.run_stream(run_id)):
        job_id, results = decode_entry(fields)
        done.setdefault(job_id, results)
    for raw in client.connection.lrange(keys.run_jobs(run_id), 0, -1):
        yield from done.get(raw.decode(), [])


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from producer.stats import gather, render
    from queuebert.connection import connect

    conn = connect(args.redis_url)
    while True:
        stats = gather(conn, include_finished=args.all_runs)
        if args.json:
            print(json.dumps(stats), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            print(render(stats), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _worker_settings(args)
    try:
        from worker.cli import run_worker
    except ImportError as exc:
        log.error("the worker needs torch and transformers: pip install 'queuebert[worker]'", error=str(exc))
        return 2
    if settings.workers_per_device < 1:
        log.error("--workers-per-device must be at least 1", workers_per_device=settings.workers_per_device)
        return 2
    if args.devices or settings.workers_per_device > 1:
        from worker.supervisor import run_supervisor

        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else [settings.device]
        return run_supervisor(settings, devices)
    return run_worker(settings)


def cmd_run(args: argparse.Namespace) -> int:
    from producer.client import RedisFull, ResumeError
    from producer.embedded_redis import NoRedisBinary
    from producer.pairs import RerankError
    from producer.readers import InputError

    from .run_command import RunFailed, Terminated, run

    try:
        return run(args)
    except RedisFull as exc:
        log.error(str(exc))
        return 3
    except (NoRedisBinary, RunFailed, InputError, ResumeError) as exc:
        log.error(str(exc))
        return 2
    except RerankError as exc:  # the model is no single-score reranker: the fix is a flag
        # The library's hint names its keyword (label=...); here the way to name the label is the flag.
        message = str(exc).replace("(label=...)", "with --relevance-label LABEL")
        if "--relevance-label" not in message:
            message += " (--relevance-label)"
        log.error(message)
        return 2
    except Terminated:  # the workers and Redis were stopped on the way out
        log.warning("stopped by SIGTERM")
        return Terminated.EXIT_CODE


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from producer.catalog import parse_model_map
        from producer.gateway import serve
    except ImportError as exc:
        log.error("the gateway needs the http extra: pip install 'queuebert[http]'", error=str(exc))
        return 2
    settings = _settings(GatewaySettings, args)
    try:
        parse_model_map(settings.models)
    except ValueError as exc:  # a typo in the map: refuse to start rather than route a model nowhere
        log.error("bad model map", error=str(exc))
        return 2
    return serve(settings)


def cmd_exporter(args: argparse.Namespace) -> int:
    try:
        from producer.exporter import run_exporter
    except ImportError as exc:
        log.error("the exporter needs the http extra: pip install 'queuebert[http]'", error=str(exc))
        return 2
    return run_exporter(_settings(ExporterSettings, args, queues=args.queue))


def cmd_model(args: argparse.Namespace) -> int:
    try:
        from modelbuild.default_model import build_default_model
    except ImportError as exc:
        log.error("building the model needs the worker extras: pip install 'queuebert[worker]'", error=str(exc))
        return 2
    path = build_default_model(force=args.force)
    print(path)
    return 0


COMMANDS = {"enqueue": cmd_enqueue, "results": cmd_results, "worker": cmd_worker, "run": cmd_run, "model": cmd_model,
            "stats": cmd_stats, "rerank": cmd_run, "zero-shot": cmd_run, "serve": cmd_serve,
            "exporter": cmd_exporter}


#: The settings each command builds from its flags and ``QUEUEBERT_*`` variables, checked before it starts.
COMMAND_SETTINGS: dict[str, tuple[type[Any], ...]] = {
    "enqueue": (ClientSettings,), "results": (ClientSettings,), "run": (ClientSettings, WorkerSettings),
    "rerank": (ClientSettings, WorkerSettings), "zero-shot": (ClientSettings, WorkerSettings),
    "worker": (WorkerSettings,), "serve": (GatewaySettings, ClientSettings), "exporter": (ExporterSettings,),
}


def check_settings(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's settings (its flags, else the environment), as one line
    naming the flag or variable; None when nothing is. The ranges are the settings' own
    (:func:`queuebert.settings.at_least`): a flag, its variable and a Python client refuse alike."""
    try:
        for cls in COMMAND_SETTINGS.get(args.command, ()):
            names = set(cls.__dataclass_fields__)
            cls.from_env(**{k: v for k, v in vars(args).items() if k in names and not isinstance(v, list)})
    except SettingError as exc:
        return str(exc) if exc.from_env else f"--{exc.setting.replace('_', '-')} {exc.problem}"
    if args.command in ("run", "rerank", "zero-shot"):
        if args.workers < 0:
            return f"--workers must be at least 0 (got {args.workers})"
        if args.workers == 0 and not (args.redis_url or os.environ.get(env_name("redis_url"))):
            # Its private Redis is on a port no worker knows: the run would wait for ever.
            return ("--workers 0 uses workers already attached to a Redis: give its --redis-url (or "
                    f"{env_name('redis_url')}), or start workers with --workers N")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The subcommand's own parser: its usage, not the top-level one's, goes with a flag's error.
    command_parser = getattr(args, "command_parser", parser)
    check_option_flags(command_parser, args)
    try:
        problem = check_settings(args)
        defaults = WorkerSettings.from_env()  # the log format and level of every command
    except SettingError as exc:
        problem = str(exc)
    if problem is not None:
        command_parser.exit(2, f"{command_parser.prog}: error: {problem}\n")
    logs.configure(getattr(args, "log_format", None) or defaults.log_format,
                   getattr(args, "log_level", None) or defaults.log_level)
    try:
        return COMMANDS[args.command](args)
    except RedisUnavailable as exc:
        log.error(str(exc))
        return 2
    except OSError as exc:  # an input or output file that cannot be opened
        log.error(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
