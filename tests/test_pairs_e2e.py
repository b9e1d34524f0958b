"""Reranking and zero-shot through worker processes and a real Redis: polled, subscribed, from the
CLI, and with a worker SIGKILLed in the middle of a zero-shot run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from producer import Client
from producer.pairs import pair_items, ranking, zero_shot_item
from queuebert import keys
from queuebert.procs import LoggedProcess
from queuebert.results import decode_entry

from conftest import PYTHON, REPO, build_tiny_model, subprocess_env
from helpers import start_worker

QB = [PYTHON, "-m", "queuebert_cli"]
LABELS = ["politics", "sports", "cinema", "food", "economy"]


@pytest.fixture()
def workers():
    """Worker processes started by a test, reaped whatever happens."""
    started: list[LoggedProcess] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pipeline(model: Path, task: str) -> object:
    from transformers import pipeline

    return pipeline(task, model=str(model), device="cpu", dtype="float32")


def test_zero_shot_subscribed_and_rerank_polled(conn, redis_server, tiny_models, workers):
    """A zero-shot run read by a subscriber (completion order) and a reranking read in order,
    each through its own worker process."""
    texts = [f"text {i}: " + "the match ended in a draw " * (i % 4) for i in range(40)]
    workers.append(start_worker(redis_server.url, tiny_models["nli"], "zs-worker", QUEUEBERT_MAX_BATCH_SIZE="16"))
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream((zero_shot_item(t, LABELS) for t in texts), chunk_size=8)
    answers = {r["id"]: r for r in client.subscribe(run.id, timeout=120)}
    want = _pipeline(tiny_models["nli"], "zero-shot-classification")(texts, candidate_labels=LABELS)
    assert sorted(answers, key=int) == [str(i) for i in range(len(texts))]
    for i, w in enumerate(want):
        assert answers[str(i)]["labels"] == w["labels"]
        assert answers[str(i)]["scores"] == pytest.approx(w["scores"], abs=1e-5)
    workers[0].send_signal(signal.SIGTERM)
    workers[0].wait(30)

    workers.append(start_worker(redis_server.url, tiny_models["crossencoder"], "rr-worker"))
    passages = [f"passage {i} about " + "football " * (i % 3) + "cooking " * (i % 2) for i in range(12)]
    ranked = client.rerank("who won the football match?", passages, top_n=4, timeout=120)
    scores = _pipeline(tiny_models["crossencoder"], "text-classification")(
        [{"text": "who won the football match?", "text_pair": p} for p in passages], top_k=None)
    reference = sorted(range(len(passages)), key=lambda i: -scores[i][0]["score"])[:4]
    assert [r["index"] for r in ranked] == reference
    assert [r["score"] for r in ranked] == pytest.approx([scores[i][0]["score"] for i in reference], abs=1e-5)
    # The same pairs, read by a subscriber in completion order: their ids say where each belongs.
    run = client.enqueue_stream(pair_items("q", "who won the football match?", passages), chunk_size=5)
    by_index = {int(r["id"].split(":")[1]): r for r in client.subscribe(run.id, timeout=120)}
    subscribed = ranking([by_index[i] for i in range(len(passages))], top_n=4)
    assert [r["index"] for r in subscribed] == reference


def _qb(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A ``queuebert`` command, quiet and logging JSON, offline, with ``QUEUEBERT_REDIS_URL`` set
    to ``redis_url`` ("" leaves it to the command: an embedded Redis)."""
    env = subprocess_env(redis_url, HF_HUB_OFFLINE="1")
    if not redis_url:
        del env["QUEUEBERT_REDIS_URL"]
    return subprocess.run([*QB, *args, "--no-progress", "--log-format", "json"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_rerank_and_zero_shot_commands(tmp_path, tiny_models, redis_server, workers):
    """``queuebert rerank`` with its own embedded Redis and worker; ``queuebert zero-shot`` on a
    Redis with a worker already attached (``--workers 0``)."""
    queries = tmp_path / "queries.jsonl"
    lines = [json.dumps({"id": f"q{i}", "query": f"question {i}", "passages": [f"answer {j}" for j in range(i + 2)]})
             for i in range(6)]
    lines.insert(2, json.dumps({"id": "bad", "query": "no passages"}))
    queries.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ranked.jsonl"
    proc = _qb("", "rerank", str(queries), "-o", str(out), "--model", str(tiny_models["crossencoder"]),
               "--dtype", "float32", "--top-n", "3", "--return-text")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "bad", "q2", "q3", "q4", "q5"]
    assert rows[2]["error"]["type"] == "invalid_item"
    for row in rows[:2] + rows[3:]:
        n = int(row["id"][1:]) + 2
        assert [r["text"] for r in row["results"]] == [f"answer {r['index']}" for r in row["results"]]
        assert len(row["results"]) == min(3, n)
        assert [r["score"] for r in row["results"]] == sorted((r["score"] for r in row["results"]), reverse=True)
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["items"] == 7 and summary["pairs"] == sum(i + 2 for i in range(6))

    texts = tmp_path / "texts.csv"
    texts.write_text("id,text\n" + "".join(f"t{i},\"review {i}, about food\"\n" for i in range(10)))
    workers.append(start_worker(redis_server.url, tiny_models["nli"], "zs-cli-worker"))
    out = tmp_path / "answers.jsonl"
    proc = _qb(redis_server.url, "zero-shot", str(texts), "-o", str(out), "--labels", "food,sports",
               "--multi-label", "--redis-url", redis_server.url, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = _pipeline(tiny_models["nli"], "zero-shot-classification")(
        [f"review {i}, about food" for i in range(10)], candidate_labels=["food", "sports"], multi_label=True)
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(10)]
    for r, w in zip(rows, want):
        assert r["labels"] == w["labels"] and r["scores"] == pytest.approx(w["scores"], abs=1e-5)

    # Pairs from a CSV column: `run --text-pair-field`, the input's ids kept.
    qa = tmp_path / "qa.csv"
    qa.write_text("id,question,answer\n" + "".join(f"a{i},is it {i}?,\"yes, it is {i}\"\n" for i in range(8)))
    out = tmp_path / "pairs.jsonl"
    proc = _qb(redis_server.url, "run", str(qa), "-o", str(out), "--text-field", "question", "--text-pair-field",
               "answer", "--redis-url", redis_server.url, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = _pipeline(tiny_models["nli"], "text-classification")(
        [{"text": f"is it {i}?", "text_pair": f"yes, it is {i}"} for i in range(8)], top_k=None)
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(8)]
    for r, w in zip(rows, want):
        assert r["scores"] == pytest.approx({d["label"]: d["score"] for d in w}, abs=1e-5)


@pytest.fixture(scope="module")
def slower_nli(tmp_path_factory) -> Path:
    """Big enough that a 5,000-pair run lasts a few seconds, so a worker can die in the middle."""
    return build_tiny_model("nli", tmp_path_factory.mktemp("nli") / "nli", hidden=256, layers=4)


def test_zero_shot_worker_killed_loses_nothing(conn, redis_server, slower_nli, workers):
    """1,000 texts x 5 labels; one of two workers is SIGKILLed mid-run. Every text's answer is in
    the run exactly once (one stream entry per job, each item once), assembled from all 5 pairs."""
    n = 1000
    texts = [f"text {i}: " + "the election results surprised the markets " * (1 + i % 5) for i in range(n)]
    env = {"QUEUEBERT_MAX_BATCH_SIZE": "16", "QUEUEBERT_MAX_POOL_ITEMS": "128"}
    workers.extend(start_worker(redis_server.url, slower_nli, f"zs-{w}", **env) for w in "ab")
    client = Client.from_url(redis_server.url, retries=10)
    run = client.enqueue_stream((zero_shot_item(t, LABELS) for t in texts), chunk_size=4)
    deadline = time.time() + 120
    while run.progress()["done"] < n // 5:
        assert time.time() < deadline, "no progress"
        time.sleep(0.05)
    assert run.progress()["done"] < n, "the run ended before the kill"
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    answers = list(client.ordered_results(run.id, timeout=300))
    assert [a["id"] for a in answers] == [str(i) for i in range(n)]
    assert not [a for a in answers if "error" in a][:1]
    assert all(sorted(a["labels"]) == sorted(LABELS) and sum(a["scores"]) == pytest.approx(1, abs=1e-5)
               for a in answers)
    entries = conn.xrange(keys.run_stream(run.id))
    per_item = Counter(r["id"] for _, fields in entries for r in decode_entry(fields)[1])
    assert len(per_item) == n and set(per_item.values()) == {1}
    assert run.progress()["done"] == n
