"""The benchmark's stage profiler (benchmarks/stages.py) still finds every function it times: a
renamed worker function would otherwise drop out of the breakdown silently, into 'unattributed'."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is part of the checkout

from benchmarks import stages  # noqa: E402


def test_every_stage_function_exists():
    class SimulatedDevice:  # sim_worker.py's, which it defines inside main()
        def forward(self) -> None: ...
        def _start_forward(self) -> None: ...
        def _wait_forward(self) -> None: ...

    _, missing = stages.targets({"sim_worker": type("m", (), {"SimulatedDevice": SimulatedDevice})})
    assert missing == []


def test_time_is_exclusive_and_per_thread():
    def outer() -> None:
        inner()
        busy(0.05)

    def inner() -> None:
        busy(0.1)

    def busy(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    outer, inner = stages._wrap("outer", outer), stages._wrap("inner", inner)
    sleeper = threading.Thread(target=stages._wrap("asleep", lambda: time.sleep(0.2)))
    sleeper.start()
    outer()
    sleeper.join()
    got = stages.report(process_cpu=1.0, texts=10)
    assert 0.09 < got["inner"]["cpu_s"] < 0.2 and 0.04 < got["outer"]["cpu_s"] < 0.1  # inner not counted twice
    assert got["asleep"]["cpu_s"] < 0.05  # asleep is no CPU
