"""dt.to_lora (issue 19): any foldable delta as a LoRA, with the relative error of the
approximation; the LoRA saves in peft's layout and peft loads it to the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _trained(spec) -> Tiny:
    torch.manual_seed(0)
    model = Tiny().eval()
    dt.attach(model, spec, name="orig")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "spec",
    [
        dt.OFT(block_size=4, targets=["fc1", "fc2"]),
        dt.IA3(targets=["fc1", "fc2"]),
        dt.LoRA(r=4, targets=["fc1", "fc2"], bias="lora_only"),
    ],
    ids=["oft", "ia3", "lora+bias"],
)
def test_full_rank_is_exact_and_a_low_rank_reports_its_error(spec):
    model = _trained(spec)
    y = model(X)
    full = dt.to_lora(model, "orig", rank=16)  # >= every layer's rank: exact
    assert full.error < 1e-5 and max(full.errors.values()) < 1e-5
    assert torch.allclose(model(X), y, atol=1e-5)
    low = dt.to_lora(model, "orig", rank=1, lora_name="r1")
    hosts = dict(dt.core.iter_hosts(model))
    for path, err in low.errors.items():  # the reported error is the measured one
        want = hosts[path].part("orig").delta_weight(hosts[path])["weight"]
        got = hosts[path].part("r1").delta_weight(hosts[path])["weight"]
        assert err == pytest.approx(float((want - got).norm() / want.norm()), rel=1e-4, abs=1e-7)
    assert 0 < low.error < 1 and low.ranks == {"fc1": 1, "fc2": 1}
    biased = any(
        "bias" in hosts[p].part("orig").delta_weight(hosts[p]) for p in low.ranks
    )  # IA3 scales the bias
    assert low.parameters == (8 + 16) + (16 + 16) + (16 + 16 if biased else 0)


def test_the_lora_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(dt.OFT(block_size=4, targets=["fc1", "fc2"]))
    dt.to_lora(model, "orig", rank=3)
    dt.detach(model, "orig")
    y = model(X)
    dt.save_adapter(model, tmp_path / "lora", name="orig-lora", format="peft")
    torch.manual_seed(0)
    fresh = Tiny().eval()
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()
    assert torch.allclose(loaded(X), y, atol=1e-5)


def test_bad_input():
    model = _trained(dt.Bottleneck(targets=["fc2"], style="parallel"))
    with pytest.raises(ValueError, match="is not a weight change; only foldable deltas"):
        dt.to_lora(model, "orig")
    with pytest.raises(ValueError, match="no delta named 'nope'"):
        dt.to_lora(model, "nope")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        dt.to_lora(model, "orig", rank=0)
    assert dt.delta_names(model) == ["orig"]
