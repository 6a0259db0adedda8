"""SHiRA: a sparse high-rank adapter, training a fixed random subset of each weight's entries.

Unified view: function = ``ΔW`` (out × in), zero except at ``r·(out + in)`` fixed positions (as many
values as a rank-``r`` LoRA trains), whose values are the only trained parameters; position =
Linear layers (attention query/value by default); insertion = parallel, ``h + ΔW·x``. Foldable
and additive. The change is sparse but not low-rank, so it has no ``factors``.

The positions are drawn as peft draws its random mask (``randperm(out·in)`` from a CPU generator,
seeded with ``random_seed`` when given, its first ``r·(out + in)`` entries, in row-major order) and
saved beside the values as ``shira_indices`` (2, n), so a file is read back whatever drew them.

Paper: Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024,
https://arxiv.org/abs/2406.13175
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.delta import Delta
from ..core.errors import DeltaFileError
from ..core.example import Example
from ..core.host import DeltaHost, Host
from ..core.peft_layout import Option, PeftLayout, PeftTensor, init_flag
from ..core.spec import DeltaSpec, register
from ..core.targets import ATTENTION_QV


def random_positions(n_out: int, n_in: int, n: int, seed: int | None) -> torch.Tensor:
    """(2, n) int64 rows and columns of ``n`` distinct entries of an out×in matrix, row-major."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    flat = torch.randperm(n_out * n_in, generator=gen)[:n].sort().values
    return torch.stack([flat // n_in, flat % n_in])


def _load_indices(delta: Delta, host: Host, indices: torch.Tensor) -> torch.Tensor:
    """peft's positions as ours: int64, checked (peft saves them as float32 on Windows)."""
    if indices.is_floating_point() and not torch.equal(indices, indices.round()):
        raise DeltaFileError("peft SHiRA file has non-integer shira_indices")
    indices = indices.to(torch.int64)
    _check_positions(indices, delta.shape)
    return indices


@register
@dataclass(frozen=True)
class SHiRA(DeltaSpec):
    """Sparse high-rank adaptation on Linear layers: ``r·(out + in)`` trained entries per layer at
    random positions (``mask_type="random"``, drawn from ``random_seed``; unseeded draws are still
    saved). ``init="zeros"`` starts at the base model; ``"normal"`` (N(0, 1), peft's
    ``init_weights=False``) does not."""

    method = "shira"
    example = Example({"r": 2, "random_seed": 3, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"random_seed": -1}, "random_seed"), ({"mask_type": "topk"}, "mask_type"),
        ({"init": "ones"}, "init")))
    default_targets = ATTENTION_QV
    host_what = "Linear modules"
    peft = PeftLayout(
        "SHIRA", fixed={"fan_in_fan_out": False},
        tensors=("shira_weight", PeftTensor(  # peft keeps the positions as int32
            "shira_indices", save=lambda d, host, t: t.to(torch.int32), load=_load_indices)),
        # the file carries the positions, whichever mask drew them: any mask_type reads back
        options=(Option("r", default=32), Option("mask_type", read=False),
                 Option("random_seed"),
                 init_flag("zeros", "normal")))

    r: int = 32
    mask_type: Literal["random"] = "random"
    random_seed: int | None = None
    init: Literal["zeros", "normal"] = "zeros"

    def validate(self) -> None:
        if not _positive_int(self.r):
            self.fail("r", "must be a positive integer (r·(out + in) trained entries per layer)")
        if self.random_seed is not None and not _positive_int(self.random_seed, 0):
            self.fail("random_seed", "must be a non-negative integer or None")

    def can_host(self, module: nn.Module) -> bool:
        # peft's SHiRA takes nn.Linear only (not GPT-2's Conv1D)
        return isinstance(module.base if isinstance(module, Host) else module, nn.Linear)

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        n_out, n_in = host.out_features, host.in_features
        n, size = self.r * (n_out + n_in), n_out * n_in
        if n > size:
            self.fail(
                "r",
                f"gives {module_name!r} {n} = r·({n_out} + {n_in}) trained entries, more "
                f"than the {n_out}x{n_in} = {size} of its weight; use r <= "
                f"{size // (n_out + n_in)}",
            )

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return SHiRADelta(self, host)


def _positive_int(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class SHiRADelta(Delta):
    """``h + x·ΔWᵀ``: ``shira_weight`` (n,) holds ``ΔW`` at ``shira_indices`` (2, n) (rows,
    columns), a saved buffer: the values' positions belong to the adapter."""

    foldable = True

    def __init__(self, spec: SHiRA, host: DeltaHost) -> None:
        super().__init__(spec)
        self.shape = (host.out_features, host.in_features)
        n = spec.r * sum(self.shape)
        self.register_buffer("shira_indices", random_positions(*self.shape, n, spec.random_seed))
        init = torch.randn(n) if spec.init == "normal" else torch.zeros(n)
        self.shira_weight = nn.Parameter(init)

    def weight_change(self) -> torch.Tensor:
        """``ΔW`` (out, in), dense, in float32 (differentiable in ``shira_weight``)."""
        rows, cols = self.shira_indices.long()
        dense = self.shira_weight.new_zeros(self.shape, dtype=torch.float32)
        return dense.index_put((rows, cols), self.shira_weight.float())

    def forward(self, x: torch.Tensor, h: torch.Tensor, host: DeltaHost) -> torch.Tensor:
        return h + F.linear(x.float(), self.weight_change()).to(h.dtype)

    def delta_weight(self, host: DeltaHost) -> dict[str, torch.Tensor]:
        return {"weight": self.weight_change().detach()}

    def after_load(self, host: DeltaHost) -> None:
        _check_positions(self.shira_indices, self.shape)


def _check_positions(indices: torch.Tensor, shape: tuple[int, int]) -> None:
    """Refuse positions outside the weight or repeated (one value per entry), in one line."""
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise DeltaFileError(f"shira_indices has shape {tuple(indices.shape)}, not (2, n)")
    rows, cols = indices.long()
    if indices.numel() and (rows.min() < 0 or cols.min() < 0
                            or rows.max() >= shape[0] or cols.max() >= shape[1]):
        raise DeltaFileError(f"shira_indices point outside the {shape[0]}x{shape[1]} weight; "
                             "the adapter is for another model or damaged")
    if torch.unique(rows * shape[1] + cols).numel() != rows.numel():
        raise DeltaFileError("shira_indices repeat a position; the file is damaged")
