"""dd.evaluate_stream: the adapted-vs-source evaluation of `deltatune adapt`, as a function."""

import pytest
import torch
from torch import nn

import deltatune.deploy as dd


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = BNNet()
    model(torch.randn(64, 5))  # some running statistics
    return model.eval()


def stream(n_batches=4, labels=True):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(16, 5, generator=g) * 3 + 1  # shifted: BN adaptation changes predictions
        y = torch.randint(0, 3, (16,), generator=g)
        out.append({"x": x, "labels": y} if labels else {"x": x})
    return out


def running_error(logits_per_batch, batches):
    wrong = seen = 0
    curve = []
    for logits, b in zip(logits_per_batch, batches):
        wrong += int((logits.argmax(-1) != b["labels"]).sum())
        seen += len(b["labels"])
        curve.append(100.0 * wrong / seen)
    return curve


def test_curves_match_a_hand_computed_stream_and_the_model_comes_back(net):
    model, batches = net, stream()  # dict batches: the model is called with x=..., labels held back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        source = [model(b["x"]) for b in batches]
    seen_names = []

    def progress(items, name):
        seen_names.append(name)
        return items

    curves = dd.evaluate_stream(dd.adapt(model, "bn"), batches, progress=progress)
    assert seen_names == ["adapted", "source"]
    assert set(curves) == {"adapted", "adapted_entropy", "source", "source_entropy"}
    assert len(curves["adapted"]) == len(curves["adapted_entropy"]) == len(batches)
    assert curves["source"] == pytest.approx(running_error(source, batches))
    want_entropy = [float(dd.softmax_entropy(z).mean()) for z in source]
    assert curves["source_entropy"] == pytest.approx(want_entropy)
    assert curves["adapted_entropy"] != pytest.approx(want_entropy)  # adaptation changed something
    # the wrapper is off and the source weights and statistics are back
    assert dd.wrapper_of(model) is None and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_without_labels_only_entropy_and_without_compare_one_pass(net):
    curves = dd.evaluate_stream(dd.adapt(net, "tent", lr=1e-3), stream(labels=False), compare=False)
    assert curves["adapted"] == [] and len(curves["adapted_entropy"]) == 4
    assert "source" not in curves
    assert dd.wrapper_of(net) is None


def test_the_wrapper_comes_off_when_the_stream_fails(net):
    batches = stream(2) + [{"x": torch.full((16, 5), float("nan"))}]  # NaN inputs are refused
    wrapper = dd.adapt(net, "tent", lr=1e-3)
    with pytest.raises(dd.DeployError):
        dd.evaluate_stream(wrapper, batches)
    assert dd.wrapper_of(net) is None
