"""C3A: a weight change made of circulant blocks, applied as a circular convolution through FFTs.

Unified view: function = ``ΔW = C / in`` where ``C`` (out × in) is split into ``b × b`` blocks
(``b = block_size``, which divides both sizes) and block ``(m, n)`` is the circulant matrix of one
trained kernel ``k[m, n]`` (``b`` values): ``C[m·b + t, n·b + j] = k[m, n, (j − t) mod b]``;
position = Linear / GPT-2 Conv1D layers (attention query/value by default); insertion = parallel,
``h + ΔW·x``. Each block applied to an input chunk is a circular cross-correlation, computed as
``irfft(conj(rfft(k))·rfft(x))`` in float32, so the forward never forms ``ΔW``; the parameter
count is ``out·in / b``, and the change is generally of full rank (no ``factors``). Foldable and
additive; ``delta_weight`` gathers the dense blocks directly (no FFT), which is exact.

The ``1/in`` factor (peft's division by the input width) keeps the change's size independent of
the layer width. ``init="zeros"`` starts at the base model; peft's default ``"xavier_uniform"`` and
the other inits do not.

Paper: Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution", ACL 2025,
https://arxiv.org/abs/2407.19342
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, linear_only
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@register
@dataclass(frozen=True)
class C3A(DeltaSpec):
    """Circular-convolution adaptation on Linear / GPT-2 Conv1D layers: one trained kernel of
    ``block_size`` values per ``block_size × block_size`` block of the weight (per-layer block sizes
    through ``block_size_pattern``)."""

    method = "c3a"
    example = Example({"block_size": 8, "targets": ("fc1", "fc2")}, bad=(
        ({"block_size": 0}, "block_size"), ({"init": "ones"}, "init"),
        ({"block_size_pattern": {"fc1": 0}}, "block_size_pattern")))
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = PeftLayout(
        "C3A", tensors=("c3a_kernel",), check=linear_only,
        fixed={"bias": "none", "layers_to_transform": None, "layers_pattern": None},
        options=(Option("block_size", default=256), Option("block_size_pattern", default={}),
                 Option("init_weights", "init", "xavier_uniform", choices=(
                     ("zeros", True), ("xavier_uniform", "xavier_uniform"),
                     ("kaiming_uniform", "kaiming_uniform"), ("gaussian", "gaussian"),
                     ("xavier_uniform", False)))))

    block_size: int = 256
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init: Literal["zeros", "xavier_uniform", "kaiming_uniform", "gaussian"] = "zeros"

    def validate(self) -> None:
        if not _positive_int(self.block_size):
            self.fail("block_size", "must be a positive integer (it must divide both layer sizes)")
        for key, value in self.block_size_pattern.items():
            if not _positive_int(value):
                self.fail("block_size_pattern",
                          f"gives {key!r} {value!r}; block sizes must be positive integers")
            try:
                re.compile(rf".*\.{key}$")
            except re.error as exc:
                self.fail("block_size_pattern",
                          f"key {key!r} is not a valid regular expression ({exc})")

    def block_for(self, path: str) -> int:
        """The block size of the module at ``path``: the first pattern key matching the end of the
        path after a dot, else an exact key, else ``block_size`` (peft's reading)."""
        for key, value in self.block_size_pattern.items():
            if re.match(rf".*\.{key}$", path):
                return value
        return self.block_size_pattern.get(path, self.block_size)

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        b = self.block_for(module_name)
        n_in, n_out = host.in_features, host.out_features
        if n_in % b or n_out % b:
            name = "block_size" if b == self.block_size else "block_size_pattern"
            divisors = [
                d for d in range(1, math.gcd(n_in, n_out) + 1) if math.gcd(n_in, n_out) % d == 0
            ]
            self.fail(name, f"gives block size {b} on {module_name!r}, which does not divide both "
                      f"its sizes {n_out}x{n_in}; use one of {divisors[-4:]}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return C3ADelta(self, host, self.block_for(module_name))


class C3ADelta(Delta):
    """Parameter ``c3a_kernel`` (out/b, in/b, b): one circular kernel per block; float32 on
    half-precision bases (the FFTs need it), float64 on float64 ones."""

    foldable = True

    def __init__(self, spec: C3A, host: DeltaHost, block: int) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.block = block
        n_in, n_out = host.in_features, host.out_features
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        kernel = torch.zeros(n_out // block, n_in // block, block, dtype=dtype, device=ref.device)
        if spec.init == "gaussian":
            nn.init.normal_(kernel)
        elif spec.init == "xavier_uniform":  # the bound of a dense out x in layer
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (n_in + n_out))
            nn.init.uniform_(kernel, -bound, bound)
        elif spec.init == "kaiming_uniform":
            bound = math.sqrt(1.0 / n_in)
            nn.init.uniform_(kernel, -bound, bound)
        self.c3a_kernel = nn.Parameter(kernel)

    def weight_change(self) -> torch.Tensor:
        """``ΔW`` (out, in): the circulant blocks gathered from the kernels, divided by ``in``."""
        m, n, b = self.c3a_kernel.shape
        t = torch.arange(b, device=self.c3a_kernel.device)
        shift = (t[None, :] - t[:, None]) % b  # (b, b): [t, j] -> (j - t) mod b
        blocks = self.c3a_kernel[:, :, shift]  # (m, n, b_t, b_j)
        return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        m, n, b = self.c3a_kernel.shape
        chunks = x.to(self.c3a_kernel.dtype).reshape(*x.shape[:-1], n, b)  # (..., n, b)
        spectrum = torch.fft.rfft(chunks)  # (..., n, b//2+1)
        kernel = torch.fft.rfft(self.c3a_kernel).conj()  # (m, n, b//2+1): correlation, not conv
        mixed = torch.einsum("...nf,mnf->...mf", spectrum, kernel)
        y = torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b) / (n * b)
        return h + y.to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self.weight_change().detach()
        return {"weight": w.t() if self.fan_in_fan_out else w}
