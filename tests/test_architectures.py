"""Architectures users bring beyond the suite's BERT, DistilBERT and RoBERTa give the pipelines'
answers in float32: decoder classifiers (GPT-2, Llama, Qwen2), BART (the zero-shot classic),
ModernBERT, DeBERTa-v2, XLM-RoBERTa, ELECTRA and ALBERT, each tiny and random, with a tokenizer
trained here (byte-level BPE or Unigram, as the real ones are), texts of very different lengths
batched with pairs so that rows are padded.

Decoders score each row at its last token that is not the config's ``pad_token_id``; the
checkpoints here have the pad setups that fine-tuning scripts leave behind: a tokenizer without a
pad token (GPT-2's own), a tokenizer pad that is not the config's, a config pad outside the
vocabulary, and no pad anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_pairs import pair_reference

from producer import Client
from queuebert.schema import JobRequest

from conftest import NLI_LABELS, TRICKY_TEXTS, _bert_tokenizer_dir
from helpers import pipeline_reference, run_burst

DECODERS = ["gpt2", "llama", "qwen2", "gpt2_badpad", "gpt2_nopad"]
ENCODERS = ["bart", "modernbert", "debertav2", "xlmr", "electra", "albert"]
ARCHS = DECODERS + ENCODERS

TEXTS = TRICKY_TEXTS + ["ok", "the product works well and I would buy it again", "cold food " * 9]
LONG = "The quick brown fox jumps over the lazy dog. " * 30
PAIRS = [
    ("what is the capital of France?", "Paris is the capital and largest city of France."),
    ("an empty second text", ""),
    (LONG, "a short second text after a long first one"),
    ("a short first text", LONG),
    ("I loved this film 😍🎬!!", "東京の寿司は最高でした。"),
    ("good", "bad " * 12),
]
ZS_TEXTS = ["The match ended in a draw after extra time.", "a review of a film " * 12, "cold food"]
ZS_LABELS = ["sports", "cinema", "food"]
CORPUS = [t for t in TRICKY_TEXTS if t.strip()] * 3 + ["the product works well and I would buy it again",
                                                      "terrible service, cold food, never coming back"]


def _byte_bpe(specials: list[str]) -> Any:
    """A byte-level BPE (GPT-2, Llama 3, Qwen2, BART), without a post-processor: no special tokens."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials)
    return bpe._tokenizer


