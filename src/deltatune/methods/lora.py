"""LoRA family: LoRA, rsLoRA, DoRA; Linear / GPT-2 Conv1D, Conv1d/2d/3d and Embedding hosts.

Function: low-rank linear map ``B·A`` (rank ``r``); insertion: parallel on the module's input,
``h + s·B·A·x``; scaling ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). DoRA re-normalises the
merged weight per output and learns its magnitude. Variants (init schemes, DoRA) are strategy
objects in :mod:`deltatune.methods.lora_variants`.

Papers: LoRA https://arxiv.org/abs/2106.09685 · rsLoRA https://arxiv.org/abs/2312.03732 ·
DoRA https://arxiv.org/abs/2402.09353 · PiSSA https://arxiv.org/abs/2404.02948 ·
OLoRA https://arxiv.org/abs/2406.01775 · LoftQ https://arxiv.org/abs/2310.08659
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta, Factor
from ..core.errors import SpecError, TargetError
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.spec import DeltaSpec, Site, register
from ..core.targets import ATTENTION_QV, iter_candidates, name_matches
from .bias import BiasDelta
from .lora_peft import LORA_LAYOUT
from .lora_variants import INITS, variant_for


def _pattern_value(path: str, patterns: dict, default):
    for key, value in patterns.items():
        if name_matches(path, key) or re.fullmatch(key, path):
            return value
    return default


def check_rank_alpha_dropout(spec: DeltaSpec) -> None:
    """The fields every LoRA-shaped spec shares (``r``, ``alpha``, ``dropout``), checked alike."""
    r = getattr(spec, "r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        spec.fail("r", "must be a positive integer (the rank)")
    if not getattr(spec, "alpha") > 0:
        spec.fail("alpha", "must be > 0")
    if not 0.0 <= getattr(spec, "dropout") < 1.0:
        spec.fail("dropout", "must be in [0, 1)")


@register
@dataclass(frozen=True)
class LoRA(DeltaSpec):
    """Low-rank adaptation. ``rank_pattern``/``alpha_pattern`` map a name suffix or regex to a
    per-module rank/alpha (as produced by rank allocation)."""

    method = "lora"
    example = Example(dict(r=2, targets=("fc1", "fc2")), bad=(({"r": 0}, "r"),))
    host_kinds = ("linear", "conv", "embedding")
    default_targets = ATTENTION_QV
    factored = True
    peft = LORA_LAYOUT

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    #: LoftQ's alternations of quantize / SVD (init="loftq" only; 1 is LoftQ's usual choice)
    loftq_iters: int = 1
    bias: Literal["none", "lora_only", "all"] = "none"
    fan_in_fan_out: bool | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_rank_alpha_dropout(self)
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or \
                self.loftq_iters < 1:
            self.fail("loftq_iters", "must be a positive integer (LoftQ's alternations)")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                self.fail(
                    "rank_pattern", f"gives {key!r} rank {value!r}; ranks must be positive integers"
                )

    def rank_for(self, path: str) -> int:
        return _pattern_value(path, self.rank_pattern, self.r)

    def scaling_for(self, path: str) -> float:
        r = self.rank_for(path)
        alpha = _pattern_value(path, self.alpha_pattern, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        r, limit = self.rank_for(module_name), host.max_rank
        if limit is not None and r > limit:
            field = "r" if r == self.r else "rank_pattern"
            raise SpecError(
                f"LoRA.{field}: rank {r} on {module_name!r} exceeds that layer's limit {limit} "
                f"(min of its input and output sizes); use a rank <= {limit}"
            )

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        if host.fan_in_fan_out != bool(
            host.fan_in_fan_out if self.fan_in_fan_out is None else self.fan_in_fan_out
        ):
            raise TargetError(
                f"LoRA.fan_in_fan_out={self.fan_in_fan_out} does not fit {module_name!r} "
                f"({type(host.base).__name__}); leave it unset to detect it"
            )
        return LoRADelta(self, host, module_name)

    def sites(self, model: nn.Module) -> list[Site]:
        """The LoRA layers, and with ``bias="all"`` a bias shift on every other module with a bias
        (two kinds of site: why LoRA declares its sites)."""
        sites = super().sites(model)
        if self.bias == "all":
            targets = {s.path for s in sites}
            for path, module in iter_candidates(model):
                kept_whole = any(
                    name_matches(path, t) or path.startswith(t + ".")
                    for t in self.trainable_modules
                )
                if (
                    path not in targets
                    and not kept_whole
                    and isinstance(getattr(module, "bias", None), nn.Parameter)
                ):
                    sites.append(Site(path, lambda host, p: BiasDelta(self, host), check=False))
        return sites


class LoRADelta(Delta):
    """``h + s·B(A(dropout(x)))`` with the variant (plain / DoRA) deciding the final combination."""

    foldable = True

    def __init__(self, spec: LoRA, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        r = spec.rank_for(path)
        self.r = r
        self.scaling = spec.scaling_for(path)
        self.kind = host.kind
        self._fifo = host.fan_in_fan_out
        base = host.base
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        if self.kind == "linear":
            a_shape, b_shape = (r, host.in_features), (host.out_features, r)
        elif self.kind == "conv":
            if base.groups != 1 or base.padding_mode != "zeros":
                raise TargetError(
                    f"LoRA on {path!r} needs groups=1 and zero padding (depthwise/grouped convs "
                    "are not supported); exclude it"
                )
            a_shape = (r, base.in_channels, *base.kernel_size)
            b_shape = (base.out_channels, r) + (1,) * len(base.kernel_size)
        else:  # embedding: A maps token ids (one-hot) to r, B maps r to the embedding
            a_shape, b_shape = (r, host.in_features), (host.out_features, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=ref.device))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        if spec.bias == "lora_only" and getattr(base, "bias", None) is not None:
            self.lora_bias = nn.Parameter(torch.zeros_like(base.bias, dtype=dtype))
        else:
            self.lora_bias = None
        INITS[spec.init](self, host)
        self.variant = variant_for(spec)
        self.variant.setup(self, host)

    # -- pieces -------------------------------------------------------------------------------
    def lora_out(self, x: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        """``B(A(x))`` unscaled, in the output's layout."""
        if self.kind == "linear":
            return F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.kind == "conv":
            conv = _CONV[len(self.lora_A.shape) - 2]
            z = host.conv(x, self.lora_A)  # the layer's own stride, padding and dilation
            return conv(z, self.lora_B)
        b = host.base
        z = F.embedding(
            x,
            self.lora_A.t(),
            b.padding_idx,
            b.max_norm,
            b.norm_type,
            b.scale_grad_by_freq,
            b.sparse,
        )
        return z @ self.lora_B.t()

    def product(self) -> torch.Tensor:
        """``s·B·A`` in the base weight's layout (the weight change of the trainable factors)."""
        return self._product(self.lora_A, self.lora_B)

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            if all(k == 1 for k in a.shape[2:]):
                w = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], *a.shape[2:])
            else:
                conv = _CONV[a.dim() - 2]
                w = conv(a.transpose(0, 1), b).transpose(0, 1)
        else:
            w = b @ a  # (out, in)
        if self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out):
            w = w.t()
        return w * self.scaling

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fifo

    # -- Delta contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        xd = x if self.kind == "embedding" else x.to(self.lora_A.dtype)
        if self.dropout is not None:
            xd = self.dropout(xd)
        out = self.variant.combine(self, xd, h, host)
        if self.lora_bias is not None:
            out = out + _bias_view(self.lora_bias, out, self.kind).to(out.dtype)
        return out

    def factors(self, host: DeltaHost) -> list[Factor] | None:
        """Plain LoRA on a Linear / Conv1D / Embedding: ``s·B·A``, and ``−s·B₀·A₀`` for the
        PiSSA/OLoRA inits that start from nonzero factors. DoRA (a norm-dependent change) and
        convolutions: None."""
        if self.variant.name != "plain" or self.kind not in ("linear", "embedding"):
            return None
        transposed = self.kind == "embedding" or bool(self.fan_in_fan_out)
        out = [Factor(self.lora_A.detach(), self.lora_B.detach(), float(self.scaling), transposed)]
        init_a = getattr(self, "init_A", None)
        if init_a is not None:
            out.append(
                Factor(init_a.detach(), self.init_B.detach(), -float(self.scaling), transposed)
            )
        return out

    @torch.no_grad()
    def set_weight_change(self, change: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """Set the factors so that ``s·B·A`` is the best rank-r approximation of ``change`` (in the
        base weight's layout, as ``delta_weight`` gives it); exact when its rank is at most r.
        ``bias``: the bias change (needs ``bias="lora_only"``). Returns the relative Frobenius error
        of the weight. Plain LoRA only."""
        if bias is not None:
            if self.lora_bias is None:
                raise SpecError(
                    "a bias change needs LoRA(bias='lora_only'); this LoRA has no bias of its own"
                )
            self.lora_bias.copy_(bias.to(self.lora_bias.dtype))
        if self.variant.name != "plain" or getattr(self, "init_A", None) is not None:
            raise SpecError("set_weight_change needs a plain LoRA (no DoRA, no PiSSA/OLoRA init)")
        w = change.detach().double()
        if self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out):
            w = w.t()  # (out, in) as B·A
        m = w.reshape(w.shape[0], -1)  # conv: (out, in·k·k); B is a 1x1 kernel
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = min(self.r, s.numel())
        a = torch.zeros(self.lora_A.shape, dtype=torch.float64)
        b = torch.zeros(self.lora_B.shape, dtype=torch.float64)
        a.view(self.lora_A.shape[0], -1)[:r] = vh[:r]
        b.view(b.shape[0], -1)[:, :r] = u[:, :r] * (s[:r] / self.scaling)
        self.lora_A.copy_(a.to(self.lora_A.dtype))
        self.lora_B.copy_(b.to(self.lora_B.dtype))
        rest = float(s[r:].square().sum().sqrt())
        return rest / max(float(s.square().sum().sqrt()), 1e-30)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        change = {"weight": self.variant.weight_change(self, host)}
        if self.lora_bias is not None:
            change["bias"] = self.lora_bias.detach()
        return change

    @torch.no_grad()
    def merge_into(self, host: DeltaHost) -> None:
        self.variant.merge(self, host)
        if self.lora_bias is not None:
            host.base.bias.add_(self.lora_bias.to(host.base.bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, host: DeltaHost) -> None:
        self.variant.unmerge(self, host)
        if self.lora_bias is not None:
            host.base.bias.sub_(self.lora_bias.to(host.base.bias.dtype))

    def release(self, host: DeltaHost) -> None:
        self.variant.release(self, host)

    def after_load(self, host: DeltaHost) -> None:
        self.variant.after_load(self, host)

    @classmethod
    def routed_forward(cls, deltas: Sequence["LoRADelta"], index, x, h, host):
        if host.kind != "linear" or any(
            d.variant.name != "plain"
            or d.lora_bias is not None
            or d.training
            and d.dropout is not None
            for d in deltas
        ):
            return super().routed_forward(deltas, index, x, h, host)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        if xs.shape[1] * len(deltas) <= 64:
            # few tokens per row (decoding): all adapters' A stacked (sum r, in), B side by side
            # with the scale folded in, and a 0/1 mask keeping each row's own slice of z = x·Aᵀ
            # (base rows none): two dense matmuls, no per-row copy of the factors
            at, bt, keep = _stacked(deltas, index, host)
            z = (xs.to(at.dtype) @ at) * keep  # (B, T, sum r): each row's own slice
            if h.dtype != at.dtype:
                return h + (z @ bt).view(h.shape).to(h.dtype)
            return torch.addmm(h.reshape(-1, bt.shape[1]), z.view(-1, z.shape[-1]), bt).view(
                h.shape)
        # many tokens per row: one gathered computation, A_i, B_i of sample i's adapter (zero-padded
        # to the largest rank, which leaves B·A unchanged) and a per-sample scale (0 for the base)
        rmax = max(d.r for d in deltas)
        a = torch.stack([F.pad(d.lora_A, (0, 0, 0, rmax - d.r)) for d in deltas])  # (n, rmax, in)
        b = torch.stack([F.pad(d.lora_B, (0, rmax - d.r)) for d in deltas])  # (n, out, rmax)
        scale = torch.tensor([d.scaling for d in deltas] + [0.0], dtype=a.dtype, device=a.device)
        sel = index.clamp(min=0)
        z = torch.bmm(xs.to(a.dtype), a[sel].transpose(1, 2))  # (B, T, rmax)
        y = torch.bmm(z, b[sel].transpose(1, 2))  # (B, T, out)
        y = y * scale[index].view(-1, 1, 1)  # index -1 → scale[-1] = 0
        return h + y.view(h.shape).to(h.dtype)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _stacked(deltas: Sequence[LoRADelta], index: torch.Tensor, host: DeltaHost
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Aᵀ`` of all routed adapters side by side (in, Σr), their scaled ``Bᵀ`` stacked (Σr, out)
    and the 0/1 mask (B, 1, Σr) that keeps row i's own slice (none for base rows).

    Why cached: decoding calls every routed layer once per new token with the same route and the
    same factors, and rebuilding these (three concatenations, a mask, a dtype cast) per layer per
    step cost more than the two small matmuls themselves (routed generation 0.83x of one adapter
    on CPU). The cache lives in the host's ``route_cache`` (emptied by every ``set_route``) and is
    only used without autograd (nothing to backpropagate through a stale concatenation); it is
    rebuilt whenever the route tensor or any factor changes (``_version`` counts in-place
    updates: optimizer steps, ``copy_``, hot swaps)."""
    params = [p for d in deltas for p in (d.lora_A, d.lora_B)]
    # the cache holds the route tensor and the factors themselves: compared by identity (no id
    # reuse while they are held) and by their in-place update counters
    key = (torch.is_inference_mode_enabled(), [p._version for p in params],
           [d.scaling for d in deltas])
    store = getattr(host, "route_cache", None)  # absent on hosts made before it existed
    cacheable = store is not None and (
        not torch.is_grad_enabled() or not any(p.requires_grad for p in params))
    hit = store.get("lora") if cacheable else None
    if (cacheable and hit is not None and hit[0] is index and len(hit[1]) == len(params)
            and all(a is b for a, b in zip(hit[1], params)) and hit[2] == key):
        return hit[3]
    at = torch.cat([d.lora_A for d in deltas]).T
    bt = torch.cat([d.lora_B * d.scaling for d in deltas], dim=1).T
    owner = torch.cat([torch.full((d.r,), j, dtype=torch.long) for j, d in enumerate(deltas)])
    keep = (index[:, None] == owner.to(index.device)).to(at.dtype)[:, None, :]
    value = (at, bt, keep)
    if cacheable:
        store["lora"] = (index, params, key, value)
    elif store is not None:
        store.pop("lora", None)
    return value


def _bias_view(bias: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv":
        return bias.view(1, -1, *([1] * (like.dim() - 2)))
    return bias
