"""Bottleneck adapters: Houlsby, Pfeiffer and (scaled) parallel adapters.

Function: a bottleneck MLP ``f(z) = W_up·act(W_down·LN?(z))`` with ``W_up`` zero-initialised, so
the model equals its base at init. Insertion: *sequential* adapters transform a sublayer's output,
``h + s·f(h)`` (Houlsby: after the attention output and the FFN output; Pfeiffer: after the FFN
only); *parallel* adapters run beside the FFN, ``h + s·f(x)`` with ``x`` the FFN's input (He et
al.'s scaled parallel adapter, the best single insertion of the unified view). Scaling ``s``: a
fixed number or ``"learned"`` (a trained scalar, starting at 1).

Papers: Houlsby et al. https://arxiv.org/abs/1902.00751 · Pfeiffer et al. (AdapterFusion)
https://arxiv.org/abs/2005.00247 · He et al. (unified view, parallel adapter)
https://arxiv.org/abs/2110.04366
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import SpecError, StateError, TargetError
from ..core.example import Example
from ..core.host import DeltaHost, get_module
from ..core.spec import DeltaSpec, Site, register
from ..core.targets import iter_candidates, name_matches, select_targets

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh,
}


@dataclass(frozen=True)
class _Family:
    """Default positions of one model family (name suffixes)."""

    attention_out: str
    ffn_out: str
    #: module whose *input* is the FFN input, when the FFN is split across modules (BERT)
    ffn_in: str | None
    #: one module holding the whole FFN (its own input and output are the FFN's), when there is one
    ffn_module: str | None


FAMILIES = {
    "bert": _Family("attention.output.dense", "output.dense", "intermediate", ffn_module=None),
    "llama": _Family("self_attn.o_proj", "mlp.down_proj", ffn_in=None, ffn_module="mlp"),
}


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a Linear-like module, or of a block's first/last Linear."""
    base = module.base if isinstance(module, DeltaHost) else module
    if isinstance(module, DeltaHost) and module.kind in ("linear", "conv"):
        return module.in_features, module.out_features  # conv: channels
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base.in_channels, base.out_channels
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TargetError(
            f"cannot tell the width of {type(base).__name__}: it holds no Linear layer; "
            "pick Linear targets"
        )
    return linears[0].in_features, linears[-1].out_features


