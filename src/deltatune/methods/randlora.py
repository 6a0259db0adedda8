"""RandLoRA: a full-rank weight change from many frozen random low-rank bases, trained by scaling.

Unified view: function = ``ΔW = s·B̄·Ā`` on the layer's larger (``M``) and smaller (``m``) side:
``Ā`` ((r·k) × m) stacks ``k = ⌈m / r⌉`` copies of one frozen random ``A`` (r × m), copy ``j``
scaled row-wise by ``λ[:, j]`` and column-wise by ``γ[j]`` (``λ`` r × k and ``γ`` k × m are the only
trained parameters), and ``B̄`` (M × (k·r)) is ``k`` frozen random bases ``B_j`` (M × r) side by
side; ``s = alpha / r``. With ``k·r ≥ m`` the change can reach full rank, unlike LoRA's. When the
input is the smaller side ``ΔW = B̄·Ā`` (out × in), else its transpose. position = Linear / GPT-2
Conv1D layers (attention query/value by default); insertion = parallel, ``h + ΔW·x``, computed
through the ``k·r``-wide bottleneck. Foldable and additive; no ``factors`` (the product is of full
rank by design, so it is not a low-rank change).

``Ā``'s rows are read in (rank, basis) order and ``B̄``'s columns in (basis, rank) order, as peft
flattens them; the random bases ``A`` (r × 1 × m_max) and ``B`` (M_max × k_max × r) are shared by
every adapted layer (each slices its own size), drawn as peft draws them from a CPU generator
seeded with ``projection_seed``: Kaiming-uniform in bfloat16, divided by their standard deviation
(``bases="dense"``), or ternary {−1, 0, 1} from uniform draws (``"sparse"``: 1/6 each sign;
``"very_sparse"``: 1/(2·√m_max) each sign). peft draws the dense bases in float16 on hardware
without bfloat16; there ``save_projection=True`` keeps its files exact. ``init="identity"``
(``λ = 0``) starts at the base model.

Paper: Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
ICLR 2025, https://arxiv.org/abs/2502.00987
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import DeltaHost, Host, get_module
from ..core.peft_layout import Option, PeftLayout, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

_SHARED_A, _SHARED_B = "base_model.randlora_A", "base_model.randlora_B"


def _n_bases(small: int, r: int) -> int:
    """``⌈small / r⌉``: enough rank-``r`` bases to span the layer's smaller side."""
    return -(-small // r)


def bases(r: int, n_out: int, n_in: int, seed: int,
          kind: str = "dense") -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen ``A`` (r, 1, m) and ``B`` (M, k, r) for a largest shape ``n_out × n_in``
    (m, M its smaller and larger size, ``k = ⌈m / r⌉``), float32, in peft's drawing order."""
    small, large = min(n_out, n_in), max(n_out, n_in)
    k = _n_bases(small, r)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "dense":
        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)

        a = draw((r, 1, small))
        b = torch.cat([draw((large, 1, r)) for _ in range(k)], dim=1)
        # the division happens in bfloat16, as peft's does: the values must be bit-equal
        return (a / a.std()).float(), (b / b.std()).float()
    sparsity = 3.0 if kind == "sparse" else math.sqrt(small)
    a_u = torch.rand((r, 1, small), generator=gen)
    b_u = torch.rand((large, k, r), generator=gen)

    def ternary(u: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return t / t.std()

    return ternary(a_u), ternary(b_u)


def _out_in(module: nn.Module) -> tuple[int, int]:
    module = module.base if isinstance(module, Host) else module
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]


