import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import StateError
from deltatune.train import evaluate


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        return self.fc(x)


def test_eval_refuses_nonfinite_outputs_and_save_refuses_nonfinite_deltas(tmp_path):
    m = M()
    dt.attach(m, dt.LoRA(r=2, targets=["fc"]), name="a")
    data = [{"x": torch.randn(4), "label": i % 3} for i in range(6)]

    def collate(ex):
        return {
            "x": torch.stack([e["x"] for e in ex]),
            "labels": torch.tensor([e["label"] for e in ex]),
        }

    assert 0 <= evaluate(m, data, collate, task="classification")["accuracy"] <= 1
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate(m, data, collate, task="classification")
    with pytest.raises(StateError, match="holds NaN or inf values"):
        dt.save_adapter(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
