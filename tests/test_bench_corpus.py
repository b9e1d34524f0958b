"""The benchmark's generated corpus: reproducible, prefix-stable, mixed like its reference, and
fingerprinted the same way whether generated or read back from a file."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is part of the checkout, not of the installed package

from benchmarks.corpus import generate, read_jsonl  # noqa: E402


def test_same_seed_same_texts_and_a_shorter_corpus_is_a_prefix():
    full = generate(600, seed=3)
    assert generate(600, seed=3) == full
    assert generate(200, seed=3).texts == full.texts[:200]
    assert generate(600, seed=4).sha256 != full.sha256


def test_length_mix_is_one_review_or_a_paragraph(tmp_path):
    corpus = generate(2000, seed=0)
    sentences = [len(t.split(". ")) for t in corpus.texts]
    short = sum(n <= 3 for n in sentences) / len(sentences)
    assert 0.6 < short < 0.8  # 70% one review (a review has 1-3 sentences), the rest paragraphs
    assert max(len(t.split()) for t in corpus.texts) > 200
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(corpus.texts)))
    assert read_jsonl(path, 2000).sha256 == corpus.sha256
    assert read_jsonl(path, 10).texts == corpus.texts[:10]
