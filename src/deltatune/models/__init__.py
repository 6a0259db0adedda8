"""Models by name, each with its preprocessing: ``load_model(spec, num_labels=...)`` → ModelEntry.

Bundled: ``minilm`` (MiniLM-L6 sentence encoder + mean pooling + linear head), ``smollm2``
(SmolLM2-135M-Instruct causal LM from its GGUF file), ``efficientnet-lite0`` (ImageNet weights, new
head), ``small-cnn`` (a small BatchNorm CNN for MNIST-size images). Or a local transformers
directory. See docs/data-and-models.md.
"""

from __future__ import annotations

from .entry import TASKS, ModelEntry, ModelError
from .registry import MODELS, available_models, describe_models, load_model

__all__ = ["MODELS", "TASKS", "ModelEntry", "ModelError", "available_models", "describe_models",
           "load_model"]