def param_dtype(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    ref = next(module.parameters(), None)
    if ref is None:
        return torch.float32, torch.device("cpu")
    # Half-precision bases keep float32 deltas (stable training); cast at the boundary.
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, ref.device


def nearest(paths: list[str], anchor: str) -> str | None:
    """The path sharing the most leading dotted components with ``anchor`` (same block, usually)."""
    parts = anchor.split(".")

    def shared(p: str) -> int:
        n = 0
        for a, b in zip(p.split("."), parts):
            if a != b:
                break
            n += 1
        return n

    return max(paths, key=shared) if paths else None


@register
@dataclass(frozen=True)
class Bottleneck(DeltaSpec):
    """Bottleneck adapter. ``targets`` overrides the style's default positions (BERT- and
    Llama-family defaults are built in); ``input_from`` names the module whose input feeds a
    parallel adapter (default: the target's own input; BERT's FFN: ``intermediate``).
    On convolutions (``target_types=["Conv2d"]`` or named conv targets) the adapter acts on the
    channels at every position (1x1 down/up projections), as in conv adapters for CNNs."""

    method = "bottleneck"
    example = Example(dict(style="houlsby", reduction_factor=4), model="transformer", merges=False,
                      bad=(({"reduction_factor": 0}, "reduction_factor"),
                           ({"dropout": 1.0}, "dropout")))
    host_kinds = ("linear", "conv", "other")
    #: documentation of the built-in positions; :meth:`positions` picks them per style
    default_targets = tuple((f.attention_out, f.ffn_out) for f in FAMILIES.values())

    style: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: float = 16.0
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    scaling: float | str = 1.0
    layer_norm: bool = False
    dropout: float = 0.0
    input_from: str | None = None

    def validate(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            self.fail("reduction_factor", "must be > 0 (adapter width = input width / factor)")
        s = self.scaling
        if isinstance(s, bool) or not (isinstance(s, (int, float)) or s == "learned"):
            self.fail("scaling", "must be a number or 'learned'")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")
        if self.input_from is not None and self.style != "parallel":
            self.fail("input_from", "only applies to style='parallel' (others read the output)")

    # -- positions ---------------------------------------------------------------------------------
    def positions(self, model: nn.Module) -> list[tuple[str, str | None]]:
        """(host path, path of the module whose input feeds the adapter or None) pairs."""
        names = [n for n, _ in iter_candidates(model)]
        if self.targets is not None or self.target_regex is not None or self.target_types:
            paths = select_targets(model, self)
            return [(p, self._tap(names, p, self.input_from)) for p in paths]
        names = [n for n in names if not any(name_matches(n, e) for e in self.exclude)]
        found = [f for f in FAMILIES.values()
                 if any(name_matches(n, f.attention_out) for n in names)]
        family = found[0] if found else None
        if family is None:
            raise TargetError(
                f"{type(self).__name__} has no default positions for this model (BERT- and "
                "Llama-family are built in); pass targets=[...] naming the attention/FFN outputs"
            )
        attn = [n for n in names if name_matches(n, family.attention_out)]
        ffn = [n for n in names if name_matches(n, family.ffn_out) and n not in attn]
        if self.style == "houlsby":
            return [(p, None) for p in sorted(attn + ffn, key=names.index)]
        if self.style == "pfeiffer":
            return [(p, None) for p in ffn]
        if family.ffn_module is not None:  # the FFN is one module: the adapter reads its input
            return [(n, None) for n in names if name_matches(n, family.ffn_module)]
        return [(p, self._tap(names, p, family.ffn_in)) for p in ffn]

    def _tap(self, names: list[str], path: str, source: str | None) -> str | None:
        if source is None or self.style != "parallel":
            return None
        hit = nearest([n for n in names if name_matches(n, source)], path)
        if hit is None:
            raise TargetError(
                f"{type(self).__name__}.input_from={source!r} matches no module of the model; "
                "name the FFN's first module"
            )
        return hit

    # -- building ----------------------------------------------------------------------------------
    def make_projection(
        self, d_in: int, d_out: int, *, zero: bool, which: str, shared: object | None,
        dtype: torch.dtype, device: torch.device,
    ) -> nn.Module:
        """The ``which`` ("down"/"up") projection: a Linear here; Compacter overrides it with PHM
        layers that use the ``shared`` weights of :meth:`shared_state`."""
        layer = nn.Linear(d_in, d_out, dtype=dtype, device=device)
        if zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return layer

    def bottleneck_width(self, d_in: int) -> int:
        width = int(d_in // self.reduction_factor)
        if width < 1:
            self.fail("reduction_factor", f"leaves no bottleneck for width {d_in}; use less")
        return width

    def shared_state(self, model: nn.Module, paths: list[str]) -> object | None:
        """State shared by this delta's adapters across layers (Compacter's rules); None here."""
        return None

    def check_widths(self, model: nn.Module, positions: list[tuple[str, str | None]]) -> None:
        """Every adapter's width against its input, before any adapter tensor is allocated."""
        def dims(path: str) -> tuple[int, int]:
            module = get_module(model, path)
            return module_dims(module if isinstance(module, DeltaHost) else DeltaHost(module))

        for path, tap_path in positions:
            d_host_in, d_out = dims(path)
            d_in = (
                dims(tap_path)[0] if tap_path else d_host_in if self.style == "parallel" else d_out
            )
            width = int(d_in // self.reduction_factor)
            if width > d_in:
                raise SpecError(
                    f"{type(self).__name__}.reduction_factor={self.reduction_factor!r} makes the "
                    f"adapter on {path!r} {width} wide, wider than its input ({d_in}); use "
                    "reduction_factor >= 1"
                )

    def sites(self, model: nn.Module) -> list[Site]:
        """An adapter at each position and, for a sequential adapter that reads another module's
        input (Houlsby/Pfeiffer on a fused block), a tap there that hands it over: two kinds of
        site."""
        positions = self.positions(model)
        self.check_widths(model, positions)
        shared = self.shared_state(model, [p for p, _ in positions])
        sites: list[Site] = []
        for path, tap_path in positions:
            slot = None
            if tap_path is not None:
                slot = _Slot(module_dims(get_module(model, tap_path))[0])
                sites.append(Site(tap_path, lambda host, p, s=slot: InputTap(self, s), check=False))
            sites.append(
                Site(path, lambda host, p, s=slot: AdapterDelta(self, host, s, shared), check=False)
            )
        return sites


class _Slot:
    """Hands one tensor from an :class:`InputTap` to the adapter of the same layer (not a module, so
    nothing is registered twice); ``width`` is the tapped input's width."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.value: torch.Tensor | None = None


class InputTap(Delta):
    """Records the FFN's input for the parallel adapter at the FFN's output; changes nothing."""

    def __init__(self, spec: DeltaSpec, slot: _Slot) -> None:
        super().__init__(spec)
        self.slot = slot

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        self.slot.value = x
        return h


class AdapterDelta(Delta):
    """``h + s·up(act(down(LN?(z))))`` with ``z = h`` (sequential) or the FFN input (parallel)."""

    def __init__(
        self, spec: Bottleneck, host: DeltaHost, slot: _Slot | None, shared: object | None
    ) -> None:
        super().__init__(spec)
        self.parallel = spec.style == "parallel"
        self.slot = slot
        d_host_in, d_out = module_dims(host)
        self.channels = host.kind == "conv"  # feature maps (N, C, ...): adapt the channel dimension
        if slot is not None:
            d_in = slot.width
        else:
            d_in = d_host_in if self.parallel else d_out
        dtype, device = param_dtype(host.base)
        width = spec.bottleneck_width(d_in)
        self.norm = nn.LayerNorm(d_in, dtype=dtype, device=device) if spec.layer_norm else None
        kw = {"shared": shared, "dtype": dtype, "device": device}
        self.down = spec.make_projection(d_in, width, zero=False, which="down", **kw)
        self.act = ACTIVATIONS[spec.nonlinearity]()
        self.up = spec.make_projection(width, d_out, zero=True, which="up", **kw)  # starts at zero
        self.drop = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        if spec.scaling == "learned":
            self.scale = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        else:
            self.scale_value = float(spec.scaling)
            self.scale = None
        self.width = width

    def adapter(self, z: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            z = self.norm(z)
        z = self.up(self.act(self.down(z)))
        if self.drop is not None:
            z = self.drop(z)
        return z * (self.scale if self.scale is not None else self.scale_value)

    def forward(self, x: torch.Tensor, h, host: DeltaHost):
        out = h[0] if isinstance(h, tuple) else h  # attention modules return (output, weights)
        if self.slot is not None:
            src, self.slot.value = self.slot.value, None
            if src is None:
                raise StateError(
                    "parallel adapter found no recorded FFN input: the model did not run its FFN's "
                    "first module before its output; set input_from to the FFN's first module"
                )
        else:
            src = x if self.parallel else out
        dtype = next(self.down.parameters()).dtype
        if self.channels:  # (N, C, *spatial) → channels last for the projections, and back
            delta = self.adapter(src.to(dtype).movedim(1, -1)).movedim(-1, 1)
            if delta.shape[2:] != out.shape[2:]:
                raise StateError(
                    "a parallel conv adapter needs the convolution to keep the spatial size "
                    f"(input {tuple(src.shape[2:])}, output {tuple(out.shape[2:])}); use a "
                    "sequential style"
                )
        else:
            delta = self.adapter(src.to(dtype))
        new = out + delta.to(out.dtype)
        return (new, *h[1:]) if isinstance(h, tuple) else new
