"""Issue 23's test-time methods (safe, deyo, roid, shot, t3a, rmt, rotta): reset restores the
source, only the declared parameters change, bad options are one-line errors, and each method's own
mechanism (the safe default's back-off and label-shift correction, T3A's prototypes, RoTTA's
balanced memory, DeYO's filter, ROID's weight ensembling, SHOT's frozen head)."""

import math

import pytest
import torch
from torch import nn

import deltatune.deploy as dd
from deltatune.deploy.views import destroy_view, split_call, stack_calls, weak_view


class BNNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture
def bnnet():
    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def shifted(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2 + 1


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# options that make each method move on a random net (lenient filters, large steps)
OPTIONS = {
    "safe": {"lr": 0.5, "optimizer": "sgd", "e_margin": 1.0, "max_drift": 1.0, "collapse": 0.0},
    "deyo": {"lr": 0.5, "e_filter": 1.0, "plpd_threshold": -1.0},
    "roid": {"lr": 0.5},
    "shot": {"lr": 0.1},
    "rmt": {"lr": 0.5, "ema": 0.5},
    "rotta": {"lr": 0.5, "update_every": 8, "capacity": 8, "nu": 0.5},
    "t3a": {"filter_k": 5},
}
DECLARED = {  # state-dict entries each method may change (t3a changes none)
    "safe": {"bn.weight", "bn.bias"},
    "deyo": {"bn.weight", "bn.bias"},
    "roid": {"bn.weight", "bn.bias"},
    "shot": {"conv.weight", "conv.bias", "bn.weight", "bn.bias"},
    "rmt": {"bn.weight", "bn.bias"},
    "rotta": {"bn.weight", "bn.bias"},
    "t3a": set(),
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_reset_restores_the_source_and_only_declared_params_change(bnnet, method):
    before = state(bnnet)
    w = dd.adapt(bnnet, method, **OPTIONS[method])
    first = w(shifted(seed=1)).detach()
    for seed in (2, 3, 4):
        out = w(shifted(seed=seed))
        assert torch.isfinite(out).all()
    changed = {k for k, v in bnnet.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == DECLARED[method], changed
    second = w(shifted(seed=1)).detach()
    if method in ("t3a", "rotta"):  # T3A's supports and RoTTA's teacher/statistics move outputs
        assert not torch.allclose(first, second)
    w.reset()
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    assert torch.allclose(w(shifted(seed=1)), first, atol=1e-5)  # as on the first call
    w.remove()
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("safe", {"max_drift": 0}, "max_drift=0 is a total-variation bound"),
        ("safe", {"source_prior": [1, 0, 1, 1]}, "frequency 0"),
        ("safe", {"bn_momentum": 2}, "bn_momentum=2 must lie in"),
        ("deyo", {"e_filter": 0}, "e_filter=0 is a fraction"),
        ("roid", {"ensemble": 1.5}, "ensemble=1.5 must lie in"),
        ("shot", {"beta": -1}, "must be >= 0"),
        ("t3a", {"filter_k": 0}, "filter_k=0 must be a positive integer"),
        ("t3a", {"layer": "bn"}, "must be the model's nn.Linear classifier head"),
        ("rmt", {"source_data": []}, "source_data yielded no batches"),
        ("rmt", {"source_data": [torch.zeros(2, 3, 8, 8)]}, "needs labels"),
        ("rotta", {"capacity": 0}, "capacity=0 must be a positive integer"),
        ("safe", {"momentum_x": 1}, "has no option 'momentum_x'"),
    ],
)
def test_bad_options_are_one_line_errors_and_leave_the_model_alone(bnnet, method, options, message):
    flags = {n: p.requires_grad for n, p in bnnet.named_parameters()}
    with pytest.raises(dd.DeployError, match=message) as err:
        dd.adapt(bnnet, method, **options)
    assert "\n" not in str(err.value)
    assert dd.wrapper_of(bnnet) is None
    assert {n: p.requires_grad for n, p in bnnet.named_parameters()} == flags
    assert not bnnet.bn._forward_pre_hooks and not bnnet.bn._forward_hooks


def test_safe_is_the_default_and_corrects_label_shift_like_em():
    """With a step too small to move anything, and on a model without norm layers (nothing to adapt,
    no error), safe's output is EM's prior correction."""
    torch.manual_seed(0)
    x = torch.randn(64, 5) + torch.tensor([2.0, 0, 0, 0, 0])
    plain = nn.Sequential(nn.Linear(5, 3)).eval()
    w = dd.adapt(plain)
    assert w.param_names == [] and w.frozen
    out = w(x)
    prior = w.prior.clone()
    w.remove()
    em = dd.adapt(plain, "em")
    assert torch.allclose(out.softmax(-1), em(x).softmax(-1), atol=1e-5)
    assert torch.allclose(prior, em.prior, atol=1e-8)
    em.remove()
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    w = dd.adapt(model, lr=1e-12)  # default method; a step too small to move the prediction
    assert w.method == "safe"
    out = w(x)
    w.remove()
    em = dd.adapt(model, "em")
    assert torch.allclose(out.softmax(-1), em(x).softmax(-1), atol=1e-4)


def test_safe_backs_off_when_updates_drift_from_the_reference(bnnet):
    w = dd.adapt(
        bnnet, "safe", optimizer="sgd", lr=50.0, e_margin=1.0, max_drift=0.1, max_backoffs=1
    )
    w(shifted(seed=0))
    moved = state(bnnet)
    uniform = torch.full((8, 4), 0.25)
    w._guard(uniform, uniform)  # the adapted model predicts like the reference: no back-off
    assert w.backoffs == 0
    skewed = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    w._guard(skewed, uniform)  # class shares 0.75 apart (total variation), smoothed: 0.225 > 0.1
    assert w.backoffs == 1 and not w.frozen and w.lr == 25.0
    assert not torch.equal(moved["bn.weight"], bnnet.bn.weight)  # back at the source weights
    assert torch.equal(bnnet.bn.weight, torch.ones(8))
    w._guard(skewed * 0.5 + uniform * 0.5, uniform)  # entropy 0.49 of the reference's: collapse
    assert w.backoffs == 2 and w.frozen and w.lr == pytest.approx(50.0 / 4)
    before = state(bnnet)
    w(shifted(seed=9))  # frozen: the weights stay at the source
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    w.reset()
    assert w.backoffs == 0 and not w.frozen and w.lr == 50.0


def test_safe_batchnorm_estimate_is_a_running_mean_from_the_source(bnnet):
    """The source statistics count as a quarter batch, then each batch gets weight 1/(t+0.25) (until
    that falls below bn_momentum); the reference look at the same batch does not move the
    estimate."""
    w = dd.adapt(bnnet, "safe", lr=1e-12)
    x1, x2 = shifted(seed=1), shifted(seed=2)
    with torch.no_grad():
        m1, m2 = bnnet.conv(x1).mean((0, 2, 3)), bnnet.conv(x2).mean((0, 2, 3))
    w(x1)
    w(x2)
    expected = (0.25 * bnnet.bn.running_mean + m1 + m2) / 2.25
    est_mean, _ = w.bn_stats._target["bn"]
    assert torch.allclose(est_mean, expected, atol=1e-5)
    w.reset()
    assert not w.bn_stats._target and not w.bn_stats._count


def test_t3a_prototypes_follow_confident_test_features():
    torch.manual_seed(0)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    model = nn.Sequential(nn.Identity(), head).eval()
    w = dd.adapt(model, "t3a", filter_k=3)
    feats = torch.tensor([[0.5, 0.87], [0.45, 0.9], [0.55, 0.84]])  # all predicted class 1
    out = w(feats)
    # class 1 keeps its head vector and the 2 most confident of the 3 (largest logit gap)
    assert (w.labels == 1).sum() == 3 and (w.labels == 0).sum() == 1
    kept = torch.nn.functional.normalize(
        torch.tensor([[0.0, 1.0], [0.45, 0.9], [0.5, 0.87]]), dim=-1
    )
    proto1 = torch.nn.functional.normalize(kept.mean(0), dim=0)
    protos = torch.stack([torch.tensor([1.0, 0.0]), proto1], 1)  # (D, C)
    expected = torch.nn.functional.normalize(feats, dim=-1) @ protos
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, feats)  # not the head's logits


