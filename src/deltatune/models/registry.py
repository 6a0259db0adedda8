"""Bundled models by name (each with its task and options), or a local transformers directory."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.registry import Registry
from .entry import TASKS, ModelEntry, ModelError


@dataclass(frozen=True)
class _Bundled:
    description: str
    task: str
    builder: str  # "module:function", imported on use so that transformers loads only when needed
    options: tuple[str, ...]
    takes_labels: bool = True


#: every bundled model by name
MODELS: Registry[_Bundled] = Registry(
    "model", ModelError,
    message="unknown {kind} {name!r}; bundled: {known} (or a local transformers directory){hint}")
MODELS.register("minilm", _Bundled(
    "all-MiniLM-L6-v2 encoder (22.7M) + mean pooling + linear head: text classification",
    "text-classification", "text:minilm", ("max_length",)))
MODELS.register("smollm2", _Bundled(
    "SmolLM2-135M-Instruct from its bundled GGUF file: causal language model",
    "causal-lm", "gguf:smollm2", ("max_length", "cache"), takes_labels=False))
MODELS.register("efficientnet-lite0", _Bundled(
    "EfficientNet-Lite0, ImageNet weights (4.65M), new head: image classification",
    "image-classification", "vision:efficientnet_lite0", ("image_size",)))
MODELS.register("small-cnn", _Bundled(
    "a small BatchNorm CNN for 28x28 digits (60k), trained from scratch: image classification",
    "image-classification", "vision:small_cnn", ("image_size",)))


def available_models() -> list[str]:
    """Bundled model names (a local transformers directory path works too)."""
    return list(MODELS.names())


def describe_models() -> dict[str, str]:
    """Bundled model names with a one-line description each (CLI help)."""
    return {name: m.description for name, m in MODELS.items()}


def load_model(
    spec: str,
    *,
    num_labels: int | None = None,
    task: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    keep_float: bool = False,
    **options: Any,
) -> ModelEntry:
    """A model entry by bundled name or local transformers directory (never downloads).

    ``num_labels`` sizes a new classification head; ``task`` picks what a transformers directory
    becomes (and is checked against a bundled model's task); ``options`` are per model:
    ``max_length`` (text), ``image_size`` (images), ``cache`` (smollm2). ``quantize`` keeps the
    frozen Linear weights quantized (:func:`deltatune.quant.quantize_base`: int8, int4, nf4, q8_0,
    q4_0, q4_1, with ``group_size`` and ``keep_float``; a new head stays float), or ``"gguf"`` keeps
    a GGUF model's own blocks without ever making float weights (smollm2).
    """
    if quantize is not None:
        entry = _load_quantized(spec, quantize, group_size, keep_float, num_labels, task, options)
        if entry is not None:
            return entry
        entry = load_model(spec, num_labels=num_labels, task=task, **options)
        from ..quant import quantize_base

        quantize_base(entry.model, quantize, group_size=group_size, exclude=entry.head,
                      keep_float=keep_float)
        return entry
    if num_labels is not None and num_labels < 1:
        raise ModelError(f"num_labels must be positive, got {num_labels}")
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if spec in MODELS:
        bundled = MODELS.get(spec)
        if task is not None and task != bundled.task:
            raise ModelError(f"{spec} is a {bundled.task} model, not {task}; pick a {task} model")
        _check_options(spec, options, bundled.options)
        module, _, func = bundled.builder.partition(":")
        build = getattr(importlib.import_module(f".{module}", __package__), func)
        if not bundled.takes_labels:
            if num_labels:
                raise ModelError(
                    f"{spec} is a {bundled.task} model and takes no num_labels; drop it"
                )
            with _quiet_transformers(module in _TRANSFORMERS_BUILDERS):
                return build(**options)
        with _quiet_transformers(module in _TRANSFORMERS_BUILDERS):
            return build(num_labels, **options)
    path = Path(spec)
    if path.is_dir():
        from .text import transformers_dir

        if task == "image-classification":
            raise ModelError(
                f"{spec}: only text transformers directories are supported; use a bundled image "
                "model"
            )
        _check_options(spec, options, ("max_length",))
        with _quiet_transformers(True):
            return transformers_dir(path, num_labels, task, **options)
    if "/" in spec or "\\" in spec:
        raise ModelError(
            f"{spec} does not exist; pass a local transformers directory or a bundled model name"
        )
    raise ModelError(MODELS.unknown(spec))


_TRANSFORMERS_BUILDERS = ("text", "gguf")  # builder modules that load through transformers


@contextmanager
def _quiet_transformers(active: bool):
    """transformers' own progress bars ("Loading weights") and info/warning logs off while a model
    loads; deltatune's own bars are untouched and transformers' settings come back afterwards."""
    if not active:
        yield
        return
    from .text import offline_transformers

    log = offline_transformers().utils.logging
    bars, verbosity = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _check_options(spec: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(
            f"{spec} has no option(s) {unknown}; it takes {', '.join(allowed) or 'none'}"
        )


def _load_quantized(spec: str, quantize: str, group_size: int | None, keep_float: bool,
                    num_labels: int | None, task: str | None, options: dict[str, Any]
                    ) -> ModelEntry | None:
    """Checks of a quantized load (before any weight is read); the GGUF-blocks model itself for
    ``quantize="gguf"``, smollm2 re-quantized layer by layer from its blocks for the other schemes
    (unless ``keep_float``: LoftQ needs the float weights), else None (the float model is loaded,
    then quantized)."""
    from ..quant import SCHEMES, QuantizeError, quantize_base

    if quantize != "gguf":
        SCHEMES.get(quantize)  # an unknown name: one line, before the model loads
        if spec != "smollm2" or keep_float or num_labels or task not in (None, "causal-lm"):
            return None
        # below: the GGUF file's blocks, re-quantized one layer at a time, so no float copy of the
        # whole model exists (the float path holds all 540 MB, and malloc keeps it after quantizing)
    else:
        if spec != "smollm2":
            raise QuantizeError(
                f"quantize='gguf' keeps a GGUF file's own blocks, and {spec} is not loaded from "
                "GGUF (only smollm2 is); use int8, int4 or nf4"
            )
        if group_size is not None or keep_float:
            raise QuantizeError("quantize='gguf' keeps the file's blocks as they are: drop "
                                "group_size / keep_float (LoftQ needs a float original: use nf4)")
        if num_labels:
            raise ModelError(f"{spec} is a causal-lm model and takes no num_labels; drop it")
        if task is not None and task != "causal-lm":
            raise ModelError(f"{spec} is a causal-lm model, not {task}; pick a {task} model")
    _check_options(spec, options, ("max_length", "cache"))
    from .gguf_blocks import smollm2_blocks

    with _quiet_transformers(True):
        entry = smollm2_blocks(**options)
    if quantize != "gguf":
        quantize_base(entry.model, quantize, group_size=group_size, exclude=entry.head,
                      from_blocks=True)
        entry.source = entry.source.replace("kept as Q4_1 blocks", f"re-quantized to {quantize}")
    return entry
