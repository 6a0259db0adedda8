"""WaveFT: a weight change learned as a few coefficients of its 2-D discrete wavelet transform.

Unified view: function = ``ΔW = s·IDWT₂(C)`` where the one-level wavelet coefficient matrix ``C``
(out × in, split into the four sub-bands LL, LH, HL, HH) is zero except at ``n_frequency`` fixed
positions drawn from a seed, whose values are the only trained parameters; position = Linear / GPT-2
Conv1D layers (attention query/value by default); insertion = parallel, ``h + ΔW·x``. Foldable and
additive; the change is not low-rank in general, so it has no ``factors``. With ``use_idwt=False``
the coefficients are used as the change directly (a sparse ``ΔW``).

The positions are drawn as peft 0.21.2's ``waveft`` tuner draws them (``randperm(out·in)`` from a
CPU generator seeded with ``random_loc_seed``; row = index // in, column = index % in) and are state
shared by every host of one attach (``shared_state``): never stored, one tensor per layer shape.
Longer wavelets shrink the reconstruction, so ``C`` is padded (centred) by the filter's reduction
and the result cropped back to out × in, as peft does.

The inverse transform is written here with ``conv_transpose2d`` (no PyWavelets). Its Daubechies
filters are computed, not tabulated: the minimum-phase spectral factor of the Daubechies polynomial
(float64; equal to PyWavelets' ``dbN`` to ~1e-12). Supported: ``haar`` and ``db1``…``db10``; peft's
symlets and coiflets are refused with a ``SpecError``.

Paper: Bilican et al., "Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets"
(WaveFT), 2025, https://arxiv.org/abs/2505.12532
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import DeltaHost, module_kind
from ..core.peft_layout import Option, PeftLayout, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

FAMILIES = ("haar",) + tuple(f"db{n}" for n in range(1, 11))


@cache
def daubechies(order: int) -> tuple[float, ...]:
    """The reconstruction low-pass filter of ``db<order>`` (length 2·order, sum √2): the factor of
    the Daubechies product filter with all its zeros on or inside the unit circle."""
    # P(y) = Σ_k C(N-1+k, k)·y^k with y = sin²(ω/2) = (2 − z − 1/z)/4; each root y gives the pair
    # z, 1/z of z² − 2(1 − 2y)z + 1 = 0, and the minimum-phase filter keeps the root with |z| < 1
    poly = [math.comb(order - 1 + k, k) for k in range(order)]
    h = np.ones(1, dtype=complex)
    for _ in range(order):
        h = np.convolve(h, [1.0, 1.0])  # the (1 + 1/z)^N zeros at ω = π
    for y in (np.roots(poly[::-1]) if order > 1 else []):
        a = 1 - 2 * y
        z = a + np.sqrt(a * a - 1 + 0j)
        h = np.convolve(h, [1.0, -(z if abs(z) < 1 else 1 / z)])
    h = h.real
    return tuple(float(v) for v in h * math.sqrt(2) / h.sum())


def _filter(family: str) -> tuple[float, ...]:
    return daubechies(1 if family == "haar" else int(family[2:]))


def idwt2(coeffs: torch.Tensor, family: str) -> torch.Tensor:
    """One-level inverse 2-D DWT of ``coeffs`` (2H, 2W) laid out as ``[[LL, LH], [HL, HH]]``
    (quadrants of H × W); returns (2H + 2 − L, 2W + 2 − L) for a filter of length L (the border
    the periodic extension would add is cropped, as PyWavelets' and peft's ``waverec2d``)."""
    lo = torch.tensor(_filter(family), dtype=coeffs.dtype, device=coeffs.device)
    n = lo.numel()
    # high-pass reconstruction filter: the quadrature mirror of the low-pass one
    hi = lo.flip(0) * torch.tensor([(-1.0) ** i for i in range(n)], dtype=lo.dtype,
                                   device=lo.device)
    filt = torch.stack([lo.outer(lo), hi.outer(lo), lo.outer(hi), hi.outer(hi)]).unsqueeze(1)
    h2, w2 = coeffs.shape[0] // 2, coeffs.shape[1] // 2
    bands = torch.stack([coeffs[:h2, :w2], coeffs[:h2, w2:], coeffs[h2:, :w2], coeffs[h2:, w2:]])
    out = F.conv_transpose2d(bands.unsqueeze(0), filt, stride=2)[0, 0]  # (2H + L − 2, 2W + L − 2)
    pad = (2 * n - 3) // 2
    return out[pad:out.shape[0] - pad, pad:out.shape[1] - pad] if pad else out


def _pattern_value(path: str, patterns: dict[str, int], default: int) -> int:
    """peft's pattern rule: the first key matching the end of ``path`` (after a dot) as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class Positions:
    """The coefficient positions of one attach, by layer shape, and each layer's coefficient count:
    a plain object (not a module), so the engine passes it to every host and layers of one shape
    share one index tensor."""

    def __init__(self, seed: int, counts: dict[str, int]) -> None:
        self.seed, self.counts = seed, counts
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def of(self, n_out: int, n_in: int, n: int) -> torch.Tensor:
        """(2, n) int64 rows and columns of the ``n`` trained coefficients of an out×in matrix."""
        key = (n_out, n_in, n)
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            flat = torch.randperm(n_out * n_in, generator=gen)[:n]
            self._cache[key] = torch.stack([flat // n_in, flat % n_in])
        return self._cache[key]


def _shape(model: nn.Module, path: str) -> tuple[int, int]:
    """(out, in) of the Linear / GPT-2 Conv1D at ``path`` (or the one a host there wraps)."""
    m = model.get_submodule(path)
    m = m.base if isinstance(m, DeltaHost) else m
    if module_kind(m) != "linear":
        return 0, 0  # not hostable: the engine names the kind
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.weight.shape[1], m.weight.shape[0]  # Conv1D stores (in, out)


def _read_family(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    family = str(config.get("wavelet_family", "db1"))
    if kw["use_idwt"] and family not in FAMILIES:
        raise DeltaFileError(f"peft WaveFT wavelet_family={family!r} is not supported by "
                             f"deltatune (it has {', '.join(FAMILIES)})")
    return {"wavelet_family": family if family in FAMILIES else "db1"}


@register
@dataclass(frozen=True)
class WaveFT(DeltaSpec):
    """Wavelet fine-tuning on Linear / GPT-2 Conv1D layers: ``n_frequency`` trained wavelet
    coefficients per layer (per module through ``n_frequency_pattern``, or spread over the layers
    in proportion to their sizes with ``proportional_parameters``), scaled by ``scaling``, put back
    with the ``wavelet_family``'s inverse transform (``use_idwt``). ``init="zeros"`` starts at the
    base model; ``"normal"`` (N(0, 0.01²), peft's ``init_weights=False``) does not."""

    method = "waveft"
    example = Example(
        {"n_frequency": 24, "scaling": 10.0, "wavelet_family": "db2", "targets": ("fc1", "fc2")},
        bad=(
            ({"n_frequency": 0}, "n_frequency"),
            ({"scaling": float("nan")}, "scaling"),
            ({"wavelet_family": "sym2"}, "wavelet_family"),
            ({"random_loc_seed": -1}, "random_loc_seed"),
            ({"init": "ones"}, "init"),
            ({"n_frequency_pattern": {"fc1": 0}}, "n_frequency_pattern"),
        ),
    )
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = PeftLayout(
        "WAVEFT", tensors=("waveft_spectrum",), fan_in_fan_out=True, read=_read_family,
        options=(Option("n_frequency", default=2592), Option("scaling", default=25.0),
                 Option("wavelet_family", read=False), Option("use_idwt", default=True),
                 Option("random_loc_seed", required="its coefficient positions cannot be drawn "
                        "again; save it with an integer seed"),
                 Option("n_frequency_pattern", default={}),
                 Option("proportional_parameters", default=False),
                 init_flag("zeros", "normal")))

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init: Literal["zeros", "normal"] = "zeros"

    def validate(self) -> None:
        if not _positive_int(self.n_frequency):
            self.fail("n_frequency", "must be a positive integer (trained coefficients per layer)")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            self.fail("scaling", "must be a finite number")
        if self.wavelet_family not in FAMILIES:
            self.fail("wavelet_family", f"is not supported; use one of {', '.join(FAMILIES)} "
                      "(symlets and coiflets are not implemented)")
        if not isinstance(self.use_idwt, bool):
            self.fail("use_idwt", "must be true or false")
        if not isinstance(self.proportional_parameters, bool):
            self.fail("proportional_parameters", "must be true or false")
        if not _positive_int(self.random_loc_seed, 0):
            self.fail("random_loc_seed", "must be a non-negative integer")
        for key, value in self.n_frequency_pattern.items():
            if not _positive_int(value):
                self.fail("n_frequency_pattern",
                          f"gives {key!r} {value!r}; counts must be positive integers")
            try:
                re.compile(key)
            except re.error as exc:
                self.fail("n_frequency_pattern",
                          f"key {key!r} is not a valid regular expression ({exc})")

    def counts(self, model: nn.Module, paths: list[str]) -> dict[str, int]:
        """Each selected layer's coefficient count (peft's priority: proportional, pattern, n)."""
        if not self.proportional_parameters:
            return {p: _pattern_value(p, self.n_frequency_pattern, self.n_frequency) for p in paths}
        sizes = {p: math.prod(_shape(model, p)) for p in paths}
        total, budget = sum(sizes.values()) or 1, self.n_frequency * len(paths)
        # at least one coefficient each: a plain round can give a small layer none
        return {p: max(1, round(size / total * budget)) for p, size in sizes.items()}

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        for path, n in self.counts(model, paths).items():
            n_out, n_in = _shape(model, path)
            if n_out and n > n_out * n_in:
                name = ("proportional_parameters" if self.proportional_parameters else
                        "n_frequency" if n == self.n_frequency else "n_frequency_pattern")
                self.fail(name, f"gives {path!r} {n} coefficients, more than the {n_out}x{n_in} = "
                          f"{n_out * n_in} entries of its weight; use at most {n_out * n_in}")

    def shared_state(self, model: nn.Module, paths: list[str]) -> Positions:
        return Positions(self.random_loc_seed, self.counts(model, paths))

    def make_delta(self, host: DeltaHost, module_name: str, shared: Any = None) -> Delta:
        n = shared.counts[module_name]
        return WaveFTDelta(self, host, shared.of(host.out_features, host.in_features, n))


def _positive_int(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class WaveFTDelta(Delta):
    """``h + x·ΔWᵀ``; ``waveft_spectrum`` (n,) holds the coefficients at ``indices`` (2, n), a
    frozen buffer rebuilt from the seed (float32 whatever the base's dtype)."""

    foldable = True

    def __init__(self, spec: WaveFT, host: DeltaHost, indices: torch.Tensor) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.shape = (host.out_features, host.in_features)
        self.register_buffer("indices", indices, persistent=False)
        n = indices.shape[1]
        init = torch.randn(n) * 0.01 if spec.init == "normal" else torch.zeros(n)
        self.waveft_spectrum = nn.Parameter(init.to(host.weight.device))

    def weight_change(self) -> torch.Tensor:
        """``ΔW`` (out, in) in float32."""
        spec: WaveFT = self.spec  # type: ignore[assignment]
        values, (n_out, n_in) = self.waveft_spectrum.float(), self.shape
        rows, cols = self.indices[0].to(values.device), self.indices[1].to(values.device)
        if not spec.use_idwt:
            dense = values.new_zeros(self.shape)
            dense[rows, cols] = values
            return dense * spec.scaling
        # pad by the filter's shrinkage (length − 2), rounded up to even sizes, data centred
        grow = len(_filter(spec.wavelet_family)) - 2
        p_out, p_in = n_out + grow, n_in + grow
        p_out, p_in = p_out + p_out % 2, p_in + p_in % 2
        dense = values.new_zeros(p_out, p_in)
        dense[rows + (p_out - n_out) // 2, cols + (p_in - n_in) // 2] = values
        w = idwt2(dense, spec.wavelet_family) * spec.scaling
        top, left = (w.shape[0] - n_out) // 2, (w.shape[1] - n_in) // 2
        return w[top:top + n_out, left:left + n_in]  # centred crop to (out, in)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return h + F.linear(x.float(), self.weight_change()).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self.weight_change().detach()
        return {"weight": w.t() if self.fan_in_fan_out else w}