def test_rotta_memory_stays_class_balanced_on_a_one_class_stream(bnnet):
    w = dd.adapt(bnnet, "rotta", capacity=8, update_every=1000)
    for seed in range(6):
        w(shifted(seed=seed))
    counts = torch.bincount(torch.tensor([m.label for m in w.memory]), minlength=4)
    assert len(w.memory) == 8
    w.memory = [m for m in w.memory if m.label == int(counts.argmax())][:8]
    while len(w.memory) < 8:
        w.memory.append(w.memory[0])
    w._add(type(w.memory[0])(w.memory[0].call, (int(counts.argmax()) + 1) % 4, 0.0), 4)
    assert any(m.label == (int(counts.argmax()) + 1) % 4 for m in w.memory)  # minority gets in


def test_deyo_keeps_only_samples_whose_shape_matters(bnnet):
    w = dd.adapt(bnnet, "deyo", e_filter=1.0, plpd_threshold=1.0)  # no PLPD can exceed 1
    before = state(bnnet)
    w(shifted())
    assert w.last_selected == 0 and all(
        torch.equal(before[k], v) for k, v in bnnet.state_dict().items()
    )


def test_roid_ensembles_weights_with_the_source(bnnet):
    w = dd.adapt(bnnet, "roid", lr=0.5, ensemble=0.0)  # α = 0: every step ends at the source
    before = state(bnnet)
    w(shifted())
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())


