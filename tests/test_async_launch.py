"""Overlapped forwards (``Engine.asynchronous``, on by default on CUDA): compute launches the next
batch before it waits for the current one's logits. Exercised here on the CPU by switching the
flag on for an engine of a tiny model: the forward then runs at launch, but the compute loop and
the engine's two halves take the same path as on a GPU."""

from __future__ import annotations

from typing import Any

import pytest

from producer import Client
from worker.engine import Engine, OutOfMemory

from helpers import run_burst


def _engine(engines: dict[str, Any], asynchronous: bool) -> Engine:
    """A fresh engine on the session's loaded model (the shared ones keep their settings)."""
    engine = Engine(engines["bert"].m, max_batch_size=8, max_batch_tokens=512)
    engine.asynchronous = asynchronous
    return engine


def _texts(n: int) -> list[str]:
    return [f"text {i} " + "word " * (i % 17) for i in range(n)]


def _classify_through_worker(conn, redis_server, engine: Engine, texts: list[str]) -> list[dict[str, Any]]:
    run = Client.from_url(redis_server.url).enqueue_stream(texts, chunk_size=16)
    run_burst(conn, engine, max_batch_size=8)
    return list(run.results(timeout=30))


def test_overlapped_batches_give_the_synchronous_results(conn, redis_server, engines) -> None:
    texts = _texts(120)
    want = _classify_through_worker(conn, redis_server, _engine(engines, False), texts)
    conn.flushall()
    engine = _engine(engines, True)
    order: list[tuple[str, int]] = []
    launch, finish = engine.launch, engine.finish

    def traced_launch(items: Any, options: Any, rows: Any) -> Any:
        launched = launch(items, options, rows)
        order.append(("launch", id(launched)))
        return launched

    def traced_finish(launched: Any, stats: Any = None) -> Any:
        order.append(("finish", id(launched)))
        return finish(launched, stats)

    engine.launch, engine.finish = traced_launch, traced_finish  # type: ignore[method-assign]
    got = _classify_through_worker(conn, redis_server, engine, texts)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want):
        assert a["label"] == b["label"] and a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    # Every launched batch finished once; some batch was launched while another was in flight.
    launched = [k for what, k in order if what == "launch"]
    assert sorted(launched) == sorted(k for what, k in order if what == "finish") and len(launched) >= 15
    in_flight, overlapped = 0, 0
    for what, _ in order:
        in_flight += 1 if what == "launch" else -1
        overlapped = max(overlapped, in_flight)
    assert overlapped == 2


def test_a_launch_out_of_memory_is_split_when_finished(conn, redis_server, engines) -> None:
    """Out of memory at launch (where CUDA reports it) is run again at finish, split down to the
    culprit; its neighbours, and the batches around it, are unaffected."""
    engine = _engine(engines, True)

    def fault(rows: int, padded: int) -> None:
        if padded // rows >= 60:
            raise OutOfMemory("injected: CUDA out of memory")

    engine.fault = fault
    texts = [*_texts(30), "long " * 200, *_texts(30)]
    results = _classify_through_worker(conn, redis_server, engine, texts)
    assert len(results) == 61
    assert [i for i, r in enumerate(results) if "error" in r] == [30]
    assert "out of memory" in results[30]["error"]["message"]


def test_the_in_process_engine_overlaps_its_batches_too(engines) -> None:
    items = [{"id": str(i), "text": t} for i, t in enumerate(_texts(100))]
    want = _engine(engines, False).classify(items)
    engine = _engine(engines, True)
    in_flight, most = 0, 0
    launch, finish = engine.launch, engine.finish

    def traced_launch(*args: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        return launch(*args)

    def traced_finish(*args: Any) -> Any:
        nonlocal in_flight
        in_flight -= 1
        return finish(*args)

    engine.launch, engine.finish = traced_launch, traced_finish  # type: ignore[method-assign]
    got = engine.classify(items)
    assert most == 2 and in_flight == 0
    assert [(r["id"], r["label"]) for r in got] == [(r["id"], r["label"]) for r in want]
    assert all(a["scores"] == pytest.approx(b["scores"], abs=1e-6) for a, b in zip(got, want))


def test_the_overlap_can_be_turned_off(monkeypatch, tiny_models) -> None:
    """``--no-overlap`` / ``QUEUEBERT_OVERLAP=0``: one batch at a time on a CUDA device too (an
    engine that would overlap, standing in for a CUDA one, loaded as the worker loads it)."""
    import dataclasses

    from queuebert.settings import WorkerSettings
    from queuebert_cli.main import _worker_settings, build_parser
    from worker import engine as engine_module
    from worker import tasks

    class WouldOverlap(engine_module.Engine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.asynchronous = True

    monkeypatch.setattr(engine_module, "Engine", WouldOverlap)
    monkeypatch.setenv("QUEUEBERT_OVERLAP", "0")
    assert WorkerSettings.from_env().overlap is False
    monkeypatch.delenv("QUEUEBERT_OVERLAP")
    model = str(tiny_models["bert"])
    for flags, overlap in (([], True), (["--no-overlap"], False)):
        settings = _worker_settings(build_parser().parse_args(["worker", "--model", model, *flags]))
        assert settings.overlap is overlap
        monkeypatch.setattr(tasks, "_engine", None)  # the process's engine, loaded afresh
        loaded = tasks.get_engine(dataclasses.replace(settings, device="cpu", dtype="float32"))
        assert loaded.asynchronous is overlap
    monkeypatch.setattr(tasks, "_engine", None)
