"""MiSS (formerly Bone): one small trained block shared by every chunk of a layer's input.

Unified view: function = a linear map that first sums the input's ``r``-wide chunks and then maps
the ``r`` sums to the output through a trained block ``D`` (r × out): ``ΔW[o, i] = D[i mod r, o]``;
position = a Linear layer (attention q/v by default); insertion = parallel on the module's input,
``h + (Σ_chunks x_chunk)·D``. The input is zero-padded to a multiple of ``r``. Variants:

- ``"balance"`` (peft's default, ``init_weights=True``): ``D`` is (r, out), as above.
- ``"mini"``: ``D`` is (r, mini_r), repeated ``out / mini_r`` times along the output.
- ``"bat"``: a weight-*dependent* change, block-wise ``W'_ac = W_ac·(I + M_a) + M_a`` over the
  r × r blocks of ``W`` (``a``: row block, ``c``: column block) with one trained ``M_a`` per row
  block; it needs ``r`` to divide both sizes. Merging applies it to the weight and unmerging inverts
  it exactly (``W_ac = (W'_ac − M_a)(I + M_a)⁻¹``).

All variants start at zero, so the model equals the base at init, and all are foldable; ``balance``
and ``mini`` are exactly low-rank (rank ≤ r: ``ΔW = Dᵀ·T`` with ``T`` the 0/1 chunk-summing map).
The math follows peft 0.21.2's ``miss`` tuner; the tensor layout (``miss_block``) is peft's.

Paper: Kang, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (Bone),
https://arxiv.org/abs/2409.15371
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import Option, PeftLayout, linear_only
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV


def _read_init(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # peft's init_weights=False is "balance" with a random start; peft ignores miss_dropout with
    # "bat", where here it would be an error
    return {"init": "random" if config.get("init_weights", True) is False else "identity",
            "dropout": 0.0 if kw["variant"] == "bat" else kw["dropout"]}


@register
@dataclass(frozen=True)
class MiSS(DeltaSpec):
    """Matrix shard sharing on Linear / GPT-2 Conv1D layers: ``r`` (the input chunk width),
    ``variant`` (``"balance"``, ``"bat"`` or ``"mini"`` with ``mini_r`` output columns),
    ``dropout`` on the input (balance and mini; bat has none), ``init="random"`` for tests (peft's
    ``init_weights=False``)."""

    method = "miss"
    example = Example({"r": 3, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"mini_r": 0}, "mini_r"), ({"dropout": 1.0}, "dropout"),
        ({"variant": "bone"}, "variant"), ({"variant": "bat", "dropout": 0.1}, "dropout")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    factored = True  # the saved block is already the change's low-rank factor (or r x r blocks)
    peft = PeftLayout("MISS", tensors=("miss_block",), check=linear_only, read=_read_init, options=(
        Option("r", default=64), Option("mini_r", default=1),
        Option("miss_dropout", "dropout", 0.0),
        Option("init_weights", "variant", True, choices=(
            ("balance", True), ("bat", "bat"), ("mini", "mini"), ("balance", False)))))

    r: int = 64
    variant: Literal["balance", "bat", "mini"] = "balance"
    mini_r: int = 1
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        for name in ("r", "mini_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self.fail(name, "must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if self.variant == "bat" and self.dropout:
            self.fail("dropout", "has no effect with variant='bat' (a change of the weight); use 0")

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n_in, n_out = host.in_features, host.out_features
        where = f"on {module_name!r} ({n_out}x{n_in})"
        if self.r > n_in:
            self.fail("r", f"exceeds the {n_in} input features {where}; use r <= {n_in}")
        if self.variant == "bat" and (n_in % self.r or n_out % self.r):
            self.fail("r", f"must divide both sizes {where} for variant='bat' (r x r blocks)")
        if self.variant == "mini" and n_out % self.mini_r:
            self.fail("mini_r", f"must divide the {n_out} output features {where}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return MiSSDelta(self, host)


class MiSSDelta(Delta):
    """Parameter ``miss_block``: (r, out) balance, (r, mini_r) mini, (out/r, r, r) bat."""

    foldable = True

    def __init__(self, spec: MiSS, host: DeltaHost) -> None:
        super().__init__(spec)
        self.fan_in_fan_out = host.fan_in_fan_out
        self.n_in, self.n_out = host.in_features, host.out_features
        self.r, self.variant = spec.r, spec.variant
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        shape = {"balance": (spec.r, self.n_out), "mini": (spec.r, spec.mini_r),
                 "bat": (self.n_out // spec.r, spec.r, spec.r)}[spec.variant]
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=ref.device))
        if spec.init == "random":  # peft's init_weights=False: a non-trivial start, for tests
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    # -- pieces -----------------------------------------------------------------------------------
    def block(self) -> torch.Tensor:
        """The (r, out) block ``D`` of balance / mini (mini's (r, mini_r) repeated along out)."""
        d = self.miss_block
        return d.repeat(1, self.n_out // d.shape[1]) if self.variant == "mini" else d

    def _w(self, host: DeltaHost) -> torch.Tensor:
        """The base weight as (out, in) in the delta's dtype."""
        w = host.weight.t() if self.fan_in_fan_out else host.weight
        return w.to(self.miss_block.dtype)

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def _bat_change(self, w: torch.Tensor) -> torch.Tensor:
        """``W_ac·M_a + M_a`` for every r × r block of ``w`` (out, in)."""
        r, m = self.r, self.miss_block
        # (out/r, in/r, r, r): block (a, c) of w
        blocks = w.reshape(self.n_out // r, r, self.n_in // r, r).transpose(1, 2)
        change = blocks @ m[:, None] + m[:, None]
        return change.transpose(1, 2).reshape(self.n_out, self.n_in)

    def _dense(self) -> torch.Tensor:
        """Balance / mini as (out, in): ``ΔW[o, i] = D[i mod r, o]``."""
        idx = torch.arange(self.n_in, device=self.miss_block.device) % self.r
        return self.block().t()[:, idx]

    # -- Delta contract ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        if self.variant == "bat":
            change = self._bat_change(self._w(host))
            return h + F.linear(x.to(change.dtype), change).to(h.dtype)
        xd = self.dropout(x.to(self.miss_block.dtype))
        pad = -self.n_in % self.r
        if pad:  # zero features complete the last chunk
            xd = F.pad(xd, (0, pad))
        sums = xd.view(*xd.shape[:-1], -1, self.r).sum(-2)  # (..., in/r, r) → (..., r)
        return h + (sums @ self.block()).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        if self.variant == "bat":
            return {"weight": self._layout(self._bat_change(self._w(host))).detach()}
        return {"weight": self._layout(self._dense()).detach()}

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        """Balance / mini: ``Dᵀ·T`` with ``T`` (r, in) the 0/1 map that sums the input chunks.
        bat depends on the weight: None."""
        if self.variant == "bat":
            return None
        d = self.block().detach()
        idx = torch.arange(self.n_in, device=d.device) % self.r
        t = (idx[None, :] == torch.arange(self.r, device=d.device)[:, None]).to(d.dtype)
        return [Factor(t, d.t(), 1.0, bool(self.fan_in_fan_out))]

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        if self.variant != "bat":
            return super().merge_into(host)
        w = self._w(host)
        host.weight.copy_(self._layout(w + self._bat_change(w)))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        if self.variant != "bat":
            return super().unmerge_from(host)
        r, m = self.r, self.miss_block.double()
        w = host.weight.double()
        w = w.t() if self.fan_in_fan_out else w
        blocks = w.reshape(self.n_out // r, r, self.n_in // r, r).transpose(1, 2)  # as _bat_change
        eye = torch.eye(r, dtype=m.dtype, device=m.device)
        # X·(I + M_a) = W'_ac − M_a, solved per block (exact inverse of the merge)
        orig = torch.linalg.solve((eye + m)[:, None], blocks - m[:, None], left=False)
        host.weight.copy_(self._layout(orig.transpose(1, 2).reshape(self.n_out, self.n_in)))