def test_views_shuffle_patches_and_words_and_rebatch_padded_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    (y,), _ = destroy_view((x,), {}, g)
    assert not torch.equal(x, y) and torch.equal(
        x.flatten(1).sort().values, y.flatten(1).sort().values
    )
    ids = torch.tensor([[101, 5, 6, 7, 102, 0], [101, 8, 9, 102, 0, 0]])
    mask = (ids > 0).long()
    _, kw = destroy_view((), {"input_ids": ids, "attention_mask": mask}, g)
    assert torch.equal(kw["input_ids"][:, 0], ids[:, 0]) and kw["input_ids"][0, 4] == 102
    assert torch.equal(kw["input_ids"].sort(1).values, ids.sort(1).values)
    _, kw = weak_view((), {"input_ids": ids, "attention_mask": mask}, g)
    assert (kw["attention_mask"] <= mask).all() and kw["attention_mask"][:, 0].all()
    parts = split_call((), {"input_ids": ids[:, :5], "attention_mask": mask[:, :5]}, 2)
    parts[1] = ((), {k: v[:, :4] for k, v in parts[1][1].items()})
    _, joined = stack_calls(parts)
    assert torch.equal(joined["input_ids"], ids[:, :5]) and torch.equal(
        joined["attention_mask"], mask[:, :5]
    )


def test_shot_freezes_the_head_and_keeps_predictions_diverse(bnnet):
    w = dd.adapt(bnnet, "shot", lr=0.05)
    assert "fc.weight" not in w.param_names and "conv.weight" in w.param_names
    assert not bnnet.fc.weight.requires_grad
    probs = w(shifted()).detach().softmax(-1)
    assert math.isfinite(float(probs.sum()))


