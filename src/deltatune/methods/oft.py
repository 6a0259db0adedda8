"""OFT and BOFT: orthogonal rotations of a layer's input space, ``W' = W·Rᵀ``.

Unified view: function = a rotation ``R`` of the weight's input dimension (for a conv, of the
flattened filter ``in/groups × kernel``) — block-diagonal for OFT, a product of permuted
block-diagonal "butterfly" factors for BOFT (which also learns a per-output scale ``s``:
``W' = diag(s)·W·Rᵀ``); insertion = multiplicative on the weights. Each block is a Cayley transform
of a skew-symmetric matrix ``Q``, so all-zero parameters give ``R = I`` and the model equals the
base at init. Foldable; unmerge applies the inverse rotation (block by block), so it is exact to
float rounding even for the truncated Cayley-Neumann series (which is only approximately
orthogonal).

The parameterisations follow peft's (Cayley–Neumann series ``I + 2Q + 2Q² + … + Qᵏ`` or the exact
``(I − Q)(I + Q)⁻¹`` for OFT; exact Cayley of ``(A − Aᵀ)/2`` for BOFT). The unmerged forward uses
the rotated weight, i.e. what peft computes when merged (for Linear layers peft's unmerged forward
is the same; for k×k convolutions peft's OFT rotates unfolded input patches instead, which differs).

Papers: OFT — Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS
2023, https://arxiv.org/abs/2306.07280 · BOFT — Liu et al., "Parameter-Efficient Orthogonal
Finetuning via Butterfly Factorization", ICLR 2024, https://arxiv.org/abs/2311.06243
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import OFF, Option, PeftLayout, PeftTensor
from ..core.spec import DeltaSpec, register

_ATTENTION = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("qkv",), ("q", "v"))


# -- rotations ------------------------------------------------------------------------------------
def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size·(size−1)/2) upper-triangle entries (row-major) → (n, size, size) skew-symmetric."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], size, size)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``(I − Q)(I + Q)⁻¹`` of a batch of skew-symmetric matrices."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series of ``(I + Q)(I − Q)⁻¹``: ``I + 2Q + … + 2Qᵏ⁻¹ + Qᵏ`` with
    ``k = max(3, terms − 1)`` (``I + 2Q`` for two terms, ``I`` for one)."""
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms <= 1:
        return r
    r = r + 2 * q
    if terms == 2:
        return r
    power = q
    for _ in range(2, max(3, terms - 1)):
        power = power @ q
        r = r + 2 * power
    return r + power @ q


def nearest_divisor(n: int, p: int) -> int:
    """The divisor of ``n`` closest to ``p`` (ties to the smaller), as peft adjusts OFT sizes."""
    if p >= n:
        return n
    lower = next(d for d in range(p, 0, -1) if n % d == 0)
    higher = next(d for d in range(p, n + 1) if n % d == 0)
    return lower if p - lower <= higher - p else higher


