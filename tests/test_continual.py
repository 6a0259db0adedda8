"""deltatune.continual: streams, strategies doing what they claim, metrics, CLI, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from continual_toys import vector_collate
from torch import nn

import deltatune as dt
from deltatune import continual as cl
from deltatune.core.host import iter_hosts
from deltatune.data import Dataset, load_data
from deltatune.models import load_model
from deltatune.train import TrainConfig

CFG = dict(
    max_steps=3, batch_size=16, lr=1e-2, progress=False, eval_each_epoch=False, keep_best=False
)


@pytest.fixture(scope="module")
def stream():
    return cl.make_stream("split-mnist", limit_train=300, limit_test=150)


def test_metrics_of_a_known_matrix():
    m = cl.metrics([[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]], initial=[0.1, 0.1, 0.2])
    assert m["average_accuracy"] == pytest.approx(0.7)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["forward_transfer"] == pytest.approx(((0.1 - 0.1) + (0.1 - 0.2)) / 2)
    assert cl.metrics([[0.5, 0.7]], [0, 0])["forgetting"] is None  # joint: one row


def test_streams_split_classes_and_domains(stream):
    assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(
        set(t.train.labels) <= set(t.classes) and set(t.test.labels) <= set(t.classes)
        for t in stream.tasks
    )
    assert stream.scenario == "class" and len(stream.label_names) == 10
    dom = cl.make_stream("tweet-domains", limit_train=400, limit_test=100)
    assert [t.name for t in dom.tasks] == [
        "airlines",
        "nfl",
        "apple",
        "cars",
    ] and dom.scenario == "domain"


def test_bad_streams_and_strategies_are_one_line_errors(stream, tmp_path):
    tasks = stream.tasks
    with pytest.raises(cl.ContinualError, match="repeats classes"):
        cl.Stream("x", "class", [tasks[0], tasks[0]], stream.label_names, stream.task_kind)
    empty = cl.Task(
        "none", Dataset("e", stream.task_kind, [], stream.label_names), tasks[0].test, [0]
    )
    with pytest.raises(cl.ContinualError, match="no training or test examples"):
        cl.Stream("x", "class", [tasks[0], empty], stream.label_names, stream.task_kind)
    with pytest.raises(cl.ContinualError, match="unknown stream 'nope'"):
        cl.make_stream("nope")
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"t{i},{'abc'[i % 3]}\n" for i in range(30)))
    with pytest.raises(cl.ContinualError, match="empty task"):
        cl.make_stream(f"{csv}@0,1;")
    user = cl.make_stream(f"{csv}@0;1,2")
    assert [t.classes for t in user.tasks] == [[0], [1, 2]]
    with pytest.raises(cl.ContinualError, match="unknown strategy"):
        cl.make_strategy("gem")
    with pytest.raises(cl.ContinualError, match="has no option 'lam'"):
        cl.make_strategy("replay", lam=1.0)
    entry = load_model("small-cnn", num_labels=4)
    with pytest.raises(
        cl.ContinualError, match="head has 4 outputs but stream 'split-mnist' has 10 classes"
    ):
        cl.run_stream(
            entry.model,
            entry.collate,
            stream,
            cl.make_strategy("sequential"),
            TrainConfig(**CFG),
            spec=dt.LoRA(r=2, target_types=["Conv2d"]),
            head=entry.head,
        )
    with pytest.raises(cl.ContinualError, match="LAE needs a parameter-efficient method"):
        cl.make_strategy("lae").setup(entry.model, None, entry.head, entry.collate)


def test_reservoir_keeps_its_size_and_class_balance():
    buf = cl.Reservoir(30, balanced=True, seed=0)
    buf.add([{"label": 0, "i": i} for i in range(100)])
    assert len(buf.items) == 30
    buf.add([{"label": 1, "i": i} for i in range(100)] + [{"label": 2, "i": i} for i in range(100)])
    counts = [sum(e["label"] == c for e in buf.items) for c in range(3)]
    assert counts == [10, 10, 10]
    plain = cl.Reservoir(50, seed=1)
    plain.add([{"label": i % 5} for i in range(1000)])
    assert len(plain.items) == 50 and plain.offered == 1000


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away():
    model = _mlp()
    s = cl.make_strategy("ewc", lam=10.0)
    s.setup(model, dt.LoRA(r=2, targets=["0"]), ["2"], collate=None)
    assert s.penalty_value() is None  # nothing to protect before the first task
    s.fisher = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    s.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert s.penalty_value().item() == 0.0
    with torch.no_grad():
        model[2].weight.add_(0.1)
    assert s.penalty_value().item() == pytest.approx(
        0.5 * 10.0 * 0.01 * model[2].weight.numel(), rel=1e-4
    )


def test_lae_offline_delta_is_the_ema_of_the_online_one():
    model = _mlp()
    s = cl.make_strategy("lae", momentum=0.9)
    s.setup(model, dt.LoRA(r=2, targets=["0"]), ["2"], collate=None)
    host = dict(iter_hosts(model))["0"]
    on, off = host.part("online"), host.part("offline")
    assert torch.equal(on.lora_A, off.lora_A) and not off.lora_A.requires_grad
    before = off.lora_A.detach().clone()
    with torch.no_grad():
        on.lora_A.add_(1.0)
    s.ema_update()
    assert torch.allclose(off.lora_A, 0.9 * before + 0.1 * on.lora_A)


def test_lae_momentum_follows_the_steps_per_task_unless_given():
    s = cl.make_strategy("lae")
    s.configure(TrainConfig(**CFG), 200)
    assert s.ema_momentum == pytest.approx(1 - 1 / (200 * s.tasks_per_constant))
    assert cl.make_strategy("lae", tasks_per_constant=1.0).ema_momentum == pytest.approx(0.999)
    s.configure(TrainConfig(**CFG), 3)
    assert s.ema_momentum == pytest.approx(
        0.9
    )  # clipped: a 3-step task still keeps an offline memory
    assert cl.make_strategy("lae", momentum=0.999).ema_momentum == 0.999
    with pytest.raises(cl.ContinualError, match="momentum must be in"):
        cl.make_strategy("lae", momentum=1.5).validate(dt.LoRA(r=2))


class _XModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, labels=None):
        return self.head(torch.relu(self.body(x)))


def test_zscl_distils_only_from_the_second_task_and_is_zero_at_the_teacher():
    torch.manual_seed(0)
    model = _XModel()
    s = cl.make_strategy("zscl", reference_batch=8)
    s.setup(model, None, ["head"], vector_collate)
    data = Dataset(
        "d", "x", [{"x": torch.randn(4), "label": i % 3} for i in range(32)], ["a", "b", "c"]
    )
    task = cl.Task("t", data, data, [0, 1, 2])
    s.before_task(0, task)
    assert s.distillation(model) is None  # no teacher before the first task
    s.before_task(1, task)
    assert s.distillation(model).item() == pytest.approx(0.0, abs=1e-7)  # student == teacher
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))
    kd = s.distillation(model)
    assert kd.item() > 1e-3 and kd.requires_grad  # it pulls the student back
    assert not any(p.requires_grad for p in s.teacher.parameters())


def test_zscl_weight_ensemble_is_the_mean_of_the_trajectory():
    model = _XModel()
    s = cl.make_strategy("zscl", we_interval=1)
    s.setup(model, None, ["head"], vector_collate)
    start = model.head.weight.detach().clone()
    s.we_start(include_start=True)
    seen = [start]
    for step in range(3):
        with torch.no_grad():
            model.head.weight.add_(1.0)
        seen.append(model.head.weight.detach().clone())
        s.we_add()
    s.we_finish()  # the final weights are counted once more: (w0 + w1 + w2 + w3 + w3) / 5
    expected = (sum(seen) + seen[-1]) / 5
    assert torch.allclose(model.head.weight, expected)
    with pytest.raises(cl.ContinualError, match="we_interval must be"):
        cl.make_strategy("zscl", we_interval=0).validate(None)


def test_zscl_reference_of_another_kind_is_refused():
    entry = load_model("small-cnn", num_labels=10)
    s = cl.make_strategy("zscl", reference="tweet-sentiment:other", reference_size=8)
    with pytest.raises(cl.ContinualError, match="does not fit this model's inputs"):
        s.setup(entry.model, dt.LoRA(r=2, target_types=["Conv2d"]), entry.head, entry.collate)


def test_user_stream_from_a_task_column(tmp_path):
    rows = ["text,label,task"]
    for i in range(60):
        rows.append(
            f"example {i} "
            f"{'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'},{['b', 'a', 'c'][i % 3]}"
        )
    csv = tmp_path / "tasks.csv"
    csv.write_text("\n".join(rows) + "\n")
    st = cl.make_stream(f"{csv}@task")
    assert st.scenario == "domain" and [t.name for t in st.tasks] == ["a", "b", "c"]  # sorted
    assert all(e["task"] == t.name for t in st.tasks for e in t.train.examples + t.test.examples)
    assert sum(len(t.train) for t in st.tasks) == len(load_data(str(csv), "train"))
    st = cl.make_stream(f"{csv}@task=c,a")
    assert [t.name for t in st.tasks] == ["c", "a"]
    with pytest.raises(cl.ContinualError, match=r"value\(s\) \['z'\] do not occur"):
        cl.make_stream(f"{csv}@task=c,z")
    with pytest.raises(cl.ContinualError, match="has no 'region' column"):
        cl.make_stream(f"{csv}@region")
    with pytest.raises(cl.ContinualError, match="repeats a value"):
        cl.make_stream(f"{csv}@task=a,a")
    dom = cl.make_stream("tweet-sentiment@domain=apple,cars", limit_train=400, limit_test=200)
    assert [t.name for t in dom.tasks] == ["apple", "cars"]


def test_olora_penalty_vanishes_for_orthogonal_subspaces():
    model = _mlp()
    s = cl.make_strategy("olora", lam=1.0)
    s.setup(model, dt.LoRA(r=2, targets=["0"]), ["2"], collate=None)
    s.before_task(0, None)
    assert s.orthogonality() is None
    s.before_task(1, None)
    host = dict(iter_hosts(model))["0"]
    with torch.no_grad():
        host.part("task0").lora_A.copy_(torch.eye(6)[:2])
        host.part("task1").lora_A.copy_(torch.eye(6)[2:4])
    assert s.orthogonality().item() == 0.0
    with torch.no_grad():
        host.part("task1").lora_A.copy_(torch.eye(6)[1:3])
    assert s.orthogonality().item() == pytest.approx(1.0)
    assert not host.part("task0").lora_A.requires_grad and host.part("task1").lora_A.requires_grad
    assert model[2].weight.requires_grad, (
        "the shared head keeps training after a new task's LoRA is attached"
    )


def test_merge_is_the_average_of_the_task_deltas():
    model = _mlp()
    s = cl.make_strategy("merge")
    s.setup(model, dt.LoRA(r=2, targets=["0"]), ["2"], collate=None)
    x = torch.randn(5, 6)
    outs = []
    for t in range(2):
        s.before_task(t, None)
        with torch.no_grad():
            for p in dict(iter_hosts(model))["0"].part(f"task{t}").parameters():
                p.normal_(0, 0.5)
            outs.append(model[0](x))
        s.after_task(t, cl.Task(f"t{t}", None, None, [t]))
    with torch.no_grad():
        assert torch.allclose(
            model[0](x), (outs[0] + outs[1]) / 2, atol=1e-5
        )  # ΔW averaged, layer 0 is linear
    assert model[2].weight.requires_grad


@pytest.mark.parametrize(
    "strategy", ["sequential", "joint", "replay", "ewc", "lwf", "lae", "zscl", "merge", "olora"]
)
def test_every_strategy_runs_a_stream(stream, strategy):
    torch.manual_seed(0)
    entry = load_model("small-cnn", num_labels=10)
    result = cl.run_stream(
        entry.model,
        entry.collate,
        stream,
        cl.make_strategy(strategy),
        TrainConfig(**CFG),
        spec=dt.LoRA(r=2, target_types=["Conv2d"]),
        head=entry.head,
    )
    rows = 1 if strategy == "joint" else 5
    assert len(result.accuracy_matrix) == rows and all(len(r) == 5 for r in result.accuracy_matrix)
    assert all(0 <= a <= 1 for r in result.accuracy_matrix for a in r)
    assert (result.forgetting is None) == (strategy == "joint")
    assert result.accuracy_matrix[-1] != result.initial_accuracy  # training changed something


def test_cli_continual_writes_matrix_and_plot(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune.cli.app",
            "continual",
            "--model",
            "small-cnn",
            "--stream",
            "split-mnist",
            "--strategy",
            "replay",
            "--method",
            "lora",
            "--rank",
            "2",
            "--max-steps",
            "2",
            "--limit",
            "300",
            "--limit-test",
            "100",
            "--buffer-size",
            "20",
            "--out",
            str(tmp_path / "cl"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "cl" / "results.json").read_text())
    assert len(r["accuracy_matrix"]) == 5 and {
        "average_accuracy",
        "forgetting",
        "backward_transfer",
    } <= set(r)
    assert (tmp_path / "cl" / "accuracy_matrix.png").stat().st_size > 1000
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune.cli.app",
            "continual",
            "--model",
            "small-cnn",
            "--stream",
            "split-mnist",
            "--strategy",
            "lae",
            "--method",
            "full",
            "--max-steps",
            "2",
            "--limit",
            "100",
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "LAE needs" in bad.stderr and not (tmp_path / "bad").exists()
