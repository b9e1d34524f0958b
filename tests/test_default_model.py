"""The default sentiment model: data hygiene, cache paths, atomic/locked builds, and one real build.

The real build runs once per session, through ``ensure_default_model`` into an
empty cache, on the recipe's code and settings with a smaller training set
(``BUILD_TRAIN_SIZE``): large enough to clear the accuracy target, a fraction of
the full build's time. Its tests are marked ``slow`` so they can be deselected
with ``-m "not slow"``; everything else here takes seconds. The full recipe:
``QB_BUILD_TRAIN_SIZE=6000 pytest tests/test_default_model.py`` (about two
minutes on two idle CPU cores).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelbuild import default_model as dm
from modelbuild.sentiment_data import LABELS, generate_examples

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "examples" / "reviews-heldout.jsonl"
REVIEWS = REPO / "examples" / "reviews.jsonl"
#: Training examples for the session's real build. Accuracy on the held-out set with the recipe's
#: seed, measured on the 2-core machine: 640 -> 0.76, 1280 -> 0.92, 6000 (dm.TRAIN_SIZE) -> 0.95.
BUILD_TRAIN_SIZE = int(os.environ.get("QB_BUILD_TRAIN_SIZE", "1280"))
#: The accuracy the default model must reach on the held-out set.
ACCURACY_TARGET = 0.85


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _sentences(text: str) -> list[str]:
    return [s for s in (_norm(p) for p in re.split(r"(?<=[.!?])\s+", text)) if s]


# --------------------------------------------------------------------------
# Data files and generator
# --------------------------------------------------------------------------


def test_heldout_set_is_balanced_and_well_formed() -> None:
    rows = dm.read_jsonl(HELDOUT)
    assert len(rows) >= 200
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({_norm(r["text"]) for r in rows}) == len(rows)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == set(LABELS)
    assert counts["POSITIVE"] == counts["NEGATIVE"]


def test_demo_reviews_are_unlabelled_and_distinct_from_heldout() -> None:
    rows = dm.read_jsonl(REVIEWS)
    assert 250 <= len(rows) <= 400
    assert all(set(r) == {"id", "text"} and r["text"].strip() for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    heldout = {_norm(r["text"]) for r in dm.read_jsonl(HELDOUT)}
    assert not heldout & {_norm(r["text"]) for r in rows}


def test_training_data_never_contains_heldout_sentences() -> None:
    """Guards against leakage: no held-out review appears as a training text or sentence."""
    heldout = {_norm(r["text"]) for r in dm.read_jsonl(HELDOUT)}
    train = generate_examples(dm.TRAIN_SIZE, dm.DEFAULT_SEED)
    train_texts = {_norm(e.text) for e in train}
    train_sentences = {s for e in train for s in _sentences(e.text)}
    assert not heldout & train_texts
    assert not heldout & train_sentences


def test_generator_is_deterministic_balanced_and_unique() -> None:
    a = generate_examples(500, seed=7)
    assert a == generate_examples(500, seed=7)
    assert a != generate_examples(500, seed=8)
    assert Counter(e.label for e in a) == {0: 250, 1: 250}
    assert len({e.text.lower() for e in a}) == 500


# --------------------------------------------------------------------------
# Cache location
# --------------------------------------------------------------------------


def test_default_model_dir_prefers_queuebert_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUEUEBERT_CACHE_DIR", str(tmp_path / "qb"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_model_dir() == tmp_path / "qb" / "models" / f"sentiment-minilm-{dm.RECIPE_VERSION}"


def test_default_model_dir_falls_back_to_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QUEUEBERT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_model_dir().parent == tmp_path / "xdg" / "queuebert" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.default_model_dir().parent == tmp_path / "home" / ".cache" / "queuebert" / "models"


# --------------------------------------------------------------------------
# Build mechanics (fast: training is replaced or tiny)
# --------------------------------------------------------------------------


def _fake_build(calls: list[int]):
    def build(target: Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
        calls.append(1)
        assert target is not None
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        target.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", dm.BUILD_INFO_FILE):
            (target / name).write_text("{}")
        return target

    return build


def test_ensure_default_model_builds_once_under_concurrency(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("QUEUEBERT_CACHE_DIR", str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(dm, "build_default_model", _fake_build(calls))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(dm.ensure_default_model(progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [dm.default_model_dir()] * 3
    assert dm.ensure_default_model(progress=False) == dm.default_model_dir()
    assert len(calls) == 1


def test_interrupted_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_train", boom)
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        dm.build_default_model(target, progress=False)
    assert list(tmp_path.iterdir()) == []


def _tiny_heldout(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        json.dumps({"id": "a", "text": "Great phone.", "label": "POSITIVE"}) + "\n"
        + json.dumps({"id": "b", "text": "Awful phone.", "label": "NEGATIVE"}) + "\n"
    )
    return path


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    heldout = _tiny_heldout(tmp_path)
    a = dm.build_default_model(tmp_path / "a", progress=False, train_size=64, heldout=heldout)
    b = dm.build_default_model(tmp_path / "b", progress=False, train_size=64, heldout=heldout)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(wa[k].equal(wb[k]) for k in wa)


def test_force_replaces_an_existing_build(tmp_path: Path) -> None:
    heldout = _tiny_heldout(tmp_path)
    target = tmp_path / "m"
    dm.build_default_model(target, progress=False, train_size=32, heldout=heldout)
    first = json.loads((target / dm.BUILD_INFO_FILE).read_text())
    assert dm.build_default_model(target, progress=False, train_size=32, heldout=heldout) == target
    assert json.loads((target / dm.BUILD_INFO_FILE).read_text()) == first  # reused, not rebuilt
    dm.build_default_model(target, progress=False, force=True, seed=5, train_size=32, heldout=heldout)
    assert json.loads((target / dm.BUILD_INFO_FILE).read_text())["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tiny.jsonl"]


# --------------------------------------------------------------------------
# One real build per session
# --------------------------------------------------------------------------


def test_default_build_trains_on_the_recipes_examples(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The session build below passes a smaller ``train_size``; a build that passes none uses the
    recipe's size and seed (training is stopped as it starts)."""
    seen: dict[str, object] = {}

    def record(**kwargs: object) -> None:
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_train", record)
    with pytest.raises(KeyboardInterrupt):
        dm.build_default_model(tmp_path / "model", progress=False)
    assert (seen["train_size"], seen["seed"]) == (dm.TRAIN_SIZE, dm.DEFAULT_SEED)