def butterfly_perm(n: int, blocks: int, group: int, enabled: bool) -> torch.Tensor:
    """BOFT's permutation: in each of ``blocks`` chunks, groups of ``group`` indices in the order
    even groups, then odd groups (identity when ``enabled`` is False)."""
    if not enabled:
        return torch.arange(n)
    if blocks * group * 2 > n:
        raise TargetError(
            f"BOFT butterfly of {blocks} blocks of {group * 2} does not fit {n} features; "
            "lower butterfly_factor"
        )
    chunk = n // blocks
    order = [*range(0, chunk // group, 2), *range(1, chunk // group, 2)]
    inner = torch.cat([torch.arange(g * group, (g + 1) * group) for g in order])
    return torch.cat([start + inner for start in range(0, n, chunk)])


def _block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p·D)`` random blocks of (D, b, b) become the identity."""
    d = blocks.shape[0]
    k = int(p * d)
    if d == 1 or k == 0:
        return blocks
    mask = torch.zeros(d, 1, 1, dtype=blocks.dtype, device=blocks.device)
    mask[torch.randperm(d, device=blocks.device)[:k]] = 1
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (1 - mask) * blocks + mask * eye


def _filter_size(host: DeltaHost) -> int:
    """Length of one row of the weight in (out, features) form: in, or in/groups × kernel."""
    if host.kind == "conv":
        return host.base.weight[0].numel()
    return host.in_features


# -- the delta both share -------------------------------------------------------------------------
class RotationDelta(Delta):
    """``h + x·(W' − W)ᵀ`` with ``W' = diag(s)·W·Rᵀ``; merging writes ``W'``, unmerging inverts
    it."""

    foldable = True

    def __init__(self, spec: DeltaSpec, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        if host.kind == "conv" and host.base.padding_mode != "zeros":
            raise TargetError(f"{type(spec).__name__} needs zero padding at {path!r}; exclude it")
        self.fan_in_fan_out = host.fan_in_fan_out

    def rotate(self, w: torch.Tensor, inverse: bool = False, dropout: bool = False) -> torch.Tensor:
        """``w·Rᵀ`` (or ``w·R⁻ᵀ``) for ``w`` of shape (out, features); ``dropout`` while training
        only, never when merging (the merged weight must be the one unmerge can invert)."""
        raise NotImplementedError

    def _w(self, host: DeltaHost) -> torch.Tensor:
        w = host.weight
        w = w.t() if self.fan_in_fan_out else w
        return w.reshape(w.shape[0], -1).float()

    def _layout(self, w: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        if self.fan_in_fan_out:
            return w.t()
        return w.reshape(host.weight.shape)

    def out_scale(self) -> torch.Tensor | None:
        """Per-output scale ``s`` (BOFT), or None."""
        return None

    def new_weight(self, w: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        out, s = self.rotate(w, dropout=dropout), self.out_scale()
        return out if s is None else out * s.float().view(-1, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        w = self._w(host)
        change = (self.new_weight(w, dropout=self.training) - w).to(x.dtype)
        if host.kind == "conv":
            return h + host.conv(x, change.view(host.weight.shape)).to(h.dtype)
        return h + F.linear(x, change).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = self._w(host)
        return {"weight": self._layout(self.new_weight(w) - w, host).detach()}

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        host.weight.copy_(self._layout(self.new_weight(self._w(host)), host))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        w = self._w(host)
        s = self.out_scale()
        if s is not None:
            w = w / s.float().view(-1, 1)
        host.weight.copy_(self._layout(self.rotate(w, inverse=True), host))


# -- OFT ------------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class OFT(DeltaSpec):
    """Block-diagonal orthogonal finetuning. Give ``block_size`` (default 32) *or* the number of
    blocks ``r`` (peft's ``oft_block_size``/``r``; sizes that do not divide a layer are moved to the
    nearest divisor, with a warning, as peft does). ``block_share`` uses one block for all;
    ``coft`` keeps each block within ``eps`` of the identity (constrained OFT); ``dropout`` replaces
    random blocks by the identity while training (peft's ``module_dropout``)."""

    method = "oft"
    example = Example(dict(block_size=4, targets=("fc1", "fc2")), bad=(
        ({"block_size": -4}, "block_size"), ({"r": 2}, "r"),
        ({"neumann_terms": 0}, "neumann_terms"), ({"eps": 0.0}, "eps"),
        ({"dropout": -0.1}, "dropout")))
    host_kinds = ("linear", "conv")
    default_targets = _ATTENTION
    peft = PeftLayout(
        "OFT", tensors=(PeftTensor("oft_R", "oft_R.weight"),), fan_in_fan_out=True,
        # the Cayley-Neumann series as written here is peft's since 0.18.0
        fixed={**OFF, "init_weights": True, "peft_version": "0.18.0"},
        options=(Option("r", default=0),
                 Option("oft_block_size", "block_size", required="the adapter is from before peft "
                        "0.14; retrain it with a newer peft"),
                 Option("module_dropout", "dropout", 0.0), Option("coft", default=False),
                 Option("eps", default=6e-5), Option("block_share", default=False),
                 Option("use_cayley_neumann", "cayley_neumann", False),
                 Option("num_cayley_neumann_terms", "neumann_terms", 5)))

    block_size: int = 32
    r: int = 0
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        for name in ("block_size", "r", "neumann_terms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self.fail(name, "must be a non-negative integer")
        if (self.block_size == 0) == (self.r == 0):
            self.fail("r", f"and block_size={self.block_size} must not both be set or both be 0: "
                      "give one, e.g. OFT(r=4, block_size=0)")
        if self.cayley_neumann and self.neumann_terms < 1:
            self.fail("neumann_terms", "must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if not self.eps > 0:
            self.fail("eps", "must be > 0")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return OFTDelta(self, host, module_name)


class OFTDelta(RotationDelta):
    """Parameters ``oft_R``: (blocks, b·(b−1)/2) upper triangles of the skew-symmetric ``Q``
    blocks."""

    def __init__(self, spec: OFT, host: DeltaHost, path: str) -> None:
        super().__init__(spec, host, path)
        n = _filter_size(host)
        # Sizes that do not divide the layer move to the nearest divisor, as in peft (same shapes).
        wanted, field = (spec.block_size, "block_size") if spec.block_size else (spec.r, "r")
        got = nearest_divisor(n, wanted) if n % wanted or wanted > n else wanted
        if got != wanted:
            warnings.warn(
                f"OFT {field}={wanted} does not divide the {n} features of {path!r}; using {got}",
                stacklevel=2,
            )
        size = got if spec.block_size else n // got
        self.block_size, self.blocks = size, n // size
        count = 1 if spec.block_share else self.blocks
        self.oft_R = nn.Parameter(torch.zeros(count, size * (size - 1) // 2))
        if spec.init == "random":
            nn.init.normal_(self.oft_R, std=0.1)

    def _blocks(self, dropout: bool) -> torch.Tensor:
        spec: OFT = self.spec
        vec = self.oft_R
        if (
            spec.coft
        ):  # constrained OFT: project each Q back into a Frobenius ball (in place, as peft)
            with torch.no_grad():
                eps = spec.eps / math.sqrt(vec.shape[0])
                norm = skew(vec, self.block_size).flatten(1).norm(dim=1, keepdim=True)
                vec.copy_(torch.where(norm <= eps, vec, vec * (eps / norm)))
        q = skew(vec.float(), self.block_size)
        r = cayley_neumann(q, spec.neumann_terms) if spec.cayley_neumann else cayley(q)
        if dropout and spec.dropout > 0:
            r = _block_dropout(r, spec.dropout)
        return r.expand(self.blocks, -1, -1) if spec.block_share else r

    def rotate(self, w: torch.Tensor, inverse: bool = False, dropout: bool = False) -> torch.Tensor:
        r = self._blocks(dropout)
        if inverse:
            r = torch.linalg.inv(r)
        blocks = w.view(w.shape[0], self.blocks, self.block_size)  # (out, blocks, b)
        return torch.einsum("ojk,jck->ojc", blocks, r).reshape(w.shape)


def _peft_scale(delta: Delta, host: DeltaHost, s: torch.Tensor) -> torch.Tensor:
    """BOFT's scale as peft keeps it: (out, 1) for Linear, (1, out) for Conv2d."""
    return s.view(1, -1) if delta.conv else s.view(-1, 1)


# -- BOFT -----------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class BOFT(DeltaSpec):
    """Butterfly orthogonal finetuning: ``butterfly_factor`` permuted block-diagonal rotations of
    ``block_size`` (or ``block_num`` blocks), and a per-output scale. ``dropout`` is peft's
    multiplicative ``boft_dropout``."""

    method = "boft"
    example = Example(dict(block_size=4, butterfly_factor=2, targets=("fc2", "head")), bad=(
        ({"butterfly_factor": 0}, "butterfly_factor"), ({"block_num": 2}, "block_num"),
        ({"block_size": -2}, "block_size")))
    host_kinds = ("linear", "conv")
    default_targets = _ATTENTION
    peft = PeftLayout(
        "BOFT", fan_in_fan_out=True, fixed={**OFF, "init_weights": True},
        tensors=("boft_R",
                 PeftTensor("boft_s", save=_peft_scale, load=lambda d, h, t: t.flatten())),
        options=(Option("boft_block_size", "block_size", 4),
                 Option("boft_block_num", "block_num", 0),
                 Option("boft_n_butterfly_factor", "butterfly_factor", 1),
                 Option("boft_dropout", "dropout", 0.0)))

    block_size: int = 4
    block_num: int = 0
    butterfly_factor: int = 1
    dropout: float = 0.0
    init: Literal["identity", "random"] = "identity"

    def validate(self) -> None:
        for name in ("block_size", "block_num", "butterfly_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self.fail(name, "must be a non-negative integer")
        if (self.block_size == 0) == (self.block_num == 0):
            self.fail(
                "block_num",
                f"and block_size={self.block_size} must not both be set or both be 0: "
                "give one, e.g. BOFT(block_num=4, block_size=0)",
            )
        if self.butterfly_factor < 1:
            self.fail("butterfly_factor", "must be >= 1 (1: a single block-diagonal rotation)")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return BOFTDelta(self, host, module_name)


class BOFTDelta(RotationDelta):
    """Parameters ``boft_R`` (factors, blocks, b, b) and the scale ``boft_s`` (out,);
    ``R = M_{m−1}···M_0`` with ``M_i = P_i·blockdiag(cayley(A_i))·P_iᵀ``."""

    def __init__(self, spec: BOFT, host: DeltaHost, path: str) -> None:
        super().__init__(spec, host, path)
        n, m = _filter_size(host), spec.butterfly_factor
        size = spec.block_size or n // max(spec.block_num, 1)
        butterfly_fits = m == 1 or not (size % 2 or n % (size * 2 ** (m - 1)) or (n // size) % 2)
        if n % size or size * spec.block_num not in (0, n) or not butterfly_fits:
            raise TargetError(
                f"BOFT block_size={spec.block_size}, block_num={spec.block_num}, "
                f"butterfly_factor={m} do not fit the {n} input features of {path!r}; choose sizes "
                "that divide it (and even ones for butterfly_factor > 1)"
            )
        self.block_size, self.blocks = size, n // size
        perms = [butterfly_perm(n, self.blocks // 2**i, size // 2, m > 1) for i in range(m)]
        self.register_buffer("perms", torch.stack(perms), persistent=False)
        self.conv = host.kind == "conv"
        self.boft_R = nn.Parameter(torch.zeros(m, self.blocks, size, size))
        self.boft_s = nn.Parameter(torch.ones(host.out_features))
        if spec.init == "random":
            nn.init.normal_(self.boft_R, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)

    def out_scale(self) -> torch.Tensor:
        return self.boft_s

    def _factors(self, inverse: bool, dropout: bool) -> list[torch.Tensor]:
        a = self.boft_R.float()
        m, d, b, _ = a.shape
        q = 0.5 * (a - a.transpose(-1, -2)).reshape(m * d, b, b)
        r = cayley(q).view(m, d, b, b)
        if dropout and self.spec.dropout > 0:
            i = int(torch.randint(0, m, (1,)))
            r = torch.cat([r[:i], _block_dropout(r[i], self.spec.dropout)[None], r[i + 1:]])
        if inverse:
            r = torch.linalg.inv(r)
        out = []
        for i in range(m):
            perm = self.perms[i]
            out.append(torch.block_diag(*r[i])[perm][:, perm])  # P·B·Pᵀ
        return out

    def rotate(self, w: torch.Tensor, inverse: bool = False, dropout: bool = False) -> torch.Tensor:
        factors = self._factors(inverse, dropout)
        rot = factors[0]
        for f in factors[1:]:  # R = M_{m−1}···M_0; R⁻¹ = M_0⁻¹···M_{m−1}⁻¹
            rot = rot @ f if inverse else f @ rot
        return w @ rot.t()
