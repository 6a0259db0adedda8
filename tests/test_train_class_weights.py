"""TrainConfig.class_weights: the balanced formula, the weighted loss, its effect on training, bad
values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import train_worker as W  # tests/ is on sys.path

from deltatune.train import TrainConfig, TrainError, evaluate, fit
from deltatune.train.losses import class_weights, compute_loss

TASK = "text-classification"


def test_balanced_weights_give_every_present_class_the_same_total():
    labels = [0, 0, 0, 1, 1, 3]  # class 2 absent
    w = class_weights("balanced", labels, n_classes=4)
    assert w.tolist() == pytest.approx([6 / (3 * 3), 6 / (3 * 2), 1.0, 6 / (3 * 1)])
    counts = torch.bincount(torch.tensor(labels), minlength=4).float()
    totals = (w * counts)[counts > 0]
    assert torch.allclose(totals, totals[0].expand_as(totals))
    assert class_weights([1, 2.5], labels, None).tolist() == [1.0, 2.5]
    assert class_weights(None, labels, None) is None


def test_weighted_loss_is_the_weighted_mean():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0])
    w = torch.tensor([0.5, 2.0, 1.0])
    per = F.cross_entropy(logits, labels, reduction="none")
    expected = (per * w[labels]).sum() / w[labels].sum()
    assert compute_loss(logits, labels, TASK, w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert compute_loss(logits, labels, TASK).item() == pytest.approx(per.mean().item(), rel=1e-6)
    with pytest.raises(TrainError, match="class_weights has 2 weights but the model predicts 3"):
        compute_loss(logits, labels, TASK, torch.tensor([1.0, 1.0]))
    zero = compute_loss(logits, torch.tensor([1] * 7), TASK, torch.tensor([1.0, 0.0, 1.0]))
    assert zero.item() == 0.0  # a batch of zero-weight classes only: no NaN


def _skewed(n: int, seed: int) -> list[dict]:
    """Class 0 nine times as frequent as classes 1 and 2."""
    data = W.make_data(4 * n, seed)
    by = {c: [e for e in data if e["label"] == c] for c in range(3)}
    return by[0][: int(0.82 * n)] + by[1][: int(0.09 * n)] + by[2][: int(0.09 * n)]


def _minority_recall(model, data) -> float:
    model.eval()
    with torch.no_grad():
        batch = W.clean_collate(data)
        pred = model(batch["x"]).argmax(-1)
    keep = batch["labels"] != 0
    return float((pred[keep] == batch["labels"][keep]).float().mean())


def test_balanced_training_raises_minority_recall():
    train, test = _skewed(400, 0), W.make_data(600, 1)
    recalls = {}
    for cw in (None, "balanced"):
        model = W.build_model()
        cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, progress=False, class_weights=cw)
        fit(model, train, W.clean_collate, cfg, task=TASK)
        recalls[cw] = _minority_recall(model, test)
    assert recalls["balanced"] > recalls[None] + 0.05, recalls
    assert evaluate(model, test, W.clean_collate, task=TASK)["accuracy"] > 0.5


@pytest.mark.parametrize("value", ["inverse", [], [-1.0, 1.0], [0.0, 0.0], [float("nan")], 3])
def test_bad_class_weights_name_the_field(value):
    with pytest.raises(TrainError, match="TrainConfig.class_weights="):
        TrainConfig(class_weights=value)


def test_class_weights_errors_in_fit():
    with pytest.raises(TrainError, match="a causal LM has no classes"):
        fit(
            W.build_model(),
            W.make_data(32, 0),
            W.clean_collate,
            TrainConfig(epochs=1, progress=False, class_weights="balanced"),
            task="causal-lm",
        )
    with pytest.raises(TrainError, match="3 classes; give one weight per class"):
        fit(W.build_model(), W.make_data(32, 0), W.clean_collate,
            TrainConfig(epochs=1, progress=False, class_weights=[1.0, 2.0]), task=TASK)
    with pytest.raises(TrainError, match="2 weights but the data has 3 classes"):
        class_weights([1.0, 2.0], [], n_classes=3)
