"""Building queuebert's default model: training data, fine-tuning recipe and the on-disk cache.

This package is separate from ``worker`` because serving never needs it: a worker loads a finished
checkpoint and classifies. The only run-time contact is on first use of the default model name, when
``worker.model`` imports :mod:`modelbuild.default_model` lazily to build the checkpoint once into the
cache (later starts find it there). Keeping the 800 lines of synthetic training data and the
training loop out of ``worker`` keeps the runtime package about serving alone.

This ``__init__`` imports nothing, so reading :data:`DEFAULT_MODEL_NAME` costs nothing.
"""

#: The model name (``--model``, ``QUEUEBERT_MODEL``) that means "the locally built default model".
DEFAULT_MODEL_NAME = "queuebert/sentiment-minilm"
