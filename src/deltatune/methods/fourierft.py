"""FourierFT: a weight change learned as a few coefficients of its 2-D discrete Fourier spectrum.

Unified view: function = ``ΔW = s·Re(IDFT₂(F))`` where the spectrum ``F`` (out × in) is zero
except at ``n_frequency`` fixed positions drawn from a seed, whose values are the only trained
parameters; position = Linear / GPT-2 Conv1D layers (attention query/value by default);
insertion = parallel, ``h + ΔW·x``. Foldable and additive. The change is not low-rank in general,
so it has no ``factors``.

The positions are drawn as peft draws them (``randperm(out·in)`` from a CPU generator seeded with
``random_loc_seed``, the first ``n_frequency`` of it, row = index // in, column = index % in), so
they are never stored: every layer of one shape gets the same positions, drawn once per attach.

Paper: Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", ICML 2024,
https://arxiv.org/abs/2405.03003
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV


def _pattern(key: str) -> str:
    """peft's reading of an ``n_frequency_pattern`` key: a regex matching the end of a module path
    after a dot (so ``"layer.0.attention.self.query"`` or ``"query"``, not a top-level name)."""
    return rf".*\.{key}$"


class Frequencies:
    """The spectral positions of one attach, by layer shape: a plain object (not a module), so the
    engine passes it to every host and layers of one shape share one index tensor."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def positions(self, n_out: int, n_in: int, n: int) -> torch.Tensor:
        """(2, n) int64 rows and columns of the ``n`` trained coefficients of an out×in spectrum."""
        key = (n_out, n_in, n)
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            flat = torch.randperm(n_out * n_in, generator=gen)[:n]
            self._cache[key] = torch.stack([flat // n_in, flat % n_in])
        return self._cache[key]


@register
@dataclass(frozen=True)
class FourierFT(DeltaSpec):
    """Spectral fine-tuning on Linear / GPT-2 Conv1D layers: ``n_frequency`` trained Fourier
    coefficients per layer (per-layer counts through ``n_frequency_pattern``), scaled by
    ``scaling``. ``init="zeros"`` starts at the base model; ``"normal"`` (N(0, 1), peft's default
    ``init_weights=False``) does not."""

    method = "fourierft"
    example = Example({"n_frequency": 24, "scaling": 10.0, "targets": ("fc1", "fc2")}, bad=(
        ({"n_frequency": 0}, "n_frequency"), ({"scaling": float("nan")}, "scaling"),
        ({"random_loc_seed": -1}, "random_loc_seed"), ({"init": "ones"}, "init"),
        ({"n_frequency_pattern": {"fc1": 0}}, "n_frequency_pattern")))
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = PeftLayout("FOURIERFT", tensors=("fourierft_spectrum",), fan_in_fan_out=True, options=(
        Option("n_frequency", default=1000), Option("scaling", default=150.0),
        Option("random_loc_seed", required="its frequency positions cannot be drawn again; "
               "save it with an integer seed"),
        Option("n_frequency_pattern", default={}),
        init_flag("zeros", "normal", default=False)))

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init: Literal["zeros", "normal"] = "zeros"

    def validate(self) -> None:
        if not _positive_int(self.n_frequency):
            self.fail("n_frequency", "must be a positive integer (trained coefficients per layer)")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            self.fail("scaling", "must be a finite number")
        if not _positive_int(self.random_loc_seed, 0):
            self.fail("random_loc_seed", "must be a non-negative integer")
        for key, value in self.n_frequency_pattern.items():
            if not _positive_int(value):
                self.fail("n_frequency_pattern",
                          f"gives {key!r} {value!r}; counts must be positive integers")
            try:
                re.compile(_pattern(key))
            except re.error as exc:
                self.fail("n_frequency_pattern",
                          f"key {key!r} is not a valid regular expression ({exc})")

    def n_for(self, path: str) -> int:
        """The coefficient count of the module at ``path`` (the first matching pattern, as peft)."""
        for key, value in self.n_frequency_pattern.items():
            if re.match(_pattern(key), path):
                return value
        return self.n_frequency

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n, size = self.n_for(module_name), host.out_features * host.in_features
        if n > size:
            field_ = "n_frequency" if n == self.n_frequency else "n_frequency_pattern"
            self.fail(field_, f"gives {module_name!r} {n} coefficients, more than the "
                      f"{host.out_features}x{host.in_features} = {size} entries of its weight; "
                      f"use at most {size}")

    def shared_state(self, model: nn.Module, paths: list[str]) -> Frequencies:
        return Frequencies(self.random_loc_seed)

    def make_delta(self, host: DeltaHost, module_name: str, shared: Any = None) -> Delta:
        n = self.n_for(module_name)
        positions = shared.positions(host.out_features, host.in_features, n)
        return FourierFTDelta(self, host, n, positions)


def _positive_int(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class FourierFTDelta(Delta):
    """``h + x·ΔWᵀ`` with ``ΔW = scaling·Re(ifft2(F))``; ``fourierft_spectrum`` (n,) holds the
    values of ``F`` at ``indices`` (2, n), a frozen buffer rebuilt from the seed."""

    foldable = True

    def __init__(self, spec: FourierFT, host: DeltaHost, n: int, indices: torch.Tensor) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.shape = (host.out_features, host.in_features)
        self.register_buffer("indices", indices, persistent=False)
        init = torch.randn(n) if spec.init == "normal" else torch.zeros(n)
        self.fourierft_spectrum = nn.Parameter(init)

    def weight_change(self) -> torch.Tensor:
        """``ΔW`` (out, in) in float32 (the inverse FFT needs it, whatever the base's dtype)."""
        spectrum = self.fourierft_spectrum.float()
        dense = spectrum.new_zeros(self.shape)
        dense[self.indices[0], self.indices[1]] = spectrum
        return torch.fft.ifft2(dense).real * self.spec.scaling

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return h + F.linear(x.float(), self.weight_change()).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self.weight_change().detach()
        return {"weight": w.t() if self.fan_in_fan_out else w}
