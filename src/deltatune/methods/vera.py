"""VeRA: one pair of frozen random matrices shared by all layers, and two trained vectors per layer.

Unified view: function = low-rank linear map ``Λ_b·B·Λ_d·A`` where ``A`` (r × in) and ``B`` (out ×
r) are random, frozen and shared by every adapted layer (sliced to each layer's size) and only the
diagonals ``Λ_d`` (r) and ``Λ_b`` (out) train; insertion = parallel, ``h + Λ_b·B·Λ_d·A·x``.
Foldable (additive: ``ΔW = (λ_b ⊙ B)(λ_d ⊙ A)``). ``Λ_b`` starts at 0, so the model equals the base.

``A`` and ``B`` are drawn exactly as peft draws them (Kaiming-uniform from a ``torch.Generator``
seeded with ``projection_seed``, sized to the largest adapted layer), so they can be regenerated
instead of stored (``save_projection=False``, the default here; peft's default stores them).

Paper: Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
https://arxiv.org/abs/2310.11454
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import DeltaHost, Host, get_module
from ..core.peft_layout import Option, PeftLayout
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

_SHARED_A, _SHARED_B = "base_model.vera_A", "base_model.vera_B"


def projection(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``A`` (r × max_in) and ``B`` (max_out × r): Kaiming-uniform (gain √2, fan-in
    mode), drawn in this order from one CPU generator seeded with ``seed`` (peft's
    ``projection_prng_key``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    a = kaiming((r, max_in))
    return a, kaiming((max_out, r))


def _in_out(module: nn.Module) -> tuple[int, int]:
    module = module.base if isinstance(module, Host) else module
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


# -- peft's layout --------------------------------------------------------------------------------
class _VeRALayout(PeftLayout):
    """With ``save_projection`` the shared frozen ``A`` and ``B`` go to the file's root once
    (every layer's slice written into them); each layer reads its slice back."""

    def shared_tensors(self, spec: Any, deltas: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not spec.save_projection:
            return {}
        parts = list(deltas.values())
        a = torch.zeros(spec.r, max(d.vera_A.shape[1] for d in parts))
        b = torch.zeros(max(d.vera_B.shape[0] for d in parts), spec.r)
        for d in parts:  # every slice starts at 0, so together they rebuild the shared matrices
            a[:, : d.vera_A.shape[1]] = d.vera_A.detach().cpu()
            b[: d.vera_B.shape[0]] = d.vera_B.detach().cpu()
        return {_SHARED_A: a, _SHARED_B: b}

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        out = super().load(delta, host, tensors)
        if not delta.spec.save_projection:
            return out
        if _SHARED_A not in tensors or _SHARED_B not in tensors:
            raise DeltaFileError("peft VeRA config says save_projection=true but the file lacks "
                                 "vera_A/vera_B; the file is incomplete")
        a, b = tensors[_SHARED_A], tensors[_SHARED_B]
        n_out, n_in, r = delta.vera_B.shape[0], delta.vera_A.shape[1], delta.spec.r
        if a.shape[0] != r or a.shape[1] < n_in or b.shape[0] < n_out or b.shape[1] != r:
            raise DeltaFileError(f"peft VeRA projection shapes {tuple(a.shape)}/{tuple(b.shape)} "
                                 f"do not fit a {n_out}x{n_in} layer at r={r}")
        out["vera_A"], out["vera_B"] = a[:, :n_in], b[:n_out, :]
        return out


@register
@dataclass(frozen=True)
class VeRA(DeltaSpec):
    """Vector-based random matrix adaptation on Linear / GPT-2 Conv1D layers.

    ``init="identity"`` (λ_b = 0, λ_d = d_initial) or ``"random"`` (peft's ``init_weights=False``:
    λ_b = 1, λ_d ~ N(0, 1); for tests)."""

    method = "vera"
    example = Example(dict(r=4, targets=("fc1", "fc2")), bad=(
        ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"),
        ({"projection_seed": -1}, "projection_seed"), ({"init": "ones"}, "init")))
    default_targets = ATTENTION_QV
    factored = True
    peft = _VeRALayout(
        "VERA", tensors=("vera_lambda_b", "vera_lambda_d"), shared_keys=(_SHARED_A, _SHARED_B),
        fan_in_fan_out=True,
        fixed={"bias": "none", "init_weights": True, "layers_to_transform": None,
               "layers_pattern": None},
        options=(Option("r", default=256), Option("projection_prng_key", "projection_seed", 0),
                 Option("save_projection", default=True), Option("vera_dropout", "dropout", 0.0),
                 Option("d_initial", default=0.1)))

    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_seed: int = 0
    save_projection: bool = False
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (the rank of the shared projection)")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if not math.isfinite(self.d_initial):
            self.fail("d_initial", "must be a finite number")
        if not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            self.fail("projection_seed", "must be a non-negative integer")

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        sizes = [_in_out(get_module(model, p)) for p in paths]
        # the shared frozen projection is r × (max in + max out): bound it by the layers it serves
        limit = sum(i * o for i, o in sizes) // (
            max(s[0] for s in sizes) + max(s[1] for s in sizes)
        )
        if self.r > max(limit, 1):
            k = max(range(len(paths)), key=lambda j: sizes[j][0] * sizes[j][1])
            self.fail(
                "r",
                f"makes the shared projection larger than the {len(paths)} layers it adapts "
                f"together (largest: {paths[k]!r}, {sizes[k][0]}x{sizes[k][1]}); use r <= "
                f"{max(limit, 1)}",
            )

    def shared_state(self, model: nn.Module, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen random projection (A, B) every layer slices: drawn once per attach."""
        sizes = [_in_out(get_module(model, p)) for p in paths]
        return projection(
            self.r, max(s[0] for s in sizes), max(s[1] for s in sizes), self.projection_seed
        )

    def make_delta(self, host: DeltaHost, module_name: str, shared: Any = None) -> Delta:
        return VeRADelta(self, host, *shared)


class VeRADelta(Delta):
    """``h + λ_b ⊙ B·(λ_d ⊙ A·dropout(x))`` with ``A``, ``B`` views of the shared projection."""

    foldable = True

    def __init__(self, spec: VeRA, host: DeltaHost, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        n_in, n_out = host.in_features, host.out_features
        # Views, not copies: every layer reads the same matrices (saved only with save_projection).
        self.register_buffer("vera_A", a[:, :n_in], persistent=spec.save_projection)
        self.register_buffer("vera_B", b[:n_out, :], persistent=spec.save_projection)
        if spec.init == "identity":
            self.vera_lambda_b = nn.Parameter(torch.zeros(n_out))
            self.vera_lambda_d = nn.Parameter(torch.full((spec.r,), float(spec.d_initial)))
        else:  # peft's init_weights=False: both vectors non-trivial (for tests)
            self.vera_lambda_b = nn.Parameter(torch.ones(n_out))
            self.vera_lambda_d = nn.Parameter(torch.randn(spec.r))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        z = F.linear(self.dropout(x.to(self.vera_A.dtype)), self.vera_A) * self.vera_lambda_d
        return h + (F.linear(z, self.vera_B) * self.vera_lambda_b).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = (self.vera_lambda_b[:, None] * self.vera_B) @ (
            self.vera_lambda_d[:, None] * self.vera_A
        )
        return {"weight": (w.t() if self.fan_in_fan_out else w).detach()}
