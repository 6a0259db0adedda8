"""AdaLoRA: LoRA in SVD form, ``ΔW = s·P·diag(λ)·Q``, whose rank budget is re-allocated during
training.

Function: ``Q`` (``lora_A``, r×in) and ``P`` (``lora_B``, out×r) are the singular vectors, ``λ``
(``lora_E``, r×1) the singular values; insertion: parallel, ``h + s·P·diag(λ)·Q·x`` with
``s = alpha / (init_r + 1e-5)`` (peft's scaling, kept for numerical parity). Every module starts
with ``init_r`` triplets ``(P_i, λ_i, Q_i)``; during training the schedule in
:mod:`deltatune.methods.adalora_schedule` scores each triplet by its smoothed sensitivity ×
uncertainty and zeroes the ``λ_i`` of the least important ones until only ``target_r × modules``
are left (a cubic budget schedule). Which triplets are kept is the ``rank_mask`` buffer, saved
with the delta. The orthogonality regulariser ``‖QQᵀ − I‖ + ‖PᵀP − I‖`` is the schedule's
``penalty``.

Paper: Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA),
https://arxiv.org/abs/2303.10512 · peft's file layout (``lora_A``/``lora_B``/``lora_E`` +
``rank_pattern``) is read and written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError, SpecError
from ..core.example import Example
from ..core.host import DeltaHost, Host
from ..core.peft_layout import Option, PeftLayout
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV

PEFT_EPS = (
    1e-5  # peft divides by (ranknum + 1e-5); kept so that outputs match peft's to float precision
)


class _SVDSpecMixin:
    """Validation shared by the SVD-form LoRA specs (AdaLoRA, IncreLoRA)."""

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        spec: Any = self
        r, limit = spec.capacity(), host.max_rank
        if limit is not None and r > limit:
            field = "max_r" if hasattr(spec, "max_r") else "init_r"
            raise SpecError(
                f"{type(spec).__name__}.{field}: rank {r} on {module_name!r} exceeds that layer's "
                f"limit {limit} (min of its input and output sizes); use {field} <= {limit}"
            )

    def _check_common(self) -> None:
        spec: Any = self
        if not spec.alpha > 0:
            spec.fail("alpha", "must be > 0 (scaling = alpha / preallocated rank)")
        if not 0.0 <= spec.dropout < 1.0:
            spec.fail("dropout", "must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(spec, name) < 1.0:
                spec.fail(name, "must be in (0, 1) (the EMA factor of the importance scores)")
        for name in ("tinit", "tfinal"):
            if not _is_int(getattr(spec, name)) or getattr(spec, name) < 0:
                spec.fail(name, "must be an integer >= 0 (steps)")
        if not _is_int(spec.delta_t) or spec.delta_t < 1:
            spec.fail("delta_t", "must be a positive integer (steps between two allocations)")
        if not spec.orth_reg_weight >= 0:
            spec.fail("orth_reg_weight", "must be >= 0")
        if spec.total_step is not None and (
            not _is_int(spec.total_step) or spec.total_step <= spec.tinit + spec.tfinal
        ):
            spec.fail(
                "total_step",
                f"must be an integer > tinit + tfinal = {spec.tinit + spec.tfinal} "
                "(the schedule needs a budgeting phase)",
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- peft's layout --------------------------------------------------------------------------------
class _AdaLoRALayout(PeftLayout):
    """peft's AdaLoRA files hold only the kept triplets: peft resizes each module to the
    ``rank_pattern`` mask when loading."""

    def save(self, delta: Any, host: Host) -> dict[str, torch.Tensor]:
        keep = delta.rank_mask
        return {"lora_A": delta.lora_A.detach()[keep], "lora_E": delta.values().detach()[keep],
                "lora_B": delta.lora_B.detach()[:, keep]}

    def load(self, delta: Any, host: Host, tensors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        try:
            a, e, b = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
        except KeyError as exc:
            raise DeltaFileError(f"peft file lacks tensor {exc.args[0]!r} for an AdaLoRA module; "
                                 "the file is incomplete") from exc
        r, cap = a.shape[0], delta.lora_A.shape[0]
        n_out, n_in = delta.lora_B.shape[0], delta.lora_A.shape[1]
        if r > cap or e.shape != (r, 1) or b.shape != (n_out, r) or a.shape[1] != n_in:
            raise DeltaFileError(
                f"peft AdaLoRA tensors of shapes A{tuple(a.shape)} E{tuple(e.shape)} "
                f"B{tuple(b.shape)} do not fit a module of init_r={cap} and weight {n_out}x{n_in}"
            )
        # The kept triplets go to the first r slots (their order does not change ΔW); the rest
        # are off. Built on the CPU beside the file's tensors; loading moves them to the device.
        out = {
            "lora_A": delta.lora_A.detach().cpu().clone(),
            "lora_E": torch.zeros(delta.lora_E.shape, dtype=delta.lora_E.dtype),
            "lora_B": delta.lora_B.detach().cpu().clone(),
            "rank_mask": torch.zeros(delta.rank_mask.shape, dtype=torch.bool),
        }
        out["lora_A"][:r], out["lora_E"][:r], out["lora_B"][:, :r] = a.cpu(), e.cpu(), b.cpu()
        out["rank_mask"][:r] = True
        return out


def _write(spec: Any, deltas: dict[str, Any]) -> dict[str, Any]:
    return {
        "total_step": spec.total_step or spec.tinit + spec.tfinal + 1,
        # the kept triplets of every module, as peft records them
        "rank_pattern": {
            f"{p}.lora_E": [bool(v) for v in d.rank_mask.tolist()] for p, d in deltas.items()
        },
    }


def _read(config: Mapping[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    total = config.get("total_step")
    return {
        "target_r": min(kw["target_r"], kw["init_r"]),
        "alpha": kw["alpha"] if kw["alpha"] > 0 else float(kw["init_r"]),
        "total_step": int(total) if total and int(total) > kw["tinit"] + kw["tfinal"] else None,
    }


@register
@dataclass(frozen=True)
class AdaLoRA(_SVDSpecMixin, DeltaSpec):
    """SVD-form LoRA with adaptive rank allocation (train with
    :class:`deltatune.budget.AdaLoRASchedule`).

    ``init_r`` triplets per module, pruned to ``target_r`` per module on average (in total) between
    step ``tinit`` and ``total_step - tfinal``, every ``delta_t`` steps; ``beta1``/``beta2`` smooth
    the sensitivity and its uncertainty; ``orth_reg_weight`` weighs the orthogonality penalty."""

    method = "adalora"
    example = Example(dict(init_r=3, target_r=2, targets=("fc1", "fc2")), bad=(
        ({"target_r": 4, "init_r": 3}, "target_r"), ({"beta1": 1.0}, "beta1"),
        ({"delta_t": 0}, "delta_t")))
    host_kinds = ("linear",)
    default_targets = ATTENTION_QV
    factored = True
    peft = _AdaLoRALayout(
        "ADALORA", extra_suffixes=("lora_A", "lora_B", "lora_E"),
        options=(Option("init_r", default=12), Option("target_r", default=8),
                 Option("lora_alpha", "alpha", 8), Option("lora_dropout", "dropout", 0.0),
                 Option("tinit", default=0), Option("tfinal", default=0),
                 Option("deltaT", "delta_t", 1), Option("beta1", default=0.85),
                 Option("beta2", default=0.85), Option("orth_reg_weight", default=0.5)),
        write=_write, read=_read, fan_in_fan_out=True,
        fixed={"bias": "none", "init_lora_weights": True},
        refuse={"layers_to_transform": None, "layer_replication": None, "use_dora": False,
                "loftq_config": None, "bias": "none"},
    )

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # optimizer steps of the run (the schedule can also be told them)

    def validate(self) -> None:
        if not _is_int(self.init_r) or self.init_r < 1:
            self.fail("init_r", "must be a positive integer (the starting rank of every module)")
        if not _is_int(self.target_r) or not 1 <= self.target_r <= self.init_r:
            self.fail(
                "target_r",
                f"must be an integer in [1, init_r={self.init_r}] (the average final rank)",
            )
        self._check_common()

    # preallocated triplets per module, the ones active at the start, and the scaling
    def capacity(self) -> int:
        return self.init_r

    def start_rank(self) -> int:
        return self.init_r

    def scaling(self) -> float:
        return self.alpha / (self.init_r + PEFT_EPS)

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return SVDDelta(self, host, module_name)

    def training_callbacks(self, name: str, total_steps: int) -> list[Any]:
        """AdaLoRA's pruning schedule over the run (the spec's ``total_step`` wins when set)."""
        # the schedule's module imports this one: import it when it is needed
        from .adalora_schedule import AdaLoRASchedule

        return [AdaLoRASchedule(name, total_step=self.total_step or total_steps)]


class SVDDelta(Delta):
    """``h + s·P·diag(λ)·Q·x`` over ``capacity`` preallocated triplets; ``rank_mask`` marks the live
    ones.

    ``gated = False`` (AdaLoRA, as peft): pruning zeroes ``λ_i`` in place and the forward uses ``λ``
    as it is, so a pruned triplet can be revived by a later allocation. ``gated = True``
    (IncreLoRA): the forward multiplies ``λ`` by the mask, so inactive triplets are exactly off and
    get no gradient.
    """

    foldable = True
    gated: ClassVar[bool] = False

    def __init__(self, spec: Any, host: DeltaHost, path: str) -> None:
        super().__init__(spec)
        r = spec.capacity()
        ref = host.weight
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self._fifo = host.fan_in_fan_out
        self.scaling = spec.scaling()
        # peft's init: λ = 0 (so ΔW = 0 at the start), P and Q ~ N(0, 0.02²)
        self.lora_A = nn.Parameter(
            torch.randn(r, host.in_features, dtype=dtype, device=ref.device) * 0.02
        )  # Q: (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=ref.device))  # λ: (r, 1)
        self.lora_B = nn.Parameter(
            torch.randn(host.out_features, r, dtype=dtype, device=ref.device) * 0.02
        )  # P: (out, r)
        mask = torch.zeros(r, dtype=torch.bool, device=ref.device)
        mask[: spec.start_rank()] = True
        self.register_buffer("rank_mask", mask)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fifo

    @property
    def rank(self) -> int:
        """Live triplets."""
        return int(self.rank_mask.sum())

    def budget_parameters(self) -> int:
        """The triplets kept at the end, ``rank × (in + out + 1)``: AdaLoRA prunes to ``target_r``
        per module on average, IncreLoRA (gated) keeps the live ones."""
        r = self.rank if self.gated else self.spec.target_r
        return int(r) * (self.lora_A.shape[1] + self.lora_B.shape[0] + 1)

    def values(self) -> torch.Tensor:
        """``λ`` as the forward uses it, (r, 1)."""
        return self.lora_E * self.rank_mask.unsqueeze(1) if self.gated else self.lora_E

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        xd = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            xd = self.dropout(xd)
        y = F.linear(F.linear(xd, self.lora_A * self.values()), self.lora_B)  # (..., out)
        return h + (y * self.scaling).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        w = (self.lora_B @ (self.lora_A * self.values())) * self.scaling  # (out, in)
        return {"weight": (w.t() if self._fifo else w).detach()}
