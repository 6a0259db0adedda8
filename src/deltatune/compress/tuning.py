"""Fitting a compressed delta's scales on data, and turning a full delta into a LoRA adapter.

- :func:`search_alpha` — ComPEFT's scale search: try multipliers of the per-tensor scales, keep the
  one a held-out ``evaluate`` scores best (Yadav et al., https://arxiv.org/abs/2311.13171, Sec. 3).
- :func:`calibrate_scales` — BitDelta's scale distillation: the per-matrix scales are trained so the
  compressed model's logits match the uncompressed fine-tuned model's on a few batches (Liu et al.,
  https://arxiv.org/abs/2402.10193, Sec. 3.2). The signs stay fixed; only one number per matrix
  moves.
- :func:`extract_lora` — a full fine-tuning delta as LoRA factors (truncated SVD) attached to a
  model, to be saved with ``dt.save_adapter`` in deltatune's or peft's format.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .codecs import CompressError, decode
from .container import CompressedDelta


def search_alpha(
    compressed: CompressedDelta,
    evaluate: Callable[[CompressedDelta], float],
    grid: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
) -> tuple[CompressedDelta, dict[float, float]]:
    """The rescaled copy with the best ``evaluate`` score (higher is better), and every score by
    factor."""
    if not compressed.scales():
        raise CompressError(
            f"search_alpha needs a compeft or bitdelta delta, not {compressed.codec}"
        )
    if not grid or any(not (a > 0) for a in grid):
        raise CompressError(f"grid={list(grid)} must hold positive factors")
    scores = {float(a): float(evaluate(compressed.rescaled(a))) for a in grid}
    best = max(scores, key=scores.get)
    return compressed.rescaled(best), scores


def calibrate_scales(
    compressed: CompressedDelta,
    model: nn.Module,
    base: dict[str, torch.Tensor],
    teacher: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    steps: int = 50,
    lr: float = 1e-4,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> CompressedDelta:
    """Distil the per-matrix scales against ``teacher(batch)`` logits; returns a calibrated copy.

    ``model`` is the base architecture (its weights are not changed: the compressed weights
    ``base[name] + scale·sign`` enter through ``torch.func.functional_call``); ``base`` holds the
    base values of the compressed tensors by name; ``batches`` are reused cyclically for ``steps``
    steps.
    """
    from torch.func import functional_call

    if not compressed.scales():
        raise CompressError(
            f"calibrate_scales needs a compeft or bitdelta delta, not {compressed.codec}"
        )
    if steps < 1:
        raise CompressError(f"steps={steps} must be positive")
    names = list(compressed.scales())
    missing = [n for n in names if n not in base]
    if missing:
        raise CompressError(
            f"base has no tensor {missing[0]!r}; pass the base values of the compressed tensors"
        )
    unit = {
        n: decode(compressed.metas[n], {**compressed.parts[n], "scale": torch.ones(1)})
        for n in names
    }
    fixed = {n: compressed.tensor(n) for n in compressed.names() if n not in unit}
    scales = {n: nn.Parameter(compressed.parts[n]["scale"].float().clone()) for n in names}
    opt = torch.optim.Adam(scales.values(), lr=lr)
    batches = list(batches)
    if not batches:
        raise CompressError("calibrate_scales needs at least one batch")
    fwd = forward or (lambda m, b: m(**b) if isinstance(b, dict) else m(b))
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = teacher(batch)
            params = {n: base[n].float() + unit[n] * scales[n] for n in names}
            params.update({n: base[n].float() + t for n, t in fixed.items() if n in base})
            out = fwd(_Call(model, params, functional_call), batch)
            loss = (out.float() - target.float()).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        model.train(was_training)
    parts = {n: dict(p) for n, p in compressed.parts.items()}
    for n in names:
        parts[n]["scale"] = scales[n].detach().clone()
    return CompressedDelta(
        compressed.codec,
        {**compressed.options, "calibrated_steps": steps},
        compressed.metas,
        parts,
        compressed.source,
    )


class _Call:
    """``model(**batch)`` with some parameters replaced, for a user ``forward(model, batch)``."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], functional_call) -> None:
        self.model, self.params, self.fc = model, params, functional_call

    def __call__(self, *args, **kwargs):
        return self.fc(self.model, self.params, args, kwargs)


def extract_lora(
    model: nn.Module, task_vector, rank: int, *, name: str = "lowrank"
) -> dict[str, Any]:
    """Attach the 2-D weight changes of ``task_vector`` to ``model`` as a rank-``rank`` LoRA
    ``name``.

    Entries a LoRA cannot hold (biases, norms, conv kernels, modules that are not Linear/Embedding)
    are left out and listed in the returned report (``dropped``); apply them to the base with
    ``TaskVector.apply_to`` if you need them. Save the result with ``dt.save_adapter``.
    """
    from ..algebra import TaskVector
    from ..algebra.compose import attach_lowrank
    from ..core.host import get_module

    if not isinstance(rank, int) or rank < 1:
        raise CompressError(f"rank={rank!r} must be a positive integer")
    keep, dropped = {}, []
    for key, value in task_vector.items():
        path, _, leaf = key.rpartition(".")
        try:
            module = get_module(model, path)
        except AttributeError:
            raise CompressError(
                f"the model has no module {path!r} (from entry {key!r}); use the base the delta "
                "came from"
            ) from None
        shape = tuple(value.shape)
        if leaf == "weight" and len(shape) == 2 and isinstance(module, (nn.Linear, nn.Embedding)):
            if rank > min(shape):
                raise CompressError(
                    f"rank {rank} is larger than {key} allows (shape {shape}, at most {min(shape)})"
                )
            keep[key] = value
        else:
            dropped.append(key)
    if not keep:
        raise CompressError(
            "the delta holds no Linear/Embedding weight change; a LoRA cannot represent it"
        )
    factored = TaskVector(keep).to_rank(rank)
    hosts = attach_lowrank(model, factored, name)
    return {"name": name, "rank": rank, "hosts": hosts, "dropped": dropped}
