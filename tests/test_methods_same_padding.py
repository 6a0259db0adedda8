"""Weight deltas on convolutions whose module pads the input in its own forward (TensorFlow 'SAME'
padding, as in the bundled EfficientNet-Lite0): the delta must see the same padded input as the
layer, so unmerged and merged outputs agree."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

import deltatune as dt


class SameConv(nn.Conv2d):
    """Asymmetric zero padding before a stride-2 convolution, like Conv2dStaticSamePadding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SameConv(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))


SPECS = [
    dt.LoRA(r=2, targets=["0"]),
    dt.LoRA(r=2, targets=["0"], dora=True),
    dt.SparseFT(density=0.2, selection="random", targets=["0"]),
    dt.IA3(targets=["0"], feedforward=["0"]),
    dt.OFT(block_size=4, targets=["0"]),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: type(s).__name__ + ("-dora" if getattr(s, "dora", False) else "")
)
def test_delta_on_a_same_padding_conv_runs_and_merges_exactly(spec):
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    base_out = model(x)
    dt.attach(model, spec)
    randomize(model, std=0.2)
    with torch.no_grad():
        out = model(x)
        assert out.shape == base_out.shape and not torch.allclose(out, base_out, atol=1e-4)
        dt.merge(model)
        merged = model(x)
    assert torch.allclose(out, merged, atol=1e-5), (out - merged).abs().max()


def test_bundled_efficientnet_stem_takes_lora_and_sparse_deltas():
    from deltatune.models import load_model

    entry = load_model("efficientnet-lite0", num_labels=10, image_size=32)
    model = entry.model.eval()
    x = torch.randn(2, 3, 32, 32)
    for spec in (
        dt.LoRA(r=4, targets=["_conv_stem"]),
        dt.SparseFT(density=0.01, selection="random"),
    ):
        m = copy.deepcopy(model)
        dt.attach(m, spec)
        randomize(m, std=0.05)
        with torch.no_grad():
            out = m(x)
            dt.merge(m)
            merged = m(x)
        logits = out if torch.is_tensor(out) else out.logits
        merged = merged if torch.is_tensor(merged) else merged.logits
        assert torch.allclose(logits, merged, atol=1e-4), (
            type(spec).__name__,
            (logits - merged).abs().max(),
        )
