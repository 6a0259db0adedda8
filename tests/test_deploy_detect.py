"""Shift detection and label-free accuracy estimation: hand-checked statistics, calibrated
behaviour, errors."""

import numpy as np
import pytest
import torch

import deltatune.deploy as dd
from deltatune.deploy.stats import _mmd2_many, rbf_kernel

stats = pytest.importorskip("scipy.stats")


def gauss(n, d=5, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def test_mmd_statistic_matches_the_unbiased_estimator_by_hand():
    x, y = gauss(6, 2, seed=1).double(), gauss(5, 2, 1.0, seed=2).double()
    k, sigma = rbf_kernel(torch.cat([x, y]))
    d = torch.cdist(torch.cat([x, y]), torch.cat([x, y]))
    off = d[~torch.eye(11, dtype=torch.bool)]
    assert sigma == pytest.approx(float(off.median()))  # median heuristic

    def kern(a, b):
        return float(torch.exp(-((a - b) ** 2).sum() / (2 * sigma**2)))

    xx = sum(kern(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(kern(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(kern(a, b) for a in x for b in y) / 30
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[0, :6] = True
    assert float(_mmd2_many(k, mask)[0]) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_mmd_detects_a_mean_shift_and_holds_its_level():
    res = dd.detect(gauss(100), gauss(100, shift=0.5, seed=1), "mmd", n_permutations=200)
    assert res.drift and res.p_value < 0.01 and res.test == "mmd"
    p = np.array(
        [
            dd.detect(
                gauss(40, seed=2 * s), gauss(40, seed=2 * s + 1), "mmd", n_permutations=100, seed=s
            ).p_value
            for s in range(100)
        ]
    )
    assert (p < 0.05).sum() <= 10  # nominal 5 of 100; P(more than 10) < 2% for an exact test
    assert 0.4 < p.mean() < 0.6  # p-values under no shift are roughly uniform


def test_ks_matches_scipy_with_bonferroni_and_bh():
    x, y = gauss(80, 4), gauss(90, 4, seed=1)
    y[:, 2] += 0.8
    res = dd.detect(x, y, "ks")
    raw = stats.ks_2samp(x.double().numpy(), y.double().numpy(), axis=0).pvalue
    assert (
        res.p_value == pytest.approx(min(1.0, raw.min() * 4))
        and res.details["feature"] == 2
        and res.drift
    )
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert dd.adjust_pvalues(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert dd.adjust_pvalues(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert dd.detect(x, y, "ks", correction="bh").p_value <= res.p_value


def test_classifier_test_separates_shifted_samples_only():
    shifted = dd.detect(gauss(200), gauss(200, shift=0.6, seed=1), "classifier")
    same = dd.detect(gauss(200), gauss(200, seed=1), "classifier")
    assert shifted.drift and shifted.statistic > 0.6
    assert not same.drift and 0.35 < same.statistic < 0.65


def test_bbsd_and_label_tests_on_outputs():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 3, generator=g)
    tgt = torch.randn(300, 3, generator=g)
    tgt[:, 0] += 1.5  # class 0 predicted far more often
    assert dd.detect(ref, tgt, "bbsd").drift
    assert not dd.detect(ref, torch.randn(300, 3, generator=g), "bbsd").drift
    probs = ref.softmax(-1)
    assert dd.detect(probs, tgt.softmax(-1), "bbsd").p_value == pytest.approx(
        dd.detect(ref, tgt, "bbsd").p_value
    )
    res = dd.detect(ref, tgt, "label")
    table = np.stack(
        [
            np.bincount(ref.argmax(1).numpy(), minlength=3),
            np.bincount(tgt.argmax(1).numpy(), minlength=3),
        ]
    )
    assert res.p_value == pytest.approx(stats.chi2_contingency(table).pvalue) and res.drift
    labels = torch.tensor([0, 1, 2] * 20)
    assert not dd.detect(labels, labels.flip(0), "label").drift  # 1-column class indices


def test_detect_with_a_model_uses_penultimate_features(cnn):
    g = torch.Generator().manual_seed(0)
    clean, noisy = torch.rand(64, 3, 8, 8, generator=g), torch.rand(64, 3, 8, 8, generator=g) * 3
    feats = dd.embed(cnn, clean, batch_size=16)
    assert feats.shape == (64, 12)  # the input of the head
    assert dd.detect(clean, noisy, "mmd", model=cnn, batch_size=16).drift
    assert dd.detect(clean, noisy, "bbsd", model=cnn).n_target == 64
    batches = [
        (clean[i : i + 16], torch.zeros(16)) for i in range(0, 64, 16)
    ]  # DataLoader-style (x, y)
    assert torch.allclose(dd.embed(cnn, batches), feats)


def test_drift_monitor_flags_windows_after_the_shift():
    mon = dd.DriftMonitor(gauss(300), "mmd", window=100, n_permutations=100)
    stream = torch.cat([gauss(300, seed=1), gauss(300, shift=0.7, seed=2)])
    results = []
    for i in range(0, 600, 50):
        results += mon.update(stream[i : i + 50])
    assert [h["position"] for h in mon.history] == [100, 200, 300, 400, 500, 600]
    assert [h["drift"] for h in mon.history][-3:] == [True, True, True]
    assert sum(h["drift"] for h in mon.history[:3]) <= 1
    sliding = dd.DriftMonitor(gauss(300), "ks", window=100, stride=25)
    sliding.update(gauss(150, seed=3))
    assert [h["position"] for h in sliding.history] == [100, 125, 150]


def test_detect_rejects_bad_input():
    with pytest.raises(dd.DeployError, match="NaN"):
        dd.detect(gauss(10), torch.full((10, 5), float("nan")))
    with pytest.raises(dd.DeployError, match="5 features but target has 4"):
        dd.detect(gauss(10), gauss(10, 4))
    with pytest.raises(dd.DeployError, match="at least 2 per side"):
        dd.detect(gauss(10), gauss(1))
    with pytest.raises(dd.DeployError, match="did you mean 'mmd'"):
        dd.detect(gauss(10), gauss(10), "mdm")
    with pytest.raises(dd.DeployError, match="has no option 'permutations'"):
        dd.detect(gauss(10), gauss(10), "mmd", permutations=3)
    with pytest.raises(dd.DeployError, match="alpha"):
        dd.detect(gauss(10), gauss(10), alpha=5)
    with pytest.raises(dd.DeployError, match="has no option"):
        dd.DriftMonitor(gauss(10), "ks", n_permutations=10)


def calibrated(n, scale, seed):
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g) * scale
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(-1)
    return z, y


def test_temperature_scaling_recovers_an_overconfidence_factor():
    z, y = calibrated(4000, 2.0, 0)
    assert dd.fit_temperature(z * 3, y) == pytest.approx(3.0, rel=0.1)
    assert dd.fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)


def mixture(n, easy, seed):
    """A calibrated model on a mix of easy (confident) and hard samples; ``easy`` is the easy
    fraction."""
    ze, ye = calibrated(int(n * easy), 4.0, seed)
    zh, yh = calibrated(n - int(n * easy), 1.0, seed + 100)
    return torch.cat([ze, zh]), torch.cat([ye, yh])


def test_atc_doc_and_confidence_estimates():
    z, y = mixture(4000, 0.6, 1)
    est = dd.fit_accuracy_estimator(z * 2, y)  # overconfident by 2: temperature scaling fixes it
    assert est.temperature == pytest.approx(2.0, rel=0.1)
    acc = float((z.argmax(-1) == y).double().mean())
    on_source = est.estimate(z * 2)
    assert on_source["atc"] == pytest.approx(acc, abs=1e-3) and on_source["doc"] == pytest.approx(
        acc, abs=1e-9
    )
    same = mixture(4000, 0.6, 7)
    true_same = float((same[0].argmax(-1) == same[1]).double().mean())
    assert est.estimate(same[0] * 2)["atc"] == pytest.approx(true_same, abs=0.02)
    hard = mixture(4000, 0.2, 9)  # more hard samples: lower accuracy
    true_hard = float((hard[0].argmax(-1) == hard[1]).double().mean())
    on_hard = est.estimate(hard[0] * 2)
    assert true_hard < true_same - 0.05 and on_hard["atc"] < true_same - 0.05
    assert on_hard["confidence"] == pytest.approx(
        true_hard, abs=0.03
    )  # calibrated: confidence is exact
    assert set(est.to_dict()) == {
        "temperature",
        "threshold",
        "score",
        "source_accuracy",
        "source_confidence",
        "source_prior",
    }
    assert sum(est.source_prior) == pytest.approx(1.0) and len(est.source_prior) == 5


def test_cot_sees_a_confident_collapse_that_atc_cannot():
    pytest.importorskip("ot")
    z, y = mixture(4000, 0.6, 1)
    est = dd.fit_accuracy_estimator(z, y)
    # a target set with the source's (balanced) labels that the model maps to class 0 with
    # confidence ~1
    g = torch.Generator().manual_seed(3)
    collapsed = torch.randn(2000, 5, generator=g)
    collapsed[:, 0] += 12.0
    labels = torch.arange(2000) % 5
    true = float((collapsed.argmax(-1) == labels).double().mean())
    got = est.estimate(collapsed)
    assert true == pytest.approx(0.2, abs=0.01)
    assert (
        got["atc"] > 0.95 and got["confidence"] > 0.95
    )  # every confidence-based estimate is fooled
    # COT must send 80% of the mass to classes 1-4, whose probabilities are ~0: about 20% accuracy
    assert got["cot"] == pytest.approx(true, abs=0.02)
    # predictions that follow the source prior: the transport keeps every sample on its own argmax,
    # so COT equals the average confidence
    same = mixture(4000, 0.6, 7)[0]
    est_uniform = dd.fit_accuracy_estimator(
        z, y, prior=torch.bincount(same.argmax(-1), minlength=5)
    )
    both = est_uniform.estimate(same, methods=("confidence", "cot"))
    assert set(both) == {"confidence", "cot"} and both["cot"] == pytest.approx(
        both["confidence"], abs=1e-9
    )
    assert set(est_uniform.estimate(same, methods="cot")) == {"cot"}  # one name as a plain string


def test_cot_transport_cost_matches_a_linear_program():
    pytest.importorskip("ot")
    from scipy.optimize import linprog

    from deltatune.deploy.accuracy import transport_cost

    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(37, 4, generator=g) * 2).softmax(-1).double()
    prior = [0.1, 0.2, 0.3, 0.4]
    n, k = probs.shape
    a_eq = np.vstack([np.kron(np.eye(n), np.ones(k)), np.kron(np.ones(n), np.eye(k))])
    b_eq = np.concatenate([np.full(n, 1 / n), prior])
    lp = linprog(
        (1 - probs.numpy()).ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs"
    )
    assert lp.status == 0
    assert transport_cost(probs, prior) == pytest.approx(lp.fun, abs=1e-9)


def test_accuracy_estimation_rejects_bad_input():
    with pytest.raises(dd.DeployError, match="one label per row"):
        dd.fit_accuracy_estimator(torch.randn(5, 3), torch.zeros(4))
    with pytest.raises(dd.DeployError, match="class indices"):
        dd.fit_accuracy_estimator(torch.randn(5, 3), torch.full((5,), 7))
    with pytest.raises(dd.DeployError, match="shape \\(samples, classes >= 2\\)"):
        dd.fit_temperature(torch.randn(5), torch.zeros(5))
    z, y = mixture(200, 0.6, 1)
    with pytest.raises(dd.DeployError, match="prior must be 5 non-negative class frequencies"):
        dd.fit_accuracy_estimator(z, y, prior=[1, 2, 3])
    with pytest.raises(dd.DeployError, match="prior must be 5 non-negative"):
        dd.fit_accuracy_estimator(z, y, prior=[1, -1, 1, 1, 1])
    est = dd.fit_accuracy_estimator(z, y)
    with pytest.raises(
        dd.DeployError,
        match="unknown accuracy estimate 'coat'; choose from confidence, atc, doc, cot",
    ):
        est.estimate(z, methods=("atc", "coat"))
    with pytest.raises(dd.DeployError, match="fitted for 5 classes, the logits have 3"):
        est.estimate(torch.randn(4, 3))
    with pytest.raises(dd.DeployError, match="NaN or inf"):
        est.estimate(torch.full((4, 5), float("nan")))
