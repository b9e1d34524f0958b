"""``queuebert worker --devices cuda:0,cuda:1 --workers-per-device N``: N worker processes per
device, each restarted if it dies.

A model on a GPU belongs to one process, so several GPUs mean several workers; and one process's
CPU path cannot feed a fast GPU, so a device may have several (each with its own copy of the
model: replicas, as other servers run several per GPU). The supervisor
passes each child its settings through ``QUEUEBERT_*`` variables (the same way a container is
configured), turns SIGTERM/SIGINT into one graceful SIGTERM per child (killing those still running
after ``grace`` seconds, or at once on a second signal), and restarts a child that exits with an
error, backing off if it keeps failing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import structlog

from queuebert.procs import LoggedProcess, kill_processes, start_process, stop_processes
from queuebert.settings import WorkerSettings, env_name

log = structlog.get_logger(__name__)


def shared_host_env(processes: int, device: str, env: dict[str, str]) -> dict[str, str]:
    """Thread counts for one of ``processes`` workers on this host, where ``env`` does not set
    them: an equal share of the cores each. Each worker's Rust tokenizer (rayon) and torch's CPU
    kernels otherwise start a thread per core in every process, and N processes then run N times
    as many threads as there are cores, switching among them."""
    if processes <= 1:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, cores // processes))
    out = {}
    if "RAYON_NUM_THREADS" not in env:
        out["RAYON_NUM_THREADS"] = share
    if "OMP_NUM_THREADS" not in env and not device.startswith("cuda"):
        # A CUDA worker's CPU threads run little besides the tokenizer; a CPU worker's forward
        # is all CPU, so the cores are split between its processes.
        out["OMP_NUM_THREADS"] = share
    return out


def settings_env(settings: WorkerSettings) -> dict[str, str]:
    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            env[env_name(f.name)] = "1" if value else "0"
        elif isinstance(value, list):
            env[env_name(f.name)] = ",".join(value)
        else:
            env[env_name(f.name)] = str(value)
    return env


@dataclass
class Child:
    index: int
    device: str
    proc: LoggedProcess | None = None
    started: float = 0.0
    failures: int = 0
    restarts: int = 0
    next_start: float = 0.0
    done: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class Supervisor:
    def __init__(self, settings: WorkerSettings, devices: list[str], grace: float | None = None):
        self.settings = settings
        self.devices = devices
        # Each child bounds its own stop (its batch in progress, then stop_timeout for Redis); the
        # margin is for that batch. The supervisor then ends within an orchestrator's usual grace.
        self.grace = grace if grace is not None else settings.stop_grace
        per_device = max(1, settings.workers_per_device)
        self.children = [Child(i, d) for i, d in enumerate(d for d in devices for _ in range(per_device))]
        self.stopping = False

    def _child_settings(self, child: Child) -> WorkerSettings:
        base = self.settings.name or f"{os.uname().nodename}-{os.getpid()}"
        port = self.settings.metrics_port + child.index if self.settings.metrics_port else None
        # A restarted child takes a name of its own: a killed worker's registration outlives it
        # (until its TTL, minutes), and RQ refuses to register a name that is still active.
        name = f"{base}-{child.index}" + (f"-r{child.restarts}" if child.restarts else "")
        # workers_per_device=1: a child is one worker, not a supervisor of its own.
        return dataclasses.replace(self.settings, device=child.device, name=name, metrics_port=port,
                                   workers_per_device=1)

    def _start(self, child: Child) -> None:
        env = dict(os.environ)
        env.update(shared_host_env(len(self.children), child.device, env))
        env.update(settings_env(self._child_settings(child)))
        if child.device.startswith("cuda:"):
            # Each child sees only its own GPU, as cuda:0, so libraries that ignore the device
            # argument still land on the right card.
            env["CUDA_VISIBLE_DEVICES"] = child.device.split(":", 1)[1]
            env[env_name("device")] = "cuda:0"
        # Output is inherited: the children's log lines are the supervisor's, as in a container. Their
        # own session keeps a terminal's Ctrl-C away from them: the supervisor's SIGTERM is their
        # one stop signal (a worker takes a second one as "exit at once").
        # A supervisor killed outright (SIGKILL, the OOM killer) takes its workers with it, gracefully:
        # orphans would keep serving with nobody to stop or restart them.
        child.proc = start_process([sys.executable, "-m", "queuebert_cli", "worker"], env=env, stdout="inherit",
                                   new_session=True, stop_with_parent=True)
        child.started = time.monotonic()
        log.info("worker process started", device=child.device, pid=child.proc.pid, index=child.index)

    def _running(self) -> list[LoggedProcess]:
        return [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _on_signal(self, signum: int, frame: object) -> None:
        # The main loop does the stopping: a handler that waited for children would block the
        # second signal's handler, which must be able to kill them at once.
        if self.stopping:
            log.warning("second stop signal: killing workers")
            kill_processes(self._running())
            return
        self.stopping = True
        log.info("stopping workers", signal=signum)

    def _stop(self) -> int:
        """SIGTERM to every child once (a second SIGTERM would make a worker exit at once), then
        up to ``grace`` seconds for their batches in progress, then SIGKILL."""
        stop_processes(self._running(), self.grace)
        return 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for c in self.children:
            self._start(c)
        while True:
            if self.stopping:
                return self._stop()
            now = time.monotonic()
            alive = 0
            for c in self.children:
                if c.done:
                    continue
                code = c.proc.poll() if c.proc else None
                if c.proc is not None and code is None:
                    alive += 1
                    continue
                if c.proc is not None:  # it just exited
                    if self.stopping or code == 0:
                        c.done = True
                        continue
                    uptime = now - c.started
                    c.failures = 1 if uptime > 60 else c.failures + 1
                    delay = min(2 ** (c.failures - 1), 30)
                    log.warning("worker process died, restarting", device=c.device, code=code, in_s=delay)
                    c.proc, c.next_start = None, now + delay
                    alive += 1
                elif now >= c.next_start:
                    c.restarts += 1
                    self._start(c)
                    alive += 1
                else:
                    alive += 1
            if not alive:
                return 0
            time.sleep(0.2)


def run_supervisor(settings: WorkerSettings, devices: list[str]) -> int:
    return Supervisor(settings, devices).run()
