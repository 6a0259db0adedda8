"""Deployment tools on a transformers text classifier fed dict batches (as ``entry.collate`` makes
them).

A tiny BERT (2 layers, hidden 32) with deltatune's mean-pooling head stands in for MiniLM: the same
module names (``LayerNorm``, ``query``/``value``, ``classifier``) and the same call,
``model(input_ids=..., attention_mask=..., labels=...)``.
"""

import math

import pytest
import torch
from torch import nn

import deltatune as dt
import deltatune.deploy as dd

transformers = pytest.importorskip("transformers")

from deltatune.models.text import MeanPoolClassifier  # noqa: E402

VOCAB = 64


@pytest.fixture
def textnet() -> MeanPoolClassifier:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return MeanPoolClassifier(transformers.BertModel(cfg), 3).eval()


def text_batch(
    n: int = 16, low: int = 1, high: int = VOCAB, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Token ids in [low, high), right padding of random length, labels included (as collate makes
    them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_entropy(logits: torch.Tensor) -> float:
    return float(dd.softmax_entropy(logits).mean())


def test_ln_tent_changes_only_layernorm_affine_and_lowers_entropy(textnet):
    batch = text_batch(seed=1, low=32)  # tokens from one half of the vocabulary: a shifted batch
    before = state(textnet)
    with torch.no_grad():
        source = textnet(**batch)
    tent = dd.adapt(textnet, "tent", optimizer="adam", lr=1e-2)
    assert tent.param_names and all("LayerNorm" in n for n in tent.param_names)
    assert len(tent.param_names) == 2 * (
        1 + 2 * 2
    )  # weight+bias of the embedding LN and 2 per layer
    first = tent(**batch)  # labels in the batch are ignored: nothing supervised happens
    assert torch.allclose(first, source, atol=1e-5)  # the prediction comes before the first update
    for _ in range(5):
        tent(**batch)
    with torch.no_grad():
        adapted = textnet(**batch)
    assert mean_entropy(adapted) < mean_entropy(source) - 1e-3
    changed = {k for k, v in textnet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(tent.param_names)
    assert all(".LayerNorm." in k for k in changed)


@pytest.mark.parametrize("method", ["tent", "eata", "sar", "cotta"])
def test_reset_and_remove_restore_the_text_model_exactly(textnet, method):
    fisher = [text_batch(8, seed=s) for s in (10, 11)]
    options = {
        "tent": {"optimizer": "adam", "lr": 1e-2},
        "eata": {"lr": 1e-2, "d_margin": 1.0, "e_margin": 1.0, "fisher_data": fisher},
        "sar": {"lr": 0.1, "e_margin": 1.0},
        "cotta": {"lr": 1e-2, "n_augment": 4},
    }[method]
    flags = {n: p.requires_grad for n, p in textnet.named_parameters()}
    before = state(textnet)
    batch = text_batch(seed=2, low=32)
    with torch.no_grad():
        source = textnet(**batch)
    w = dd.adapt(textnet, method, **options)
    for s in range(3):
        w(**text_batch(seed=3 + s, low=32))
    assert any(not torch.equal(v, before[k]) for k, v in textnet.state_dict().items()), (
        "nothing was adapted"
    )
    w.reset()
    assert all(torch.equal(v, before[k]) for k, v in textnet.state_dict().items())
    if method != "cotta":  # cotta returns its teacher, which equals the source right after reset
        assert torch.equal(w(**batch), source)
    w.remove()
    assert all(torch.equal(v, before[k]) for k, v in textnet.state_dict().items())
    assert {n: p.requires_grad for n, p in textnet.named_parameters()} == flags
    assert not textnet.training


def test_eata_fisher_from_dict_batches_covers_only_layernorm(textnet):
    fisher = [text_batch(8, seed=s) for s in (20, 21, 22)]
    w = dd.adapt(textnet, "eata", fisher_data=fisher)
    assert set(w.fisher) == set(w.param_names) and all("LayerNorm" in n for n in w.fisher)
    assert sum(float(f.sum()) for f in w.fisher.values()) > 0
    w.remove()


def test_tent_on_a_lora_delta_of_the_text_model(textnet):
    torch.manual_seed(1)
    dt.attach(textnet, dt.LoRA(r=2, targets=["query", "value"]), name="tta")
    before = state(textnet)
    batch = text_batch(seed=4, low=32)
    with torch.no_grad():
        source = textnet(**batch)
    w = dd.adapt(textnet, "tent", delta="tta", optimizer="adam", lr=1e-2)
    assert w.param_names and all(".deltas.tta." in n for n in w.param_names)
    for _ in range(4):
        w(**batch)
    changed = {k for k, v in textnet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".deltas.tta." in k for k in changed)
    with torch.no_grad():
        assert mean_entropy(textnet(**batch)) < mean_entropy(source)
    w.remove()
    with torch.no_grad():
        assert torch.equal(textnet(**batch), source)


def test_embed_and_detect_take_dict_batches_with_labels(textnet):
    clean = [text_batch(32, seed=s) for s in range(4)]
    clean_too = [text_batch(32, seed=s) for s in range(100, 104)]
    shifted_set = [text_batch(32, seed=s, low=40) for s in range(20, 24)]
    feats = dd.embed(textnet, clean)
    assert feats.shape == (128, 32)
    with torch.no_grad():  # the classifier's input is the masked mean of the last hidden states
        b = clean[0]
        hidden = textnet.encoder(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).last_hidden_state
        m = b["attention_mask"][..., None].float()
        assert torch.allclose(feats[:32], (hidden * m).sum(1) / m.sum(1), atol=1e-5)
        assert torch.allclose(textnet.classifier(feats[:32]), textnet(**b), atol=1e-5)
    shifted_p = dd.detect(clean, shifted_set, "mmd", model=textnet, n_permutations=200).p_value
    clean_p = dd.detect(clean, clean_too, "mmd", model=textnet, n_permutations=200).p_value
    assert shifted_p == pytest.approx(1 / 201)  # no permutation reaches the observed statistic
    assert (
        clean_p > 0.02
    )  # (the calibration of the null itself is checked in test_deploy_detect.py)
    probs = dd.embed(textnet, clean, outputs=True)
    assert probs.shape == (128, 3) and torch.allclose(probs.sum(-1), torch.ones(128), atol=1e-5)


def test_lame_on_the_text_model_uses_the_pooled_features(textnet):
    lame = dd.adapt(textnet, "lame", knn=3)
    assert lame.layer == "classifier"
    batch = text_batch(24, seed=5)
    with torch.no_grad():
        source = textnet(**batch)
    out = lame(**batch)
    assert out.shape == source.shape and not torch.allclose(out, source)
    assert torch.allclose(out.exp().sum(-1), torch.ones(24), atol=1e-4)  # log-probabilities
    single = {k: v[:1] for k, v in batch.items()}
    assert torch.allclose(lame(**single), source[:1], atol=1e-6)  # no neighbours: unchanged
    lame.remove()


def gaussian_posteriors(prior: list[float], source_prior: list[float], n: int, seed: int = 0):
    """Samples x ~ N(mu_y, I) in 2-d with y ~ ``prior``, and the exact log-posteriors under
    ``source_prior``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=torch.float64)
    y = torch.multinomial(
        torch.tensor(prior, dtype=torch.float64), n, replacement=True, generator=g
    )
    x = mu[y] + torch.randn(n, 2, generator=g, dtype=torch.float64)
    logits = (
        x @ mu.T - 0.5 * (mu**2).sum(-1) + torch.tensor(source_prior, dtype=torch.float64).log()
    )
    return x, y, logits, mu


def test_em_prior_recovers_a_known_three_class_prior():
    target, source = [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]  # the airlines -> cars kind of shift
    _, _, logits, _ = gaussian_posteriors(target, source, 8000)
    est = dd.em_prior(logits.softmax(-1), torch.tensor(source, dtype=torch.float64))
    assert torch.allclose(est, torch.tensor(target, dtype=torch.float64), atol=0.02), est
    naive = logits.softmax(-1).mean(0)  # the source model's mean posterior is far from the truth
    assert (naive - torch.tensor(target, dtype=torch.float64)).abs().max() > 0.1


def test_em_wrapper_streams_batches_and_cuts_the_error():
    target, source = [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]
    x, y, _, mu = gaussian_posteriors(target, source, 4000, seed=1)
    model = nn.Linear(2, 3).double()
    with torch.no_grad():  # exactly the source-prior posterior of the generating model
        model.weight.copy_(mu)
        model.bias.copy_(-0.5 * (mu**2).sum(-1) + torch.tensor(source, dtype=torch.float64).log())
    em = dd.adapt(model, "em", source_prior=[6, 2, 2], window=4000)
    before = after = 0
    for xb, yb in zip(x.split(64), y.split(64)):
        with torch.no_grad():
            before += int((model(xb).argmax(-1) != yb).sum())
        after += int((em(xb).argmax(-1) != yb).sum())
    assert after < 0.8 * before, (before, after)
    assert torch.allclose(em.prior, torch.tensor(target, dtype=torch.float64), atol=0.03), em.prior
    em.reset()
    assert em.prior is None and em.buffer is None
    em.remove()


def test_em_with_the_wrong_temperature_misestimates_the_prior():
    """Why the benchmark calibrates first: over-confident posteriors (T < 1 applied wrongly) bias
    EM."""
    target, source = [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]
    _, _, logits, _ = gaussian_posteriors(target, source, 6000, seed=2)
    good = dd.em_prior(logits.softmax(-1), torch.tensor(source, dtype=torch.float64))
    bad = dd.em_prior(
        (logits * 0.3).softmax(-1), torch.tensor(source, dtype=torch.float64)
    )  # under-confident
    truth = torch.tensor(target, dtype=torch.float64)
    assert (good - truth).abs().max() < 0.02 < (bad - truth).abs().max()
    assert math.isclose(float(good.sum()), 1.0, abs_tol=1e-9)


def _generating_model(source: list[float]) -> nn.Linear:
    _, _, _, mu = gaussian_posteriors(source, source, 1)
    model = nn.Linear(2, 3).double()
    with torch.no_grad():  # exactly the source-prior posterior of the generating model
        model.weight.copy_(mu)
        model.bias.copy_(-0.5 * (mu**2).sum(-1) + torch.tensor(source, dtype=torch.float64).log())
    return model


def test_prior_shift_test_is_calibrated_on_unshifted_data_and_finds_a_real_shift():
    """The likelihood-ratio test behind EM's gate: on data drawn from the source prior its p-value
    is roughly uniform (about 5% of draws below 0.05), a real shift gives p near 0."""
    source = [0.6, 0.2, 0.2]
    ps = torch.tensor(source, dtype=torch.float64)
    pvalues = []
    for seed in range(200):
        _, _, logits, _ = gaussian_posteriors(source, source, 256, seed=seed)
        probs = logits.softmax(-1)
        pvalues.append(dd.prior_shift_pvalue(probs, ps, dd.em_prior(probs, ps)))
    below = sum(p < 0.05 for p in pvalues) / len(pvalues)
    assert 0.01 <= below <= 0.10, below
    _, _, logits, _ = gaussian_posteriors([0.2, 0.6, 0.2], source, 256, seed=0)
    probs = logits.softmax(-1)
    assert dd.prior_shift_pvalue(probs, ps, dd.em_prior(probs, ps)) < 1e-6


def test_em_keeps_the_source_prior_without_evidence_of_a_shift():
    source = [0.6, 0.2, 0.2]
    model = _generating_model(source)
    x, _, _, _ = gaussian_posteriors(source, source, 64, seed=3)
    gated = dd.adapt(model, "em", source_prior=source)
    always = dd.adapt(_generating_model(source), "em", source_prior=source, shift_alpha=0)
    out_gated, out_always = gated(x), always(x)
    assert gated.shift_p > 0.01
    assert torch.equal(gated.prior, torch.tensor(source, dtype=torch.float64))
    with torch.no_grad():  # no correction: the source model's own predictions
        expected = model(x).log_softmax(-1)
    assert torch.allclose(out_gated, expected, atol=1e-9)
    assert not torch.equal(always.prior, gated.prior)  # EM's estimate is sampling noise here
    assert out_always.shape == out_gated.shape
    gated.remove()
    always.remove()


@pytest.mark.parametrize("method", ["em", "safe"])
@pytest.mark.parametrize("alpha", [-0.1, 1.0, 2.0])
def test_a_bad_shift_alpha_is_one_line(method: str, alpha: float):
    with pytest.raises(dd.DeployError, match="shift_alpha=.*significance level"):
        dd.adapt(nn.Linear(2, 3), method, shift_alpha=alpha)
