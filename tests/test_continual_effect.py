"""Issue 22: each regularising strategy must change what is trained or predicted.

On tweet-domains LwF and LAE once ended with exactly sequential fine-tuning's final row. These
tests pin down, through the real trainer, that each strategy's own term reaches the optimisation
(EWC's penalty, LwF's distillation, ZSCL's reference distillation and weight ensemble, O-LoRA's
orthogonality and frozen rows) or the evaluation (LAE's offline member), so a term with zero weight
in effect, a teacher equal to the student, or an ensemble that never reads its offline model
fails here.
"""

from __future__ import annotations

import pytest
import torch
from continual_toys import ToyNet, vector_collate

import deltatune as dt
from deltatune import continual as cl
from deltatune.core.host import iter_hosts
from deltatune.data import Dataset
from deltatune.train import TrainConfig, fit

KIND = "text-classification"
CFG = dict(max_steps=12, batch_size=16, lr=3e-2, progress=False, eval_each_epoch=False,
           keep_best=False, seed=0)
LORA = dt.LoRA(r=2, targets=["body"])


def _shift_stream() -> cl.Stream:
    """Two domains of one 3-class problem; the second is 90% class 2 (the label shift of
    tweet-domains' last domain, where sequential fine-tuning learns the constant "neutral")."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 1.5
    names = ["a", "b", "c"]

    def data(name: str, labels: list[int], shift: float) -> Dataset:
        ex = [{"x": centres[c] + shift + 0.8 * torch.randn(8, generator=g), "label": c}
              for c in labels]
        return Dataset(name, KIND, ex, names)

    balanced = [c for _ in range(40) for c in range(3)]
    skewed = [2] * 108 + [0] * 6 + [1] * 6
    tasks = [cl.Task("d0", data("d0", balanced, 0.0), data("d0", balanced, 0.0), [0, 1, 2]),
             cl.Task("d1", data("d1", skewed, 0.5), data("d1", balanced, 0.5), [0, 1, 2])]
    return cl.Stream("shift", "domain", tasks, names, KIND)


class _Log:
    """Records the trainer's per-step numbers (``train/penalty`` is the strategies' term)."""

    def __init__(self) -> None:
        self.penalties: list[float] = []

    def on_log(self, values, step) -> None:
        if "train/penalty" in values:
            self.penalties.append(values["train/penalty"])


def _run(name: str, spec=LORA, **options):
    """The stream run by hand (as run_stream does), recording each task's penalties; returns the
    final predictor's logits on the first domain's test inputs and the penalties of task 2."""
    torch.manual_seed(0)
    model, stream = ToyNet(3), _shift_stream()
    s = cl.make_strategy(name, **options)
    s.configure(TrainConfig(**CFG), CFG["max_steps"], stream.scenario, len(stream.tasks))
    s.setup(model, spec, ["head"], vector_collate)
    log = _Log()
    for t, task in enumerate(stream.tasks):
        s.before_task(t, task)
        if t == 1:
            log.penalties.clear()
        fit(s.trainee(t, task), task.train, vector_collate, TrainConfig(**CFG), task=KIND,
            callbacks=[*s.callbacks(t, task), log])
        s.after_task(t, task)
    x = vector_collate(stream.tasks[0].test.examples)["x"]
    with torch.no_grad():
        out = s.predictor()(x=x)
    return out, log.penalties


@pytest.fixture(scope="module")
def sequential():
    return _run("sequential")[0]


@pytest.mark.parametrize("name", ["ewc", "lwf", "zscl", "olora"])
def test_each_regulariser_adds_a_nonzero_term_that_changes_the_model(name, sequential):
    out, penalties = _run(name)
    if name != "olora" or penalties:  # O-LoRA's term is the orthogonality of two LoRA A's
        assert penalties and max(penalties) > 1e-6, f"{name}'s penalty never reached the loss"
    assert (out - sequential).abs().max() > 1e-3, f"{name} trained exactly as sequential"


def test_lwf_distillation_changes_the_gradient():
    """At the teacher the KL is zero but its gradient is not once the student moves: the term
    must reach the trainable parameters (a detached student or a teacher that follows the student
    would give no gradient)."""
    torch.manual_seed(0)
    model, stream = ToyNet(3), _shift_stream()
    s = cl.make_strategy("lwf", lam=1.0)
    s.configure(TrainConfig(**CFG), 4, "domain", 2)
    s.setup(model, LORA, ["head"], vector_collate)
    s.after_task(0, stream.tasks[0])
    s.before_task(1, stream.tasks[1])
    with torch.no_grad():
        model.head.bias.add_(torch.tensor([0.0, 0.0, 3.0]))  # the student drifts to class 2
    batch = vector_collate(stream.tasks[1].train.examples[:16])
    kd = s.callbacks(1, stream.tasks[1])[0].penalty(model, batch, model(x=batch["x"]))
    kd.backward()
    assert kd.item() > 1e-3 and model.head.bias.grad[2] > 0  # pushes class 2's score back down
    assert all(not p.requires_grad for p in s.teacher.parameters()) or s.teacher.training is False


def test_lwf_weight_scales_its_term():
    _, low = _run("lwf", lam=1.0)
    _, high = _run("lwf", lam=10.0)
    assert max(high) > 3 * max(low) > 0


def test_lae_evaluates_the_offline_member():
    """Where the offline (EMA) model is the more confident one, the ensemble's prediction is its."""
    torch.manual_seed(0)
    model = ToyNet(3)
    s = cl.make_strategy("lae", momentum=0.9)
    s.setup(model, LORA, ["head"], vector_collate)
    x = torch.randn(5, 8)
    with torch.no_grad():
        online = model(x=x).argmax(-1)
        for p, off in s._heads:  # the offline head: class 0 with high confidence
            if p.dim() == 1:
                off.copy_(torch.tensor([20.0, 0.0, 0.0]))
    assert (online != 0).any()
    pred = s.predictor()(x=x).argmax(-1)
    assert (pred == 0).all()
    with torch.no_grad():
        assert torch.equal(model(x=x).argmax(-1), online)  # the online head is put back


