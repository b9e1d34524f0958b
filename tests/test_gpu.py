"""On a CUDA device only (skipped elsewhere): a real out-of-memory split, and a supervised worker on
``cuda:0``. Run them with ``pytest tests/test_gpu.py`` on a machine with an NVIDIA GPU; the
equivalence tests run there with ``pytest tests/test_equivalence.py --device cuda``."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from producer import Client  # noqa: E402

from conftest import PYTHON, REPO, _bert_tokenizer_dir, subprocess_env  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SEQ = 512
HIDDEN, INTERMEDIATE, LAYERS, HEADS = 1024, 4096, 24, 16  # BERT-large


def _bert_large(out: Path) -> Path:
    """A randomly initialised BERT-large-size classifier (weights do not matter for memory)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(_bert_tokenizer_dir()), model_max_length=SEQ)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=SEQ,
                        num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 335M parameters is much faster on the GPU
        model = BertForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model
    torch.cuda.empty_cache()
    return out


def test_a_real_cuda_out_of_memory_is_split_and_every_item_gets_its_result(tmp_path):
    from worker.engine import Engine
    from worker.model import load_model

    loaded = load_model(str(_bert_large(tmp_path / "bert-large")), device="cuda", dtype="bfloat16")
    free, _ = torch.cuda.mem_get_info()
    # Per token, a bf16 layer holds the FFN's input and output (2 x 4096) and a few hidden-size
    # tensors: about 22 KB. Ask for 1.5x what fits in the free memory, in one batch.
    per_token = 2 * (2 * INTERMEDIATE + 3 * HIDDEN)
    rows = math.ceil(1.5 * free / per_token / SEQ)
    items = [{"id": str(i), "text": f"item {i}: " + "the film was long and the ending surprised everyone " * 60}
             for i in range(rows)]
    engine = Engine(loaded, max_batch_size=rows, max_batch_tokens=rows * SEQ)
    results = engine.classify(items)

    assert engine.oom_splits >= 1, "the batch was expected to run out of device memory"
    assert [r["id"] for r in results] == [it["id"] for it in items]
    assert not [r for r in results if "error" in r]
    # The same items in ordinary batches give about the same scores: in bf16, through 24 random
    # layers, a different batch shape (other kernels) moves probabilities by a few hundredths
    # (0.055 at most on an H200).
    sample = items[:32] + items[-32:]
    reference = Engine(loaded, max_batch_size=64, max_batch_tokens=16384).classify(sample)
    by_id = {r["id"]: r for r in results}
    worst = max(abs(by_id[r["id"]]["scores"][label] - p) for r in reference for label, p in r["scores"].items())
    print(f"\nrows {rows} x {SEQ} tokens, free {free / 2**30:.1f} GiB, oom splits {engine.oom_splits}, "
          f"forwards {engine.forward_calls}, max |dp| vs ordinary batches {worst:.2e}")
    assert worst < 0.1
    del engine, loaded
    torch.cuda.empty_cache()


def test_devices_cuda0_supervises_a_worker_on_the_gpu(conn, redis_server, tiny_models, tmp_path):
    env = subprocess_env(redis_server.url, QUEUEBERT_MODEL=str(tiny_models["bert"]), QUEUEBERT_DTYPE="float32")
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        sup = subprocess.Popen([PYTHON, "-m", "queuebert_cli", "worker", "--devices", "cuda:0", "--name", "gpu",
                                "--log-format", "json"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not conn.exists("rq:worker:gpu-0"):
            assert sup.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        run = Client.from_url(redis_server.url).enqueue_stream([f"text number {i}" for i in range(500)],
                                                               chunk_size=16)
        results = list(run.results(timeout=120))
        assert len(results) == 500 and not [r for r in results if "error" in r]
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=90)
    assert sup.returncode == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    loaded = [e for e in lines if e.get("event") == "model loaded"]
    assert loaded and all(e["device"] == "cuda:0" for e in loaded), lines
