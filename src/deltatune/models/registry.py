from __future__ import annotations

from pathlib import Path

from .entry import ModelEntry, ModelError

_MODELS = {
    "minilm": "all-MiniLM-L6-v2 encoder (22.7M) + mean pooling + linear head: text classification",
    "smollm2": "SmolLM2-135M-Instruct from its bundled GGUF file: causal language model",
    "efficientnet-lite0": "EfficientNet-Lite0, ImageNet weights (4.65M), new head: image classification",
    "small-cnn": "a small BatchNorm CNN for 28x28 digits, trained from scratch",
}


def available_models() -> list[str]:
    return list(_MODELS)


def describe_models() -> dict[str, str]:
    return dict(_MODELS)


def load_model(spec: str, *, num_labels: int | None = None, task: str | None = None, **options) -> ModelEntry:
    """A model entry by bundled name or local transformers directory (never downloads)."""
    if spec == "minilm":
        from .text import minilm

        return minilm(num_labels, **options)
    if spec == "smollm2":
        from .text import smollm2

        return smollm2(**options)
    if spec == "efficientnet-lite0":
        from .vision import efficientnet_lite0

        return efficientnet_lite0(num_labels, **options)
    if spec == "small-cnn":
        from .vision import small_cnn

        return small_cnn(num_labels)
    path = Path(spec)
    if path.is_dir():
        from .text import transformers_dir

        return transformers_dir(path, None if task == "causal-lm" else num_labels)
    raise ModelError(f"unknown model {spec!r}; bundled: {', '.join(_MODELS)} (or a local transformers directory)")
