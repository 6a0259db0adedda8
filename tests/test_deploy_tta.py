"""Test-time adaptation wrappers: reference computations, invariants (reset, episodic, what
changes), errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
import deltatune.deploy as dd


class BNNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.ln(self.fc1(x)))))


@pytest.fixture
def bnnet():
    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():  # non-trivial source statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def shifted(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 1


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bn_uses_batch_statistics_like_train_mode_and_keeps_buffers(bnnet):
    x = shifted()
    before = state(bnnet)
    reference = copy.deepcopy(bnnet).train()(x)
    out = dd.adapt(bnnet, "bn")(x)
    assert torch.allclose(out, reference, atol=1e-6)
    assert all(
        torch.equal(v, before[k]) for k, v in bnnet.state_dict().items()
    )  # source stats untouched


def test_alpha_bn_interpolates_between_source_and_batch(bnnet):
    x = shifted()
    source = bnnet(x)
    batch = copy.deepcopy(bnnet).train()(x)
    w = dd.adapt(bnnet, "alpha_bn", alpha=1.0)
    assert torch.allclose(w(x), source, atol=1e-6)
    w.remove()
    w = dd.adapt(bnnet, "alpha_bn", alpha=0.0)
    assert torch.allclose(w(x), batch, atol=1e-5)
    w.remove()
    # alpha = 0.3 by hand: mixed statistics of the BatchNorm input
    with torch.no_grad():
        feats = bnnet.conv(x)
        mean = 0.3 * bnnet.bn.running_mean + 0.7 * feats.mean((0, 2, 3))
        var = 0.3 * bnnet.bn.running_var + 0.7 * feats.var((0, 2, 3), unbiased=False)
        h = F.batch_norm(feats, mean, var, bnnet.bn.weight, bnnet.bn.bias, False, 0.0, bnnet.bn.eps)
        expected = bnnet.fc(torch.relu(h).mean(dim=(2, 3)))
    w = dd.adapt(bnnet, "alpha_bn", alpha=0.3)
    assert torch.allclose(w(x), expected, atol=1e-5)
    assert w(x[:1]).shape == (1, 4)  # one image: mixing with the source statistics keeps it defined


def test_bn_running_estimate_with_momentum():
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    w = dd.adapt(bn, "bn", momentum=0.5)
    x1, x2 = torch.randn(8, 3) + 3, torch.randn(8, 3) - 2
    m1 = 0.5 * 1.0 + 0.5 * x1.mean(0)
    v1 = 0.5 * 4.0 + 0.5 * x1.var(0, unbiased=False)
    assert torch.allclose(w(x1), (x1 - m1) / torch.sqrt(v1 + bn.eps), atol=1e-5)
    m2, v2 = 0.5 * m1 + 0.5 * x2.mean(0), 0.5 * v1 + 0.5 * x2.var(0, unbiased=False)
    assert torch.allclose(w(x2), (x2 - m2) / torch.sqrt(v2 + bn.eps), atol=1e-5)
    w.reset()  # back to the source statistics as the starting point
    assert torch.allclose(w(x1), (x1 - m1) / torch.sqrt(v1 + bn.eps), atol=1e-5)


def test_tent_lowers_entropy_and_updates_only_norm_affine(bnnet):
    x = shifted()
    before = state(bnnet)
    w = dd.adapt(bnnet, "tent", optimizer="adam", lr=0.05)
    assert w.param_names == ["bn.weight", "bn.bias"]
    first = dd.softmax_entropy(w(x)).mean()
    for _ in range(10):
        last = dd.softmax_entropy(w(x)).mean()
    assert last < first - 0.1
    after = bnnet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"bn.weight", "bn.bias"}


OPTIONS = {
    "tent": {},
    "eata": {"e_margin": 1.0},  # every sample counts as reliable, so the random net does adapt
    "sar": {"e_margin": 1.0, "reset_constant": 0.0},
    "cotta": {"params": "all", "n_augment": 4},
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_reset_and_episodic_restore_the_source(bnnet, method):
    x, x2 = shifted(seed=1), shifted(seed=2)
    before = state(bnnet)
    fresh_out = copy.deepcopy(bnnet)
    w = dd.adapt(bnnet, method, optimizer="sgd", lr=0.5, **OPTIONS[method])
    first = w(x).detach()
    for _ in range(3):
        w(x2)
    assert any(not torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    w.reset()
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    assert torch.allclose(w(x), first, atol=1e-6)  # same as the first call on the source model
    epi = dd.adapt(fresh_out, method, optimizer="sgd", lr=0.5, episodic=True, **OPTIONS[method])
    a = epi(x).detach()
    epi(x2)
    assert torch.allclose(epi(x), a, atol=1e-6)  # each batch starts from the source


def test_remove_restores_flags_mode_and_behaviour(bnnet):
    x = shifted()
    bnnet.train()
    flags = {n: p.requires_grad for n, p in bnnet.named_parameters()}
    w = dd.adapt(bnnet, "tent", lr=0.1)
    w(x)
    model = w.remove()
    assert model is bnnet and bnnet.training
    assert {n: p.requires_grad for n, p in bnnet.named_parameters()} == flags
    bnnet.eval()
    assert not bnnet.bn._forward_pre_hooks and not bnnet.bn._forward_hooks
    assert bnnet.bn.track_running_stats


def test_tent_on_layernorm_keeps_dropout_off_and_allows_batch_of_one():
    torch.manual_seed(0)
    net = LNNet().train()  # the wrapper must switch dropout off
    w = dd.adapt(net, "tent", lr=0.1)
    assert w.param_names == ["ln.weight", "ln.bias"] and w.min_batch == 1
    x = torch.randn(1, 6)
    w.reset()
    y1 = w.source_forward(x)
    assert torch.equal(w.source_forward(x), y1)  # deterministic: no dropout
    w(torch.randn(1, 6))
    assert not torch.equal(net.ln.weight, torch.ones(16))


def test_named_delta_is_adapted_instead_of_norm_layers(mlp):
    with pytest.raises(dd.DeployError, match="no normalisation layer"):
        dd.adapt(mlp, "tent")
    dt.attach(mlp, dt.LoRA(r=2, alpha=4, targets=["fc1", "fc2"]), name="tta")
    before = state(mlp)
    flags = {n: p.requires_grad for n, p in mlp.named_parameters()}
    w = dd.adapt(mlp, "tent", delta="tta", lr=0.5)
    assert w.param_names and all(".deltas.tta." in n for n in w.param_names)
    for _ in range(3):
        w(torch.randn(8, 8))
    changed = {k for k, v in mlp.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".deltas.tta.lora_" in k for k in changed)
    with pytest.raises(dd.DeployError, match="already wrapped by 'tent'"):
        dd.adapt(mlp, "tent", delta="tta")
    dd.unwrap(mlp)
    assert (
        dd.wrapper_of(mlp) is None
        and {n: p.requires_grad for n, p in mlp.named_parameters()} == flags
    )
    with pytest.raises(dd.DeployError, match="no delta named 'nope'"):
        dd.adapt(mlp, "tent", delta="nope")
    with pytest.raises(dd.DeployError, match="wrapper was removed"):
        w(torch.randn(8, 8))


def test_bad_batches_give_clear_errors(bnnet):
    w = dd.adapt(bnnet, "tent")
    with pytest.raises(dd.BatchError, match="empty batch"):
        w(torch.zeros(0, 3, 6, 6))
    x = shifted()
    x[2, 0, 0, 0] = float("nan")
    before = state(bnnet)
    with pytest.raises(dd.BatchError, match="NaN or inf values \\(1 of 16"):
        w(x)
    with pytest.raises(dd.BatchError, match="batch of 1 is smaller than min_batch=2"):
        w(shifted(1))
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    w.remove()
    one = shifted(1)
    expected = bnnet(one)
    src = dd.adapt(bnnet, "bn", small_batch="source")
    assert torch.allclose(src(one), expected)  # unadapted, source statistics
    with pytest.raises(dd.BatchError, match="1 value per channel"):
        dd.adapt(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval(), "bn", min_batch=1)(
            torch.randn(1, 4)
        )


def test_adapt_rejects_unknown_methods_options_and_models(bnnet):
    with pytest.raises(dd.DeployError, match="did you mean tent"):
        dd.adapt(bnnet, "tnet")
    with pytest.raises(dd.DeployError, match="has no option 'lrr'"):
        dd.adapt(bnnet, "tent", lrr=1.0)
    with pytest.raises(dd.DeployError, match="no BatchNorm layer"):
        dd.adapt(LNNet(), "bn")
    with pytest.raises(dd.DeployError, match="not both"):
        dd.adapt(bnnet, "tent", params="all", delta="x")
    with pytest.raises(dd.DeployError, match="needs a torch.nn.Module"):
        dd.adapt("model", "lame")


def test_nonfinite_loss_stops_before_the_update(bnnet):
    w = dd.adapt(bnnet, "tent", lr=1.0)
    before = state(bnnet)
    with pytest.raises(dd.DeployError, match="model was not updated"):
        w.update(lambda: torch.tensor(float("nan"), requires_grad=True))
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())


def test_sar_step_matches_a_hand_computed_sam_step(bnnet):
    x = shifted()
    ref = copy.deepcopy(bnnet)
    w = dd.adapt(
        bnnet,
        "sar",
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
        rho=0.05,
        e_margin=1.0,
        reset_constant=-1.0,
    )
    w(x)
    # by hand: gradient at w + rho * g / ||g||, applied at w
    ref.bn.train()
    params = [ref.bn.weight, ref.bn.bias]
    loss = dd.softmax_entropy(ref(x)).mean()
    g = torch.autograd.grad(loss, params)
    norm = torch.norm(torch.stack([gi.norm() for gi in g]))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(0.05 * gi / norm)
    g2 = torch.autograd.grad(dd.softmax_entropy(ref(x)).mean(), params)
    with torch.no_grad():
        for p, gi, gi2 in zip(params, g, g2):
            p.sub_(0.05 * gi / norm + 0.1 * gi2)
    assert torch.allclose(bnnet.bn.weight, ref.bn.weight, atol=1e-5)
    assert torch.allclose(bnnet.bn.bias, ref.bn.bias, atol=1e-5)


def test_sar_recovers_the_source_model_on_collapse(bnnet):
    before = state(bnnet)
    w = dd.adapt(
        bnnet, "sar", lr=0.5, e_margin=1.0, reset_constant=100.0
    )  # any entropy counts as collapse
    w(shifted())
    assert w.recoveries == 1
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())


FISHER_ALPHA = 20.0


def test_eata_filters_samples_and_anchors_with_fisher(bnnet):
    x = shifted()
    before = state(bnnet)
    w = dd.adapt(bnnet, "eata", lr=0.5, e_margin=1e-6)  # nothing is confident enough
    w(x)
    assert w.last_selected == 0
    assert all(torch.equal(before[k], v) for k, v in bnnet.state_dict().items())
    w.remove()
    free = dd.adapt(copy.deepcopy(bnnet), "eata", lr=0.2, momentum=0.0, e_margin=1.0, d_margin=1.0)
    anchored = dd.adapt(bnnet, "eata", lr=0.2, momentum=0.0, e_margin=1.0, d_margin=1.0,
                        fisher_data=[shifted(seed=5)], fisher_alpha=FISHER_ALPHA)
    assert anchored.fisher is not None and all((f >= 0).all() for f in anchored.fisher.values())
    assert (
        max(float(f.max()) for f in anchored.fisher.values()) * FISHER_ALPHA * 0.2 * 2 < 1
    )  # a stable penalty step
    for _ in range(3):
        free(x), anchored(x)
    drift = {
        name: sum(float((p.detach() - m._source[n]).abs().sum()) for n, p in m.named_adapted())
        for name, m in (("free", free), ("anchored", anchored))
    }
    assert 0 < drift["anchored"] < drift["free"]
    assert free.last_selected == len(
        x
    )  # first batch: no running mean yet; later |cos| < 1 keeps all


def test_cotta_teacher_is_an_ema_and_restore_resets_weights(bnnet):
    x = shifted()
    source = state(bnnet)
    w = dd.adapt(bnnet, "cotta", optimizer="sgd", lr=0.5, ema=0.9, restore_prob=0.0, n_augment=0)
    out = w(x)
    for n, p in w.named_adapted():
        assert torch.allclose(w.teacher[n], 0.9 * source[n] + 0.1 * p.detach(), atol=1e-6)
    w.reset()
    teacher_out = w(
        x
    )  # the first prediction is the teacher's, i.e. the source model with batch statistics
    assert torch.allclose(teacher_out, out, atol=1e-6)
    full = dd.adapt(
        copy.deepcopy(bnnet), "cotta", lr=0.5, restore_prob=1.0, n_augment=2, anchor_threshold=1.1
    )
    full(x)
    assert all(
        torch.equal(p, full._source[n]) for n, p in full.named_adapted()
    )  # everything restored


def test_image_augment_is_seeded_and_keeps_shape():
    x = shifted()
    a = dd.image_augment(x, torch.Generator().manual_seed(3))
    b = dd.image_augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)


def test_lame_makes_neighbours_agree_and_leaves_single_samples():
    from deltatune.deploy.output import knn_affinity, laplacian_adjust

    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.45, 0.55], [0.1, 0.9]])
    assert torch.allclose(
        laplacian_adjust(probs, torch.zeros(4, 4)), probs
    )  # no affinity: unchanged
    feats = torch.tensor([[0.0], [0.1], [0.2], [5.0]])
    w = knn_affinity(feats, 2)
    assert w.tolist()[2] == [1.0, 1.0, 0.0, 0.0]
    z = laplacian_adjust(probs, w)
    assert z[2].argmax() == 0  # pulled to its neighbours' class
    assert torch.allclose(z.sum(-1), torch.ones(4))

    torch.manual_seed(0)
    net = BNNet().eval()
    lame = dd.adapt(net, "lame", knn=3)
    assert lame.layer == "fc"
    x = shifted()
    adjusted = lame(x)
    assert adjusted.shape == (16, 4) and torch.allclose(
        adjusted.exp().sum(-1), torch.ones(16), atol=1e-5
    )
    assert torch.equal(lame(x[:1]), net(x[:1]))


def test_em_recovers_a_shifted_class_prior():
    # two classes, x ~ N(+-1, 1): under a uniform source prior p(y=1|x) = sigmoid(2x),
    # logits (0, 2x)
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(6000, generator=g) < 0.2).long()  # target prior (0.8, 0.2)
    x = torch.randn(6000, generator=g) + torch.where(y == 1, 1.0, -1.0)
    logits = torch.stack([torch.zeros_like(x), 2 * x], -1)
    prior = dd.em_prior(logits.double().softmax(-1), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert abs(float(prior[1]) - 0.2) < 0.02

    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [2.0]]))
        model.bias.zero_()
    em = dd.adapt(model, "em", source_prior=[1, 1], window=4000)
    wrong_before = wrong_after = 0
    for xb, yb in zip(x[:, None].split(500), y.split(500)):
        wrong_before += int((model(xb).argmax(-1) != yb).sum())
        wrong_after += int((em(xb).argmax(-1) != yb).sum())
    assert wrong_after < wrong_before
    assert abs(float(em.prior[1]) - 0.2) < 0.03
    with pytest.raises(dd.DeployError, match="frequency 0"):
        dd.adapt(model, "em", source_prior=[1, 0])


def test_tiny_bert_text_model_keeps_its_output_type():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 64, (4, 10))
    mask = torch.ones_like(ids)
    source = model(input_ids=ids, attention_mask=mask).logits.detach()
    tent = dd.adapt(model, "tent", lr=0.05)
    assert all("LayerNorm" in n for n in tent.param_names)
    out = tent(input_ids=ids, attention_mask=mask)
    assert type(out).__name__ == "SequenceClassifierOutput" and torch.allclose(
        out.logits, source, atol=1e-5
    )
    tent(input_ids=ids, attention_mask=mask)
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, source)
    assert not torch.equal(model.bert.encoder.layer[0].output.LayerNorm.weight, torch.ones(16))
    tent.remove()
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, source, atol=1e-6)
    lame = dd.adapt(model, "lame", knn=2)
    adjusted = lame(input_ids=ids, attention_mask=mask)
    assert type(adjusted).__name__ == "SequenceClassifierOutput" and adjusted.logits.shape == (4, 3)


@pytest.mark.slow
def test_real_mnist_corruptions_bn_and_tent_cut_the_error():
    """Reduced bench: a tiny BatchNorm CNN trained briefly on real MNIST, on real corrupt-tta
    images."""
    pytest.importorskip("corrupt_tta")
    from deltatune.data import load_data
    from deltatune.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small net: one thread is faster than two competing ones
    try:
        _real_mnist_check(load_data, load_model)
    finally:
        torch.set_num_threads(threads)


def _real_mnist_check(load_data, load_model):
    torch.manual_seed(0)
    entry = load_model(
        "small-cnn"
    )  # for its collate (pixel_values in [-1, 1]); the net is smaller, for speed
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(), nn.Linear(32 * 49, 10),
    )
    train = entry.collate(load_data("mnist", "train", limit=6000).examples)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for xb, yb in zip(train["pixel_values"].split(64), train["labels"].split(64)):  # ~100 steps
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    net.eval()
    clean = entry.collate(load_data("mnist", "test", limit=256).examples)
    shifted_set = entry.collate(load_data("mnist-c:contrast:3", "test", limit=256).examples)
    x, xc, labels = clean["pixel_values"], shifted_set["pixel_values"], clean["labels"]

    def error(predict, inputs):
        wrong = sum(
            int((predict(xb).argmax(-1) != yb).sum())
            for xb, yb in zip(inputs.split(64), labels.split(64))
        )
        return 100.0 * wrong / len(labels)

    with torch.no_grad():
        assert error(net, x) < 12
        source = error(net, xc)
    errors = {}
    for method in ("bn", "tent"):
        w = (
            dd.adapt(net, method, optimizer="adam", lr=1e-3)
            if method == "tent"
            else dd.adapt(net, method)
        )
        errors[method] = error(w, xc)
        w.remove()
    assert source > 30 and errors["bn"] < 0.6 * source and errors["tent"] < 0.6 * source, (
        source,
        errors,
    )
    ref = dd.embed(net, x[0::2])
    shifted_p = dd.detect(ref, dd.embed(net, xc[1::2]), "mmd", n_permutations=200).p_value
    clean_p = dd.detect(ref, dd.embed(net, x[1::2]), "mmd", n_permutations=200).p_value
    assert shifted_p < 0.01 < 0.05 < clean_p
