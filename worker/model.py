"""Loading the model, choosing its device and dtype, and turning logits into scores like HF does."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

log = structlog.get_logger(__name__)


class ModelError(RuntimeError):
    """The model cannot be served (not found, not a sequence classifier); one message at start."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (measured ~2.2x fp32 on such a CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def scoring_function(config: Any) -> str:
    """The text-classification pipeline's rule for turning logits into scores, exactly."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    if config.problem_type == "single_label_classification" or config.num_labels > 1:
        return "softmax"
    return "none"


def apply_scoring(logits: np.ndarray, function: str) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return logits


def max_input_length(tokenizer: Any, config: Any) -> int:
    """Truncation length: the tokenizer's own limit when it states one, else the position table's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    positions = getattr(config, "max_position_embeddings", None) or 512
    if "roberta" in (config.model_type or "") or config.model_type in {"camembert", "longformer"}:
        # RoBERTa-style position ids start after the padding index.
        positions -= (config.pad_token_id or 1) + 1
    return int(positions)


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any
    device: torch.device
    dtype: torch.dtype
    labels: list[str]
    function: str
    max_length: int
    name: str
    load_seconds: float
    accepts_token_type_ids: bool
    #: The id shorter rows of a batch are padded with (see :func:`padding`).
    pad_id: int = 0
    #: Whether rows of different lengths may share a forward; if not, one row per forward.
    pad_batches: bool = True


def padding(model: Any, tokenizer: Any) -> tuple[int, bool]:
    """The id that pads a batch's shorter rows, and whether padded rows may share a forward.

    Decoder classifiers (GPT-2, Llama, Qwen2, ...) score each row at its last token that is not
    the config's ``pad_token_id``: padding with any other id (the tokenizer's pad where it differs,
    or 0 where the tokenizer has none) makes them score a pad, a wrong answer that looks like any
    other. So rows are padded with the config's pad id wherever it names a token the model can
    embed; encoders mask pads whatever their id, so for them it changes nothing. A config without
    one (or with one outside the vocabulary) leaves such a model no way to find where a padded row
    ends (HF refuses batches of more than one row, or scores the last pad): such a model runs one
    row per forward, as the pipeline runs it, unpadded.
    """
    text_config = model.config.get_text_config()
    pad = getattr(text_config, "pad_token_id", None)
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 and (vocab <= 0 or pad < vocab):
        return pad, True
    fallback = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else 0
    return fallback, False


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """The built-in default model name maps to its locally built checkpoint (built on first use).

    ``modelbuild.default_model`` (training data and recipe) is imported only for that name: a
    worker serving any other model never loads it.
    """
    from modelbuild import DEFAULT_MODEL_NAME

    if name != DEFAULT_MODEL_NAME:
        return name
    from modelbuild.default_model import ensure_default_model

    return str(ensure_default_model())


def load_model(
    name: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load tokenizer and model once, refuse anything that is not a sequence classifier."""
    import inspect
    import time

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's stderr is for log lines, not bars
    started = time.perf_counter()
    path = resolve_model_path(name, revision)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ModelError(f"model path {path!r} does not exist (pass a local checkpoint directory or a hub id)")
    path = os.path.expanduser(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {name!r} not found locally or on the hub, or not loadable: {first}") from exc
    architectures = config.architectures or []
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if not is_classifier and not trust_remote_code:
        known = config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        detail = f"its architectures are {architectures or 'unspecified'}"
        raise ModelError(
            f"model {name!r} is not a sequence classifier ({detail}); queuebert serves "
            "AutoModelForSequenceClassification checkpoints"
            + ("" if known else f" and model type {config.model_type!r} has none")
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name!r} could not be loaded: {exc}".splitlines()[0]) from exc
    except Exception as exc:
        # Anything else a checkpoint makes from_pretrained raise (torch asserts that a config's
        # pad_token_id is inside the vocabulary of Llama-style models, say) is the same refusal,
        # one message at start, not a traceback.
        raise ModelError(f"model {name!r} could not be loaded: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    model.to(dev).eval()
    cfg = model.config
    # Decoders keep every layer's keys and values for generation unless told not to: memory a
    # classifier never reads (the pipeline passes use_cache=False for the same reason).
    for part in (cfg, cfg.get_text_config()):
        if getattr(part, "use_cache", False):
            part.use_cache = False
    labels = [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]
    loaded = LoadedModel(
        tokenizer=tokenizer,
        model=model,
        device=dev,
        dtype=torch_dtype,
        labels=labels,
        function=scoring_function(cfg),
        max_length=max_input_length(tokenizer, cfg),
        name=name,
        load_seconds=time.perf_counter() - started,
        accepts_token_type_ids="token_type_ids" in inspect.signature(model.forward).parameters,
    )
    loaded.pad_id, loaded.pad_batches = padding(model, tokenizer)
    if not loaded.pad_batches:
        log.warning(
            "model config has no usable pad_token_id: one text per forward (set pad_token_id in its "
            "config.json to batch)", model=name, pad_token_id=getattr(cfg.get_text_config(), "pad_token_id", None),
        )
    elif tokenizer.pad_token_id != loaded.pad_id:
        log.info("padding with the model's pad_token_id, not the tokenizer's", model=name, pad_id=loaded.pad_id,
                 tokenizer_pad_id=tokenizer.pad_token_id)
    log.info(
        "model loaded", model=name, device=str(dev), dtype=str(torch_dtype).removeprefix("torch."),
        labels=len(labels), scoring=loaded.function, max_length=loaded.max_length,
        seconds=round(loaded.load_seconds, 2), threads=torch.get_num_threads(), pid=os.getpid(),
    )
    return loaded
