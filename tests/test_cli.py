"""The CLI as a user runs it: enqueue a file, run a worker, read results in input order."""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, REPO, subprocess_env

QB = [PYTHON, "-m", "queuebert_cli"]


def test_enqueue_worker_results(conn, redis_server, tiny_models, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": f"review {i} " + "nice " * i, "stars": i}) for i in range(25)]
    lines.insert(3, "{not json")
    src.write_text("\n".join(lines) + "\n")
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    enq = subprocess.run([*QB, "enqueue", str(src), "--chunk-size", "4", "--log-format", "json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert enq.returncode == 0, enq.stderr
    run_id = enq.stdout.strip()
    assert "line 4" in enq.stderr  # the unreadable line is reported with its number, then skipped
    work = subprocess.run([*QB, "worker", "--burst", "--log-format", "json"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert work.returncode == 0, work.stderr[-2000:]
    assert '"event": "batch"' in work.stderr
    out = tmp_path / "out.jsonl"
    res = subprocess.run([*QB, "results", run_id, "--follow", "--timeout", "30", "-o", str(out)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(25)]
    assert rows[5]["meta"] == {"stars": 5}
    assert all(r["label"] in ("NEGATIVE", "POSITIVE", "bert_label_0", "bert_label_1") for r in rows)


def test_unreachable_redis_is_one_clear_message(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    out = subprocess.run([*QB, "enqueue", str(src), "--redis-url", "redis://127.0.0.1:1/0", "--log-format", "json"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert "redis://127.0.0.1:1/0" in out.stderr and "Traceback" not in out.stderr
