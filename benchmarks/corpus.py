"""The benchmark's texts: generated from the repository alone, or read from one's own JSONL.

The generated corpus mixes lengths the way interactive and batch traffic do, which is what
batching by tokens is about: 70% of the texts are one short review, 30% are paragraphs of several
reviews. Reviews (about 12 BERT tokens each) are a little shorter than the sentences of the
corpus the figures were first measured on (``texts-mixed.jsonl``, ~15), so a paragraph takes
4-31 reviews where that corpus took 3-25 sentences: both come to a mean of ~71 tokens and a
longest text of ~420 in their first 2,000.

It is a pure function of ``(n, seed)``: the same seed gives byte-identical texts on every machine,
and the first N texts of a longer corpus are the corpus of N (``--quick`` measures a prefix of
what a full run measures). Nothing generated is stored in the repository.

    python benchmarks/corpus.py --texts 2000 --seed 0 > corpus.jsonl   # write it out, e.g. for --data
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The templated review generator that also trains the default model. The one import of it here;
# only the generator is used, never the labels.
from modelbuild.sentiment_data import generate_examples

# Reviews drawn once per corpus and used in order (texts past ~3,400 wrap around and reuse them in
# other paragraphs). A fixed number keeps every prefix of the corpus the same whatever N is.
POOL_REVIEWS = 20_000
SINGLE_SHARE = 0.7
PARAGRAPH_REVIEWS = (4, 31)  # inclusive
GENERATED_NAME = "generated-reviews-mixed"


@dataclass(frozen=True)
class Corpus:
    """Texts and where they came from; ``describe()`` is what results.json records."""

    name: str
    source: str
    texts: list[str]
    seed: int | None = None
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", texts_sha256(self.texts))

    def describe(self, tokenizer: Any | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.source, "texts": len(self.texts),
                               "sha256": self.sha256}
        if self.seed is not None:
            out["seed"] = self.seed
        if tokenizer is not None:
            out["tokens"] = token_stats(self.texts, tokenizer)
        return out


def texts_sha256(texts: list[str]) -> str:
    """sha256 of the texts as a JSON array (UTF-8, no spaces): the same texts give the same hash
    whether generated here or read from a file, whatever that file's ids or formatting."""
    data = json.dumps(texts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4)
def _reviews(seed: int) -> tuple[str, ...]:
    return tuple(example.text for example in generate_examples(POOL_REVIEWS, seed))


def generate(n: int, seed: int = 0) -> Corpus:
    """``n`` texts: one review (70%) or a paragraph of 4-31 reviews (30%)."""
    pool = itertools.cycle(_reviews(seed))
    shapes = random.Random(seed)  # its own stream: how many reviews each text takes
    texts = []
    for _ in range(n):
        k = 1 if shapes.random() < SINGLE_SHARE else shapes.randint(*PARAGRAPH_REVIEWS)
        texts.append(" ".join(itertools.islice(pool, k)))
    source = f"benchmarks/corpus.py from {generate_examples.__module__}.generate_examples"
    return Corpus(GENERATED_NAME, source, texts, seed)


def read_jsonl(path: Path, n: int) -> Corpus:
    """The first ``n`` texts of a JSONL file of ``{"id", "text"}`` (fewer if it has fewer); a
    ``.gz`` file is read compressed (how a corpus travels to a machine without this disk)."""
    texts: list[str] = []
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(texts) >= n:
                break
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"])
    return Corpus(path.name, str(path), texts)


def token_stats(texts: list[str], tokenizer: Any) -> dict[str, Any]:
    """Token counts as the model sees them (special tokens included, before truncation)."""
    counts = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    if not counts:
        return {}
    return {"mean": round(statistics.fmean(counts), 1), "p50": counts[len(counts) // 2],
            "p90": counts[int(0.9 * (len(counts) - 1))], "max": counts[-1],
            "over_512": sum(c > 512 for c in counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the generated benchmark corpus as JSONL on stdout.")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for i, text in enumerate(generate(args.texts, args.seed).texts):
        sys.stdout.write(json.dumps({"id": f"g{i}", "text": text}, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