def test_lae_offline_member_lags_and_changes_the_prediction():
    """After a stream the offline delta and head are an EMA behind the online ones, and the
    ensemble's output is not the online model's alone."""
    torch.manual_seed(0)
    model, stream = ToyNet(3), _shift_stream()
    s = cl.make_strategy("lae", momentum=0.9)
    s.configure(TrainConfig(**CFG), CFG["max_steps"], "domain", 2)
    s.setup(model, LORA, ["head"], vector_collate)
    for t, task in enumerate(stream.tasks):
        s.before_task(t, task)
        fit(s.trainee(t, task), task.train, vector_collate, TrainConfig(**CFG), task=KIND,
            callbacks=s.callbacks(t, task))
        s.after_task(t, task)
    host = dict(iter_hosts(model))["body"]
    assert not torch.allclose(host.part("online").lora_B, host.part("offline").lora_B)
    assert all(not torch.allclose(p, off) for p, off in s._heads)
    x = vector_collate(stream.tasks[0].test.examples)["x"]
    with torch.no_grad():
        assert not torch.allclose(s.predictor()(x=x), torch.log_softmax(model(x=x), -1))


def test_olora_old_subspace_and_rows_stay_fixed_through_training():
    torch.manual_seed(0)
    model, stream = ToyNet(3), _shift_stream()
    s = cl.make_strategy("olora")
    s.configure(TrainConfig(**CFG), CFG["max_steps"], "domain", 2)
    s.setup(model, LORA, ["head"], vector_collate)
    s.before_task(0, stream.tasks[0])
    fit(s.trainee(0, stream.tasks[0]), stream.tasks[0].train, vector_collate, TrainConfig(**CFG),
        task=KIND, callbacks=s.callbacks(0, stream.tasks[0]))
    s.after_task(0, stream.tasks[0])
    host = dict(iter_hosts(model))["body"]
    a0 = host.part("task0").lora_A.detach().clone()
    s.before_task(1, stream.tasks[1])
    log = _Log()
    fit(s.trainee(1, stream.tasks[1]), stream.tasks[1].train, vector_collate, TrainConfig(**CFG),
        task=KIND, callbacks=[*s.callbacks(1, stream.tasks[1]), log])
    assert torch.equal(host.part("task0").lora_A, a0)
    assert log.penalties and max(log.penalties) > 0  # the orthogonality term was in the loss