@dataclass
class SessionBuild:
    path: Path  #: where ``default_model_dir()`` points in the session's cache
    builds: int  #: how many times the build ran
    returned: list[Path]  #: what each concurrent ``ensure_default_model`` call returned


@pytest.fixture(scope="session")
def session_build(tmp_path_factory: pytest.TempPathFactory) -> SessionBuild:
    """The real build code, file lock and cache: two first-use callers at once on an empty cache,
    so one builds while the other waits on the lock and then reuses the result. Only the training
    set size differs from a user's first run (``BUILD_TRAIN_SIZE``)."""
    real_build = dm.build_default_model
    builds: list[Path | None] = []
    returned: list[Path] = []
    errors: list[BaseException] = []

    def smaller_build(target: Path | None = None, **kwargs: object) -> Path:
        builds.append(target)
        return real_build(target, train_size=BUILD_TRAIN_SIZE, **kwargs)  # type: ignore[arg-type]

    def first_use() -> None:
        try:
            returned.append(dm.ensure_default_model(progress=False))
        except BaseException as exc:  # re-raised below, in the fixture's own thread
            errors.append(exc)

    # A context rather than a held monkeypatch: the cache directory and the stand-in are undone
    # before any other test runs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUEUEBERT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(dm, "build_default_model", smaller_build)
        threads = [threading.Thread(target=first_use) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        path = dm.default_model_dir()
    if errors:
        raise errors[0]
    return SessionBuild(path, len(builds), returned)


@pytest.fixture(scope="session")
def built_model(session_build: SessionBuild) -> Path:
    return session_build.path


@pytest.mark.slow
def test_concurrent_first_use_builds_once(session_build: SessionBuild) -> None:
    assert session_build.builds == 1
    assert session_build.returned == [session_build.path] * 2
    assert dm.is_complete(session_build.path)
    assert [p.name for p in session_build.path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_build_writes_a_standard_checkpoint(built_model: Path) -> None:
    config = json.loads((built_model / "config.json").read_text())
    assert config["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert config["label2id"] == {"NEGATIVE": 0, "POSITIVE": 1}
    assert (built_model / "model.safetensors").stat().st_size > 1_000_000
    assert (built_model / "tokenizer.json").is_file() or (built_model / "vocab.txt").is_file()
    info = json.loads((built_model / dm.BUILD_INFO_FILE).read_text())
    assert info["recipe_version"] == dm.RECIPE_VERSION
    assert info["seed"] == dm.DEFAULT_SEED
    assert info["train_size"] == BUILD_TRAIN_SIZE
    assert info["build_seconds"] > 0
    assert info["heldout_path"] == str(HELDOUT)
    assert info["heldout_accuracy"] >= ACCURACY_TARGET


@pytest.mark.slow
def test_pipeline_loads_build_unchanged(built_model: Path) -> None:
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(built_model))
    out = clf(["What a wonderful little hotel, we loved every minute.", "Broke after two days, total junk."])
    assert [o["label"] for o in out] == ["POSITIVE", "NEGATIVE"]


@pytest.mark.slow
def test_heldout_accuracy_meets_target(built_model: Path) -> None:
    accuracy = dm.evaluate(built_model, HELDOUT)
    assert accuracy >= ACCURACY_TARGET
    info = json.loads((built_model / dm.BUILD_INFO_FILE).read_text())
    assert accuracy == info["heldout_accuracy"]  # what the build recorded is what the model does


# --------------------------------------------------------------------------
# Package boundary: serving does not load the build code
# --------------------------------------------------------------------------


def test_settings_default_is_the_built_model_name() -> None:
    from modelbuild import DEFAULT_MODEL_NAME
    from queuebert.settings import WorkerSettings

    assert WorkerSettings().model == DEFAULT_MODEL_NAME


def test_worker_loads_build_code_only_for_the_default_model() -> None:
    """A worker serving any other model never imports the training data or recipe."""
    import subprocess
    import sys

    script = (
        "import sys, worker, worker.model, worker.cli\n"
        "assert worker.model.resolve_model_path('some/model') == 'some/model'\n"
        "print(sorted(m for m in sys.modules if m.startswith('modelbuild.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