def _unigram(specials: list[str], cls: str, sep: str, segments: bool) -> Any:
    """A SentencePiece-style Unigram (ALBERT, DeBERTa-v2, XLM-R): ``cls A sep`` and, for pairs,
    ``cls A sep B sep`` with segment ids (``segments``) or RoBERTa's ``cls A sep sep B sep``."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(CORPUS, vocab_size=300, special_tokens=specials, unk_token="<unk>")
    tok = unigram._tokenizer
    pair = f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1" if segments else f"{cls} $A {sep} {sep} $B {sep}"
    tok.post_processor = TemplateProcessing(single=f"{cls} $A {sep}", pair=pair,
                                            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def build_arch(kind: str, out: Path) -> Path:
    """A tiny random 3-label NLI-named classifier of ``kind`` with its tokenizer, saved to ``out``."""
    import torch
    import transformers as tf
    from tokenizers.processors import RobertaProcessing, TemplateProcessing

    torch.manual_seed(1234)
    labels: dict[str, Any] = dict(num_labels=3, id2label=NLI_LABELS, label2id={v: k for k, v in NLI_LABELS.items()})
    tiny: dict[str, Any] = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                                max_position_embeddings=64, **labels)
    plain = ["input_ids", "attention_mask"]
    model: Any
    if kind in DECODERS:
        raw = _byte_bpe(["<pad>", "<|endoftext|>", "<s>"])
        eos = raw.token_to_id("<|endoftext|>")
        if kind == "llama":  # Llama's tokenizers start every text with BOS
            raw.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                    special_tokens=[("<s>", raw.token_to_id("<s>"))])
        # gpt2: GPT-2's tokenizer has no pad, the config names EOS (as fine-tuning scripts set it);
        # llama: the tokenizer pads with <pad>, the config names EOS; qwen2: the tokenizer has a
        # pad, the config none; gpt2_badpad: a config pad outside the vocabulary (copied from a
        # larger model's); gpt2_nopad: no pad anywhere.
        tok_pad = {"gpt2": None, "llama": "<pad>", "qwen2": "<|endoftext|>", "gpt2_badpad": "<pad>",
                   "gpt2_nopad": None}[kind]
        cfg_pad = {"gpt2": eos, "llama": eos, "qwen2": None, "gpt2_badpad": 10_000, "gpt2_nopad": None}[kind]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<s>",
                                         pad_token=tok_pad, model_max_length=64, model_input_names=plain)
        if kind.startswith("gpt2"):
            model = tf.GPT2ForSequenceClassification(tf.GPT2Config(
                vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=cfg_pad,
                bos_token_id=eos, eos_token_id=eos, **labels))
        elif kind == "llama":
            model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
                vocab_size=len(tok), num_key_value_heads=1, pad_token_id=cfg_pad, bos_token_id=raw.token_to_id("<s>"),
                eos_token_id=eos, **tiny))
        else:
            model = tf.Qwen2ForSequenceClassification(tf.Qwen2Config(
                vocab_size=len(tok), num_key_value_heads=1, pad_token_id=cfg_pad, eos_token_id=eos, **tiny))
    elif kind in ("bart", "xlmr"):
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        if kind == "bart":
            raw = _byte_bpe(specials)
            raw.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
        else:
            raw = _unigram(specials, "<s>", "</s>", segments=False)
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                         sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                         model_max_length=64, model_input_names=plain)
        if kind == "bart":
            model = tf.BartForSequenceClassification(tf.BartConfig(
                vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **labels))
        else:
            model = tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(
                vocab_size=len(tok), pad_token_id=1, **{**tiny, "max_position_embeddings": 66}))
    elif kind in ("modernbert", "electra"):
        tok = tf.AutoTokenizer.from_pretrained(str(_bert_tokenizer_dir()), model_max_length=64,
                                               **({"model_input_names": plain} if kind == "modernbert" else {}))
        if kind == "modernbert":  # no segment ids; local attention narrower than the long texts
            model = tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
                vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                local_attention=8, global_attn_every_n_layers=2, classifier_pooling="mean", **tiny))
        else:
            model = tf.ElectraForSequenceClassification(tf.ElectraConfig(
                vocab_size=tok.vocab_size, embedding_size=16, **tiny))
    else:  # albert, debertav2: SentencePiece vocabularies, segment ids
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_unigram(specials, "[CLS]", "[SEP]", segments=True),
                                         cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>", unk_token="<unk>",
                                         mask_token="[MASK]", model_max_length=64,
                                         model_input_names=["input_ids", "token_type_ids", "attention_mask"])
        if kind == "albert":
            model = tf.AlbertForSequenceClassification(tf.AlbertConfig(
                vocab_size=len(tok), embedding_size=16, pad_token_id=0, **tiny))
        else:  # DeBERTa-v3's shape: relative positions only, no segment embeddings
            model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
                vocab_size=len(tok), pad_token_id=0, relative_attention=True, position_biased_input=False,
                position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True,
                norm_rel_ebd="layer_norm", type_vocab_size=0, **tiny))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {kind: build_arch(kind, root / kind) for kind in ARCHS}


@pytest.fixture(scope="session")
def arch_engines(arch_models: dict[str, Path], device: str) -> dict[str, Any]:
    from worker.engine import Engine
    from worker.model import load_model

    return {k: Engine(load_model(str(p), device=device, dtype="float32"), max_batch_size=8, max_batch_tokens=512)
            for k, p in arch_models.items()}


def assert_scores_match(got: dict[str, Any], want: dict[str, float], tolerance: float) -> None:
    assert "error" not in got, got
    assert got["scores"] == pytest.approx(want, abs=tolerance)
    best = max(want, key=lambda label: want[label])
    assert got["label"] == best or want[best] - want[got["label"]] <= tolerance


def _has_tokens(engine: Any, text: str) -> bool:
    return bool(engine.m.tokenizer(text)["input_ids"])


def _config_pad_usable(engine: Any) -> bool:
    """Whether the model's config names a pad id it can embed (what batching padded rows needs)."""
    pad, vocab = engine.m.model.config.pad_token_id, engine.m.model.config.vocab_size
    return isinstance(pad, int) and 0 <= pad < vocab


@pytest.mark.parametrize("kind", ARCHS)
def test_texts_and_pairs_match_pipeline(kind, arch_models, arch_engines, device, tolerance):
    """Texts of very different lengths and pairs in shared, padded batches (8 rows): each the
    pipeline's answer for it alone; a text with no tokens (a decoder's empty text) is refused."""
    engine = arch_engines[kind]
    engine.forward_calls = 0
    items: list[dict[str, Any]] = [{"id": f"t{n}", "text": t} for n, t in enumerate(TEXTS)]
    items += [{"id": f"p{n}", "text": a, "text_pair": b} for n, (a, b) in enumerate(PAIRS)]
    results = {r["id"]: r for r in engine.classify(items)}
    texts = [t for t in TEXTS if _has_tokens(engine, t)]
    want = dict(zip(texts, pipeline_reference(str(arch_models[kind]), texts, device)))
    for n, text in enumerate(TEXTS):
        if text in want:
            assert_scores_match(results[f"t{n}"], want[text], tolerance)
        else:
            assert results[f"t{n}"]["error"]["type"] == "invalid_text"
    for n, pair_want in enumerate(pair_reference(str(arch_models[kind]), PAIRS, device)):
        assert_scores_match(results[f"p{n}"], pair_want, tolerance)
    rows = len(items) - (len(TEXTS) - len(texts))
    if _config_pad_usable(engine):
        assert engine.forward_calls < rows  # padded batches, not one row each
    else:
        assert engine.max_batch_size == 1 and engine.forward_calls == rows


