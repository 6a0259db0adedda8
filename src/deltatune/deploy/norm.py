"""Normalisation layers: which parameters Tent-style methods adapt, and how BatchNorm normalises.

Test-time methods run the model in ``eval()`` mode (dropout off) and change how each BatchNorm layer
normalises through a forward hook instead of switching it to ``train()``: that way the stored source
statistics are never overwritten, dropout stays off, and the source behaviour is one ``disable()``
away.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BatchError, DeployError

StatsMode = Literal["batch", "mix", "ema"]


def is_norm(module: nn.Module) -> bool:
    """BatchNorm, LayerNorm, GroupNorm, InstanceNorm and RMSNorm layers (also custom ``*Norm``
    classes)."""
    if isinstance(
        module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    ):
        return True
    # transformers' LlamaRMSNorm, T5LayerNorm, ... are plain modules named like norms with a weight
    name = type(module).__name__
    has_weight = isinstance(getattr(module, "weight", None), nn.Parameter)
    return name.endswith(("Norm", "LayerNorm", "RMSNorm")) and has_weight


def norm_param_names(model: nn.Module) -> list[str]:
    """Full names of the affine parameters (weight, bias) of every normalisation layer."""
    names = []
    for mod_name, module in model.named_modules():
        if is_norm(module):
            for p_name, p in module.named_parameters(recurse=False):
                if p_name in ("weight", "bias") and p is not None:
                    names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


class BatchNormStats:
    """Make every BatchNorm layer normalise with test-batch statistics, leaving its buffers alone.

    mode ``batch``: the current batch's mean and (biased) variance, differentiable, exactly as
    ``train()`` mode computes them: a pre-hook runs the layer in training mode with
    ``track_running_stats=False``, so the stored source statistics are neither used nor updated.
    mode ``mix``: ``alpha * source + (1 - alpha) * batch`` statistics (α-BN).
    mode ``ema``: a running estimate that starts at the source statistics and moves towards the
    target stream, ``new = (1 - momentum) * old + momentum * batch``; the batch is normalised with
    the updated estimate; with ``source_batches=k`` the weight of batch ``t`` is ``max(momentum,
    1 / (t + k))``, a running mean in which the source statistics count as ``k`` batches, so a short
    stream moves off the source quickly and a long one settles into the moving average. Kept in this
    object, so :meth:`reset` brings back the source statistics;
    with ``track = False`` a forward uses the estimate as it stands and leaves it alone (a second
    look at the same batch).
    With ``enabled = False`` the layers use their source statistics (eval behaviour).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: StatsMode = "batch",
        *,
        alpha: float = 0.0,
        momentum: float = 1.0,
        source_batches: float | None = None,
    ) -> None:
        if mode not in ("batch", "mix", "ema"):
            raise DeployError(f"BatchNorm statistics mode must be batch, mix or ema, not {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise DeployError(
                f"alpha={alpha} must lie in [0, 1] (the weight of the source statistics)"
            )
        if not 0.0 < momentum <= 1.0:
            raise DeployError(
                f"momentum={momentum} must lie in (0, 1] (the weight of each new batch)"
            )
        self.layers = batchnorm_layers(model)
        if source_batches is not None and not source_batches > 0:
            raise DeployError(f"source_batches={source_batches} must be positive (or None)")
        self.mode, self.alpha, self.momentum = mode, alpha, momentum
        self.source_batches = source_batches
        self._count: dict[str, int] = {}
        if mode != "batch":
            missing = [n for n, m in self.layers if m.running_mean is None]
            if missing:
                raise DeployError(
                    f"BatchNorm layer {missing[0]!r} keeps no running statistics "
                    "(track_running_stats=False), so there are no source statistics for mode "
                    f"{mode!r}; use mode 'batch' (method 'bn')"
                )
        self.enabled = True
        self.track = True  # False: ema mode normalises with its estimate without moving it
        self.owner: Any = None  # the wrapper that installed these hooks
        self._target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved = {n: (m.training, m.track_running_stats) for n, m in self.layers}
        if mode == "batch":
            for _, m in self.layers:
                m.track_running_stats = (
                    False  # train-mode forward then neither reads nor writes the buffers
                )
            self._handles = [m.register_forward_pre_hook(self._pre_hook(n)) for n, m in self.layers]
        else:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for n, m in self.layers:
            m.training, m.track_running_stats = self._saved[n]

    def reset(self) -> None:
        self._target.clear()
        self._count.clear()

    def _check(self, name: str, x: torch.Tensor) -> int:
        count = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 0
        if count < 2 and not (self.mode == "mix" and count == 1):
            raise BatchError(
                f"BatchNorm layer {name!r} sees {count} value per channel in this batch, so batch "
                "statistics are undefined; use batches of 2 or more, or method 'alpha_bn' (mixes "
                "in the source statistics)"
            )
        return count

    def _pre_hook(self, name: str):
        def hook(module: _BatchNorm, inputs: tuple) -> None:
            # training=True: normalise by the batch; False (disabled): by the stored source
            # statistics
            module.training = self.enabled
            if self.enabled:
                self._check(name, inputs[0])

        return hook

    def _hook(self, name: str):
        def hook(module: _BatchNorm, inputs: tuple, output: Any) -> Any:
            if not self.enabled:
                return None
            return self._normalise(name, module, inputs[0])

        return hook

    def _normalise(self, name: str, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        count = self._check(name, x)
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            mean_b = x.mean(dims)
            var_b = x.var(dims, unbiased=False) if count > 1 else torch.zeros_like(mean_b)
            if self.mode == "mix":
                mean = self.alpha * bn.running_mean + (1 - self.alpha) * mean_b
                var = self.alpha * bn.running_var + (1 - self.alpha) * var_b
            elif not self.track:
                mean, var = self._target.get(name, (bn.running_mean, bn.running_var))
            else:
                old_mean, old_var = self._target.get(name, (bn.running_mean, bn.running_var))
                m = self.momentum
                if self.source_batches is not None:  # a running mean until it slows below m
                    self._count[name] = self._count.get(name, 0) + 1
                    m = max(m, 1.0 / (self._count[name] + self.source_batches))
                mean = (1 - m) * old_mean + m * mean_b
                var = (1 - m) * old_var + m * var_b
                self._target[name] = (mean, var)
        return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