# -- peft's layout --------------------------------------------------------------------------------
class _RandLoRALayout(PeftLayout):
    """With ``save_projection`` the frozen bases go to the file's root once, in peft's shape;
    each layer reads its slice back."""

    def shared_tensors(self, spec: Any, deltas: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not spec.save_projection:
            return {}
        parts = list(deltas.values())
        # peft's shape (that of the largest layer shape), which no single layer's slice may reach
        a, b = (torch.zeros(shape) for shape in parts[0].shared_shapes)
        for d in parts:  # every slice starts at 0; parts no layer reads stay 0
            a[:, :, : d.randlora_A.shape[2]] = d.randlora_A.detach().cpu()
            b[: d.randlora_B.shape[0], : d.randlora_B.shape[1]] = d.randlora_B.detach().cpu()
        return {_SHARED_A: a, _SHARED_B: b}

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        out = super().load(delta, host, tensors)
        if not delta.spec.save_projection:
            return out
        # peft saves the whole shared bases beside every layer and once at the root
        a = tensors.get("randlora_A", tensors.get(_SHARED_A))
        b = tensors.get("randlora_B", tensors.get(_SHARED_B))
        if a is None or b is None:
            raise DeltaFileError("peft RandLoRA config says save_projection=true but the file "
                                 "lacks randlora_A/randlora_B; the file is incomplete")
        (r, _, small), (large, k, _) = delta.randlora_A.shape, delta.randlora_B.shape
        if (a.dim() != 3 or b.dim() != 3 or a.shape[0] != r or a.shape[2] < small
                or b.shape[0] < large or b.shape[1] < k or b.shape[2] != r):
            raise DeltaFileError(f"peft RandLoRA bases of shapes {tuple(a.shape)}/"
                                 f"{tuple(b.shape)} do not fit a {large}x{small} layer at r={r}")
        out["randlora_A"], out["randlora_B"] = a[:, :, :small], b[:large, :k, :]
        return out


def _write_bases(spec: Any, deltas: dict[str, Any]) -> dict[str, Any]:
    return {"sparse": spec.bases == "sparse", "very_sparse": spec.bases == "very_sparse"}


def _read_bases(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    if config.get("very_sparse"):
        return {"bases": "very_sparse"}
    return {"bases": "sparse" if config.get("sparse") else "dense"}


@register
@dataclass(frozen=True)
class RandLoRA(DeltaSpec):
    """Random-basis adaptation on Linear / GPT-2 Conv1D layers: rank-``r`` frozen random bases,
    ``⌈min(in, out) / r⌉`` of them per layer, combined by trained scales (a smaller ``r`` means
    more bases and more trained parameters). ``init="random"`` is peft's ``init_weights=False``
    (``λ ~ N(0, 1)``; for tests)."""

    method = "randlora"
    example = Example({"r": 4, "alpha": 8.0, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"),
        ({"alpha": float("inf")}, "alpha"), ({"projection_seed": -1}, "projection_seed"),
        ({"bases": "dense_"}, "bases"), ({"init": "zeros"}, "init")))
    default_targets = ATTENTION_QV
    host_what = "Linear / GPT-2 Conv1D modules"
    peft = _RandLoRALayout(
        "RANDLORA", tensors=("randlora_lambda", "randlora_gamma"),
        extra_suffixes=("randlora_A", "randlora_B"), shared_keys=(_SHARED_A, _SHARED_B),
        fan_in_fan_out=True, write=_write_bases, read=_read_bases,
        fixed={"bias": "none", "init_weights": True, "layers_to_transform": None,
               "layers_pattern": None},
        options=(Option("r", default=32), Option("randlora_alpha", "alpha", 640),
                 Option("randlora_dropout", "dropout", 0.0),
                 Option("projection_prng_key", "projection_seed", 0),
                 Option("save_projection", default=True),
                 init_flag("identity", "random", write=False)))

    r: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    projection_seed: int = 0
    save_projection: bool = False
    bases: Literal["dense", "sparse", "very_sparse"] = "dense"
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            self.fail("r", "must be a positive integer (the rank of each random basis)")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            self.fail("alpha", "must be a finite number (the change is scaled by alpha / r)")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            self.fail("projection_seed", "must be a non-negative integer")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        small = min(host.in_features, host.out_features)
        if self.r > small:
            self.fail("r", f"is wider than {module_name!r}'s smaller size {small} "
                      f"({host.out_features}x{host.in_features}); use r <= {small}")

    def shared_state(self, model: nn.Module, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen random bases every layer slices, for the largest shape (drawn once)."""
        sizes = [_out_in(get_module(model, p)) for p in paths]
        n_out, n_in = max(s[0] for s in sizes), max(s[1] for s in sizes)
        return bases(self.r, n_out, n_in, self.projection_seed, self.bases)

    def make_delta(self, host: DeltaHost, module_name: str, shared: Any = None) -> Delta:
        return RandLoRADelta(self, host, *shared)


class RandLoRADelta(Delta):
    """Parameters ``randlora_lambda`` (r, k) and ``randlora_gamma`` (k, m); buffers ``randlora_A``
    (r, 1, m) and ``randlora_B`` (M, k, r): views of the shared bases (saved with
    ``save_projection`` only)."""

    foldable = True

    def __init__(self, spec: RandLoRA, host: DeltaHost, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        n_in, n_out = host.in_features, host.out_features
        small, large = min(n_in, n_out), max(n_in, n_out)
        self.input_is_small = n_in == small
        k = _n_bases(small, spec.r)
        self.scaling = spec.alpha / spec.r
        self.shared_shapes = (tuple(a.shape), tuple(b.shape))
        # Views, not copies: every layer reads the same bases.
        self.register_buffer("randlora_A", a[:, :, :small], persistent=spec.save_projection)
        self.register_buffer("randlora_B", b[:large, :k, :], persistent=spec.save_projection)
        if spec.init == "identity":
            lam = torch.zeros(spec.r, k)
            gamma = torch.full((k, small), 1.0 / max(k, small))
        else:  # peft's init_weights=False
            lam = torch.randn(spec.r, k)
            gamma = torch.full((k, small), 1.0 / large)
        self.randlora_lambda = nn.Parameter(lam)
        self.randlora_gamma = nn.Parameter(gamma)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def _sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Ā`` ((r·k), m) with the trained scales applied, and ``B̄`` (M, (k·r))."""
        scaled = self.randlora_lambda[:, :, None] * self.randlora_A * self.randlora_gamma[None]
        return scaled.flatten(0, 1), self.randlora_B.flatten(1)  # rows (rank, basis) order

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        a_bar, b_bar = self._sides()
        x = self.dropout(x.to(a_bar.dtype))
        if self.input_is_small:  # ΔW = B̄·Ā: in -> r·k -> out
            y = F.linear(F.linear(x, a_bar), b_bar)
        else:  # ΔW = (B̄·Ā)ᵀ = Āᵀ·B̄ᵀ: in -> k·r -> out
            y = F.linear(F.linear(x, b_bar.t()), a_bar.t())
        return h + (y * self.scaling).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        a_bar, b_bar = self._sides()
        w = (b_bar @ a_bar) * self.scaling  # (M, m)
        if not self.input_is_small:
            w = w.t()  # (out, in)
        return {"weight": (w.t() if self.fan_in_fan_out else w).detach()}