@pytest.mark.parametrize("kind", ARCHS)
def test_zero_shot_matches_pipeline(kind, arch_models, arch_engines, device, tolerance):
    """Zero-shot items laid out as the worker lays them (one pair per label, batched together),
    assembled from their logits: the zero-shot pipeline's labels and scores."""
    from transformers import pipeline

    from worker.job_rows import finish, split_items

    engine = arch_engines[kind]
    items = [{"id": str(n), "text": t, "candidate_labels": ZS_LABELS} for n, t in enumerate(ZS_TEXTS)]
    job = split_items(JobRequest(items=items, run=None), 100_000, engine.m.model.config.label2id)
    for position, result in zip(job.positions, engine.classify(job.rows, job.options)):
        job.results[position] = result
    got = finish(job.results, job.groups, len(items))
    pipe = pipeline("zero-shot-classification", model=str(arch_models[kind]), device=device, dtype="float32")
    for g, w in zip(got, pipe(ZS_TEXTS, candidate_labels=ZS_LABELS)):
        assert g["labels"] == w["labels"]
        assert g["scores"] == pytest.approx(w["scores"], abs=tolerance)


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_padding_follows_the_config(kind, arch_engines):
    """Rows are padded with the config's pad id, which the model looks for; without a usable one
    the model runs one row per forward, and a batch of several rows is refused before the model
    could score a pad (its rows then run alone). No key/value cache is kept for generation."""
    engine = arch_engines[kind]
    config = engine.m.model.config
    usable = _config_pad_usable(engine)
    assert engine.max_batch_size == (8 if usable else 1)
    if usable:
        assert engine.pad_id == config.pad_token_id != engine.m.tokenizer.pad_token_id
    else:
        with pytest.raises(ValueError, match="one row per forward"):
            engine._collate([[3, 4, 5], [3]])
        items = [{"id": "long", "text": "the product works well and I would buy it"}, {"id": "short", "text": "ok"}]
        alone = [engine.classify([item])[0]["scores"] for item in items]
        engine.max_batch_size = 8  # as a caller may set it after the engine lowered it
        try:
            together = [r["scores"] for r in engine.classify(items)]
        finally:
            engine.max_batch_size = 1
        for got, want in zip(together, alone):
            assert got == pytest.approx(want, abs=1e-6)
    assert config.use_cache is False


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_through_the_queue(kind, conn, redis_server, arch_models, arch_engines, device, tolerance):
    """End to end through Redis and a real worker: texts, pairs and zero-shot items of one run, in
    shared batches, each the pipeline's answer."""
    from transformers import pipeline

    engine = arch_engines[kind]
    texts = [t for t in TEXTS if t.strip()]
    items: list[dict[str, Any]] = [{"id": f"t{n}", "text": t} for n, t in enumerate(texts)]
    items += [{"id": f"p{n}", "text": a, "text_pair": b} for n, (a, b) in enumerate(PAIRS)]
    items += [{"id": f"z{n}", "text": t, "candidate_labels": ZS_LABELS} for n, t in enumerate(ZS_TEXTS)]
    client = Client.from_url(redis_server.url)
    run = client.enqueue_stream(items, chunk_size=5)
    run_burst(conn, engine)
    results = {r["id"]: r for r in run.results(timeout=30)}
    model = str(arch_models[kind])
    for n, want in enumerate(pipeline_reference(model, texts, device)):
        assert_scores_match(results[f"t{n}"], want, tolerance)
    for n, want in enumerate(pair_reference(model, PAIRS, device)):
        assert_scores_match(results[f"p{n}"], want, tolerance)
    pipe = pipeline("zero-shot-classification", model=model, device=device, dtype="float32")
    for n, w in enumerate(pipe(ZS_TEXTS, candidate_labels=ZS_LABELS)):
        assert results[f"z{n}"]["labels"] == w["labels"]
        assert results[f"z{n}"]["scores"] == pytest.approx(w["scores"], abs=tolerance)


def test_config_pad_outside_a_padded_embedding_is_refused_at_load(arch_models, tmp_path):
    """Llama-style embeddings reserve the config's pad row, and torch asserts that it exists: a
    config whose pad_token_id is outside the vocabulary cannot be loaded at all. The worker refuses
    it at start with one message (ModelError), as any checkpoint it cannot load."""
    import json
    import shutil

    from worker.model import ModelError, load_model

    path = tmp_path / "llama-bad-pad"
    shutil.copytree(arch_models["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["pad_token_id"] = config["vocab_size"] + 5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="could not be loaded: AssertionError: Padding_idx must be within"):
        load_model(str(path), device="cpu", dtype="float32")
