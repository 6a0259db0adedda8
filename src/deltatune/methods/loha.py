"""LoHa: the weight change as the Hadamard (element-wise) product of two low-rank matrices.

Unified view: function = ``ΔW = s·(W1a·W1b) ⊙ (W2a·W2b)`` with ``W·a`` (out × r), ``W·b`` (r × in),
``s = alpha / r``; its rank reaches r² for 4r(in+out)/2 parameters, where LoRA's stops at r.
Position = Linear / Conv1d / Conv2d layers (attention q/v by default); insertion = parallel,
``h + x·ΔWᵀ`` (a convolution's own stride, padding and groups for conv layers). Foldable: merging
adds ``ΔW``. ``W2b`` starts at zero, so the model equals the base at init.

Convolutions use the flattened filter (in/groups·k·k) as the input dimension, or with
``use_effective_conv2d`` a CP form per factor, ``ΔW_i[p, q, k, l] = Σ T_i[a, b, k, l]·W_ia[a, p]·
W_ib[b, q]`` (FedPara's Proposition 3). Parameter names, shapes and initialisation follow peft's
LoHa tuner, so its files load here and ours in peft.

Papers: Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", ICLR 2022, https://arxiv.org/abs/2108.06098 · LyCORIS: Yeh et al., "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024,
https://arxiv.org/abs/2309.14859
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.delta import Delta
from ..core.errors import SpecError
from ..core.example import Example
from ..core.host import DeltaHost
from ..core.peft_layout import PeftLayout
from ..core.spec import register
from ._lycoris import PEFT_FIXED, PEFT_OPTIONS, LycorisDelta, LycorisSpec, kaiming


@register
@dataclass(frozen=True)
class LoHa(LycorisSpec):
    """Low-rank Hadamard product adaptation (peft's ``LoHaConfig``). ``init="identity"`` zeroes
    ``hada_w2_b`` (the model equals the base); ``"random"`` (peft's ``init_weights=False``) draws
    every factor, for tests. The other options are :class:`LycorisSpec`'s."""

    method = "loha"
    example = Example({"r": 2, "targets": ("fc1", "fc2")}, bad=(
        ({"r": 0}, "r"), ({"alpha": 0}, "alpha"), ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"module_dropout": -0.1}, "module_dropout"), ({"init": "zeros"}, "init"),
        ({"rank_pattern": {"fc1": 0}}, "rank_pattern")))
    peft = PeftLayout("LOHA", options=PEFT_OPTIONS, fixed=PEFT_FIXED, tensors=(
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"))

    init: Literal["identity", "random"] = "identity"

    def check_host(self, host: DeltaHost, module_name: str) -> None:
        r, limit = self.rank_for(module_name), host.max_rank
        if limit is not None and r > limit:
            field = "r" if r == self.r else "rank_pattern"
            raise SpecError(f"LoHa.{field}: rank {r} on {module_name!r} exceeds that layer's limit "
                            f"{limit} (min of its input and output sizes); use a rank <= {limit}")

    def make_delta(self, host: DeltaHost, module_name: str) -> Delta:
        return LoHaDelta(self, host, module_name)


class LoHaDelta(LycorisDelta):
    """Factors ``hada_w{1,2}_{a,b}`` (and ``hada_t{1,2}`` in CP form), as peft names them."""

    def __init__(self, spec: LoHa, host: DeltaHost, path: str) -> None:
        super().__init__(spec, host, path)
        r, out = self.r, self.out_dim
        if self.effective:  # CP: a core (r, r, k1, k2) and one (r, dim) factor per mode
            core = self.core_kernel
            self.hada_t1, self.hada_t2 = self.new(r, r, *core), self.new(r, r, *core)
            self.hada_w1_a, self.hada_w1_b = self.new(r, out), self.new(r, self.in_dim)
            self.hada_w2_a, self.hada_w2_b = self.new(r, out), self.new(r, self.in_dim)
        else:  # the filter flattened: (out, in/groups·k·k)
            fan_in = self.in_dim * math.prod(self.kernel)
            self.hada_w1_a, self.hada_w1_b = self.new(out, r), self.new(r, fan_in)
            self.hada_w2_a, self.hada_w2_b = self.new(out, r), self.new(r, fan_in)
        for p in self.parameters():
            kaiming(p)
        if spec.init == "identity":  # one zero factor is enough for ΔW = 0
            nn.init.zeros_(self.hada_w2_b)

    def raw_weight(self) -> torch.Tensor:
        if self.effective:
            # (r, r, k1, k2) core, (r, in) and (r, out) factors → (out, in, k1, k2)
            w1 = torch.einsum("abkl,bq,ap->pqkl", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w2 = torch.einsum("abkl,bq,ap->pqkl", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
            return w1 * w2
        # (out, r) @ (r, fan_in), twice
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