@pytest.mark.parametrize("method", ["safe", "deyo", "roid", "shot", "rmt", "rotta", "t3a"])
def test_text_model_dict_batches_keep_the_output_type_and_reset(method):
    """A tiny BERT fed padded token batches of different lengths (RoTTA re-batches them)."""
    transformers = pytest.importorskip("transformers")
    from deltatune.models.text import MeanPoolClassifier

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = MeanPoolClassifier(transformers.BertModel(cfg), 3).eval()
    before = state(model)

    def batch(seed: int, width: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 64, (8, width), generator=g)
        mask = (torch.arange(width)[None] < torch.randint(3, width + 1, (8, 1), generator=g)).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    options = {"rotta": {"update_every": 8, "capacity": 8}}.get(method, {})
    w = dd.adapt(model, method, lr=1e-2, **options) if method != "t3a" else dd.adapt(model, "t3a")
    with torch.no_grad():
        kind = type(model(**batch(0, 10)))
    first = w(**batch(0, 10))
    assert type(first) is kind and dd.batch.get_logits(first).shape == (8, 3)
    for seed, width in ((1, 12), (2, 7)):
        assert torch.isfinite(dd.batch.get_logits(w(**batch(seed, width)))).all()
    w.reset()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = dd.batch.get_logits(w(**batch(0, 10)))
    assert torch.allclose(again, dd.batch.get_logits(first), atol=1e-5)


@pytest.mark.slow
def test_real_mnist_safe_default_cuts_covariate_shift_and_survives_class_order():
    """Reduced bench on real data: a small BatchNorm CNN trained briefly on MNIST. The safe default
    cuts the error on contrast:3, and on a clean stream sorted by class (where batch-statistics
    methods hurt) stays near the unadapted error."""
    pytest.importorskip("corrupt_tta")
    import torch.nn.functional as F

    from deltatune.data import load_data
    from deltatune.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        entry = load_model("small-cnn")  # for its collate (pixel_values in [-1, 1])
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 49, 10),
        )  # fmt: skip
        train = entry.collate(load_data("mnist", "train", limit=6000).examples)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for xb, yb in zip(train["pixel_values"].split(64), train["labels"].split(64)):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        net.eval()
        clean = entry.collate(load_data("mnist", "test", limit=512).examples)
        shifted_set = entry.collate(load_data("mnist-c:contrast:3", "test", limit=512).examples)
        order = clean["labels"].argsort(stable=True)
        streams = {
            "contrast": (shifted_set["pixel_values"], shifted_set["labels"]),
            "ordered": (clean["pixel_values"][order], clean["labels"][order]),
        }

        def error(predict, x, y):
            wrong = sum(int((predict(a).argmax(-1) != b).sum())
                        for a, b in zip(x.split(64), y.split(64)))
            return 100.0 * wrong / len(y)

        errors = {}
        for name in ("source", "bn", "safe"):
            for key, (x, y) in streams.items():
                w = dd.adapt(net, name) if name != "source" else None
                with torch.no_grad() if w is None else torch.enable_grad():
                    errors[name, key] = error(w or net, x, y)
                if w is not None:
                    w.remove()
    finally:
        torch.set_num_threads(threads)
    assert errors["source", "contrast"] > 20, errors
    assert errors["safe", "contrast"] < 0.8 * errors["source", "contrast"], errors
    assert errors["bn", "ordered"] > errors["source", "ordered"], errors  # batch statistics hurt
    assert errors["safe", "ordered"] <= errors["source", "ordered"] + 5, errors


def test_cli_adapt_defaults_to_safe_and_refuses_bad_options(tmp_path):
    pytest.importorskip("corrupt_tta")
    import json

    from deltatune.cli.app import main

    out = tmp_path / "tta"
    args = ["adapt", "--model", "small-cnn", "--data", "mnist-c:fog:3", "--limit", "64",
            "--batch-size", "32"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "safe" and res["batches"] == 2 and 0 <= res["error"] <= 100
    assert main([*args, "--opt", "max_drift=0", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b" / "results.json").exists()
