"""GraLoRA: granular low-rank adaptation, a ``k × k`` grid of small low-rank blocks.

Unified view: function = ``ΔW`` split into ``k × k`` blocks of size ``out/k × in/k``; block
``(j, n)`` (output chunk ``j``, input chunk ``n``) is its own rank-``r/k`` product, so the change
has rank up to ``k·r`` for the parameters of a rank-``r`` LoRA, and a large input in one chunk no
longer moves every output (the gradient entanglement of LoRA the paper describes). Input chunk ``n``
has one ``A_n`` (in/k × r) whose ``r`` columns are ``k`` pieces of ``r/k``, piece ``j`` feeding
output chunk ``j``; output chunk ``j`` has one ``B_j`` (r × out/k) whose rows are ``k`` pieces,
piece ``n`` reading input chunk ``n``. With ``hybrid_r > 0`` a plain LoRA of that rank is added
beside it (Hybrid GraLoRA); both are scaled by ``alpha / (r + hybrid_r)``. Position = a Linear layer
(attention q/v by default); insertion = parallel on the module's input, ``h + s·ΔW·x``. Every ``B``
starts at zero, so the model equals the base at init.

Foldable, and exactly low-rank: :meth:`GraLoRADelta.factors` writes the ``k²`` blocks as one
rank-``k·r`` term (zero outside each block's chunks) plus the hybrid LoRA. Tensor layout
(``gralora_A`` (k, in/k, r), ``gralora_B`` (k, r, out/k), ``gralora_{A,B}_general``) and math follow
peft 0.21.2's ``gralora`` tuner.

Paper: Jung et al., "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
2025, https://arxiv.org/abs/2505.20355
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, PeftTensor, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

#: the tensors in peft's file (the hybrid LoRA's are nn.Linear weights there)
_PEFT_TENSORS = ("gralora_A", "gralora_B",
                 PeftTensor("gralora_A_general", "gralora_A_general.weight"),
                 PeftTensor("gralora_B_general", "gralora_B_general.weight"))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _one_flag(spec: DeltaSpec, deltas: dict[str, Delta]) -> str:
    if len({bool(d.fan_in_fan_out) for d in deltas.values()}) > 1:
        return ("peft's GraLoRA has one fan_in_fan_out flag per adapter; this one mixes Linear and "
                "GPT-2 Conv1D layers")
    return ""


@register
@dataclass(frozen=True)
class GraLoRA(DeltaSpec):
    """Granular LoRA on Linear / GPT-2 Conv1D layers: rank ``r`` (divisible by ``k``), ``k`` blocks
    per side (peft's ``gralora_k``; ``k`` must divide both layer sizes), ``hybrid_r`` (rank of a
    plain LoRA beside it), ``alpha`` (scale ``alpha / (r + hybrid_r)``), ``dropout`` on the input
    (peft's ``gralora_dropout``), ``init="random"`` (peft's ``init_weights=False``: ``B`` random
    too; for tests)."""

    method = "gralora"
    example = Example({"r": 4, "k": 2, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"r": 3}, "r"), ({"k": 0}, "k"), ({"hybrid_r": -1}, "hybrid_r"),
        ({"alpha": float("inf")}, "alpha"), ({"dropout": 1.0}, "dropout"),
        ({"init": "zeros"}, "init")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    peft = PeftLayout(
        "GRALORA", tensors=_PEFT_TENSORS, fan_in_fan_out=True, check=_one_flag,
        options=(Option("r", default=32), Option("hybrid_r", default=0),
                 Option("alpha", default=64), Option("gralora_dropout", "dropout", 0.0),
                 Option("gralora_k", "k", 2),
                 init_flag("identity", "random")))

    r: int = 32
    k: int = 2
    hybrid_r: int = 0
    alpha: float = 64.0
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        if not _positive_int(self.r):
            self.fail("r", "must be a positive integer (the rank)")
        if not _positive_int(self.k):
            self.fail("k", "must be a positive integer (blocks per side)")
        if self.r % self.k:
            self.fail("r", f"must be divisible by k={self.k} (each block has rank r/k)")
        if not isinstance(self.hybrid_r, int) or isinstance(self.hybrid_r, bool) \
                or self.hybrid_r < 0:
            self.fail("hybrid_r", "must be an integer >= 0 (rank of the plain LoRA beside it)")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            self.fail("alpha", "must be a finite number (scale = alpha / (r + hybrid_r))")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n_in, n_out = host.in_features, host.out_features
        if n_in % self.k or n_out % self.k:
            self.fail("k", f"must divide both sizes of {module_name!r} ({n_in} in, {n_out} out); "
                      "use a k that divides every target's sizes")
        limit = host.max_rank
        if limit is not None and self.hybrid_r > limit:
            self.fail("hybrid_r", f"exceeds the rank limit {limit} of {module_name!r} (min of its "
                      f"input and output sizes); use hybrid_r <= {limit}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return GraLoRADelta(self, host)


class GraLoRADelta(Delta):
    """``gralora_A`` (k, in/k, r), ``gralora_B`` (k, r, out/k); with ``hybrid_r > 0`` also
    ``gralora_A_general`` (hybrid_r, in) and ``gralora_B_general`` (out, hybrid_r)."""

    foldable = True

    def __init__(self, spec: GraLoRA, host: DeltaHost) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        k, r, hr = spec.k, spec.r, spec.hybrid_r
        n_in, n_out = host.in_features, host.out_features
        self.scale = spec.alpha / (r + hr)

        def kaiming(*shape: int) -> torch.Tensor:
            return nn.init.kaiming_uniform_(torch.empty(*shape, dtype=dtype, device=ref.device),
                                            a=math.sqrt(5))

        def b_init(*shape: int) -> torch.Tensor:
            if spec.init == "random":
                return kaiming(*shape)
            return torch.zeros(*shape, dtype=dtype, device=ref.device)

        # one (r, in/k) block at a time, as the paper's per-block LoRA (its fan-in is in/k)
        self.gralora_A = nn.Parameter(torch.stack([kaiming(r, n_in // k).t() for _ in range(k)]))
        self.gralora_B = nn.Parameter(torch.stack([b_init(n_out // k, r).t() for _ in range(k)]))
        if hr:
            self.gralora_A_general = nn.Parameter(kaiming(hr, n_in))
            self.gralora_B_general = nn.Parameter(b_init(n_out, hr))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        k = self.spec.k
        a, b = self.gralora_A, self.gralora_B
        xd = self.dropout(x.to(a.dtype))
        u = torch.einsum("...ni,nir->...nr", xd.unflatten(-1, (k, -1)), a)  # (..., k_in, r)
        # piece j of input chunk n's code feeds output chunk j: regroup (n, j) → (j, n)
        v = u.unflatten(-1, (k, -1)).transpose(-3, -2).flatten(-2)  # (..., k_out, r)
        out = torch.einsum("...jr,jro->...jo", v, b).flatten(-2)  # (..., out)
        if self.spec.hybrid_r:
            out = out + F.linear(F.linear(xd, self.gralora_A_general), self.gralora_B_general)
        return h + (self.scale * out).to(h.dtype)

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k²`` rank-``r/k`` blocks as one rank-``k·r`` pair: ``A`` (k·r, in) and ``B``
        (out, k·r), term ``(j, n)`` zero outside input chunk ``n`` and output chunk ``j``."""
        k = self.spec.k
        a = self.gralora_A.unflatten(-1, (k, -1))  # (k_n, in/k, k_j, r/k)
        b = self.gralora_B.unflatten(1, (k, -1))  # (k_j, k_n, r/k, out/k)
        eye = torch.eye(k, dtype=a.dtype, device=a.device)
        # A_full[j, n, s, m, i] = a[n, i, j, s] if m == n; B_full[j, o, j', n, s] = b[j, n, s, o]
        a_full = torch.einsum("nijs,nm->jnsmi", a, eye).flatten(-2).flatten(0, 2)
        b_full = torch.einsum("jnso,jl->jolns", b, eye).flatten(0, 1).flatten(1)
        return a_full, b_full

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        a, b = self._blocks()
        terms = [Factor(a.detach(), b.detach(), self.scale, bool(self.fan_in_fan_out))]
        if self.spec.hybrid_r:
            terms.append(Factor(self.gralora_A_general.detach(),
                                self.gralora_B_general.detach(), self.scale,
                                bool(self.fan_in_fan_out)))
        return terms

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        k = self.spec.k
        a = self.gralora_A.unflatten(-1, (k, -1))  # (k_n, in/k, k_j, r/k)
        b = self.gralora_B.unflatten(1, (k, -1))  # (k_j, k_n, r/k, out/k)
        w = torch.einsum("nijs,jnso->joni", a, b).reshape(host.out_features, host.in_features)
        if self.spec.hybrid_r:
            w = w + self.gralora_B_general @ self.gralora_A_general
        w = self.scale * w
        return {"weight": (w.t() if self.fan_in_fan_out else w).detach()}
