"""Online drift detectors calibrated to an ERT, the lsdd / cvm / mmd_rff tests, BBSE / RLLS label
shift, `deltatune monitor` (issue 23)."""

import json
import math

import numpy as np
import pytest
import torch

import deltatune.deploy as dd
from deltatune.cli.app import main

pytest.importorskip("scipy")


def _normal(n, d=4, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) + shift


@pytest.fixture(scope="module")
def detectors():
    ref = _normal(1200)
    return {kind: dd.online_detector(kind, ref, ert=150, window=15, n_bootstraps=300)
            for kind in ("mmd", "lsdd")}


@pytest.mark.parametrize("kind", ["mmd", "lsdd"])
def test_update_gives_the_calibrated_statistic(detectors, kind):
    det = detectors[kind]
    det.reset()
    pool = _normal(60, seed=3)
    paths = det._paths(pool, torch.arange(60)[None])[0]
    events = det.update(pool[:30]) + det.update(pool[30:])
    stats = [e["statistic"] for e in events]
    assert stats[:14] == [None] * 14 and [e["t"] for e in events] == list(range(1, 61))
    assert torch.allclose(torch.tensor(stats[14:], dtype=torch.float64), paths, atol=1e-6)
    det.reset()


@pytest.mark.parametrize("kind", ["mmd", "lsdd"])
def test_clean_run_time_matches_the_ert_and_drift_is_caught(detectors, kind):
    det = detectors[kind]
    assert det.calibration["simulated_ert"] == pytest.approx(150, rel=0.02)
    # fresh clean data the calibration never saw: mean run-time near the ERT
    times = det.run_times(_normal(3000, seed=7), n_streams=120, length=1500)
    assert int(torch.isinf(times).sum()) <= 2
    assert 0.7 * 150 < float(times[torch.isfinite(times)].mean()) < 1.3 * 150
    # a mean shift after one clean window: caught within a couple of windows
    delays = det.run_times(_normal(500, shift=1.0, seed=8), n_streams=30, length=200,
                           prefix=_normal(300, seed=9)) - 15
    assert float(delays.median()) < 30


def test_online_bad_input():
    ref = _normal(400)
    with pytest.raises(dd.DeployError, match="ert=40 is not above the window size 50"):
        dd.OnlineMMD(ref, ert=40, window=50)
    with pytest.raises(dd.DeployError, match="the reference has 100 samples; online lsdd with "
                                             "window 50 needs at least 200"):
        dd.OnlineLSDD(ref[:100], ert=500, window=50)
    with pytest.raises(dd.DeployError, match="unknown online detector 'cusum'"):
        dd.online_detector("cusum", ref, ert=100, window=10)
    det = dd.OnlineMMD(ref, ert=100, window=10, n_bootstraps=60)
    with pytest.raises(dd.DeployError, match="the stream has 5 features, the reference 4"):
        det.update(torch.zeros(3, 5))
    bad = torch.zeros(2, 4)
    bad[1, 0] = math.inf
    with pytest.raises(dd.DeployError, match="NaN or inf"):
        det.update(bad)
    with pytest.raises(dd.DeployError, match="NaN or inf"):
        dd.OnlineMMD(torch.cat([ref, bad]), ert=100, window=10)


@pytest.mark.parametrize("test", ["lsdd", "cvm", "mmd_rff"])
def test_offline_tests_hold_their_level_and_find_shifts(test):
    false = sum(dd.detect(_normal(150, seed=s), _normal(100, seed=100 + s), test, seed=s).drift
                for s in range(20))
    assert false <= 3  # alpha 0.05: about 1 of 20 expected
    shifted = dd.detect(_normal(150), _normal(100, shift=0.6, seed=1), test)
    assert shifted.p_value < 0.01


def test_cvm_keeps_its_level_on_features_with_ties():
    relu = lambda t: t.clamp_min(0)  # noqa: E731 - half the values are exactly 0
    flagged = sum(dd.detect(relu(_normal(300, seed=s)), relu(_normal(100, seed=50 + s)), "cvm",
                            seed=s).drift for s in range(20))
    assert flagged <= 3


def test_lsdd_and_cvm_match_direct_computations():
    from scipy.stats import cramervonmises_2samp

    x, y = _normal(80), _normal(60, shift=0.3, seed=2)
    res = dd.detect(x, y, "cvm", correction="bonferroni")
    raw = [cramervonmises_2samp(x[:, j].numpy(), y[:, j].numpy(), method="asymptotic").pvalue
           for j in range(4)]
    assert res.p_value == pytest.approx(min(1.0, 4 * min(raw)))
    c = _normal(5, seed=4)
    model = dd.twosample.LSDDModel(c, sigma=1.3, lam=1e-3)
    h = torch.randn(5, dtype=torch.float64)
    big_h = torch.exp(-torch.cdist(c, c).pow(2) / (4 * 1.3**2))
    theta = torch.linalg.solve(big_h + 1e-3 * torch.eye(5, dtype=torch.float64), h)
    assert float(model.statistic(h)) == pytest.approx(float(2 * h @ theta - theta @ big_h @ theta))


def test_mmd_rff_tests_a_large_reference_and_agrees_with_exact_mmd():
    ref = _normal(30_000, d=8, seed=5)  # bench_drift.py measures 100k (time, memory)
    res = dd.detect(ref, _normal(300, d=8, shift=0.25, seed=6), "mmd_rff", max_samples=None)
    assert res.n_reference == 30_000 and res.p_value < 0.01
    same = dd.detect(ref, _normal(300, d=8, seed=6), "mmd_rff", max_samples=None)
    assert same.p_value > 0.05
    exact = dd.detect(ref, _normal(300, d=8, shift=0.25, seed=6), "mmd", n_permutations=200)
    assert exact.drift


def _label_shift_data(n_val, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n_val,), generator=g)
    logit = lambda lab: 1.5 * torch.nn.functional.one_hot(lab, 3).double() + torch.randn(  # noqa: E731
        len(lab), 3, generator=g, dtype=torch.float64)
    q = torch.tensor([0.7, 0.2, 0.1])
    yt = torch.multinomial(q, 4000, replacement=True, generator=g)
    return logit(y), y, logit(yt), yt, q.double()


def test_label_shift_estimators_recover_the_prior_and_correct_predictions():
    zv, y, zt, yt, q = _label_shift_data(3000)
    base = float((zt.argmax(-1) == yt).double().mean())
    for method in ("bbse", "rlls", "em"):
        est = dd.estimate_label_shift(zv, y, zt, method, calibrate=method == "em")
        assert float((est.prior - q).abs().sum()) < 0.08, (method, est.prior)
        corrected = float((est.correct(zt).argmax(-1) == yt).double().mean())
        assert corrected > base + 0.02, method
        assert json.dumps(est.to_dict())


def test_rlls_shrinks_where_bbse_overreacts():
    # 30 validation samples: BBSE's inverted confusion matrix is noisy, RLLS stays nearer to 1
    errs = {"bbse": [], "rlls": []}
    for seed in range(10):
        zv, y, zt, _, q = _label_shift_data(30, seed=seed)
        for m in errs:
            est = dd.estimate_label_shift(zv, y, zt, m, calibrate=False)
            errs[m].append(float((est.prior - q).abs().sum()))
    assert np.mean(errs["rlls"]) < np.mean(errs["bbse"]), errs


def test_label_shift_bad_input():
    zv, y, zt, _, _ = _label_shift_data(200)
    with pytest.raises(dd.DeployError, match="target logits have 4 classes, the estimate 3"):
        dd.estimate_label_shift(zv, y, torch.zeros(5, 4), "bbse")
    with pytest.raises(dd.DeployError, match="class indices in \\[0, 2\\]"):
        dd.estimate_label_shift(zv, y + 1, zt, "bbse")
    with pytest.raises(dd.DeployError, match="class 2 has no validation sample"):
        dd.estimate_label_shift(zv, y.clamp(max=1), zt, "rlls")
    with pytest.raises(dd.DeployError, match="unknown label-shift estimator 'emm'"):
        dd.estimate_label_shift(zv, y, zt, "emm")


def test_monitor_cli_writes_a_timeline(tmp_path, capsys):
    np.save(tmp_path / "ref.npy", _normal(600).numpy().astype(np.float32))
    np.save(tmp_path / "clean.npy", _normal(150, seed=1).numpy().astype(np.float32))
    np.save(tmp_path / "moved.npy", _normal(150, shift=1.5, seed=2).numpy().astype(np.float32))
    out = tmp_path / "run"
    code = main(["monitor", "--reference", str(tmp_path / "ref.npy"), "--stream",
                 str(tmp_path / "clean.npy"), "--stream", str(tmp_path / "moved.npy"), "--ert",
                 "2000", "--window", "20", "--bootstraps", "100", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["samples"] == 300 and [s["name"] for s in res["segments"]] == [
        str(tmp_path / "clean.npy"), str(tmp_path / "moved.npy")]
    first = res["first_alarm_per_segment"]
    assert first[str(tmp_path / "clean.npy")] is None
    assert 150 < first[str(tmp_path / "moved.npy")] <= 190
    assert len(res["timeline"]["statistic"]) == 300
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["monitor", "--reference", str(tmp_path / "ref.npy"), "--stream",
                 str(tmp_path / "clean.npy"), "--ert", "10", "--window", "20", "--out",
                 str(bad)]) == 2
    assert "--ert 10 is not above --window 20" in capsys.readouterr().err and not bad.exists()
    assert main(["monitor", "--reference", str(tmp_path / "clean.npy"), "--stream",
                 str(tmp_path / "clean.npy"), "--window", "50", "--out", str(bad)]) == 2
    assert "needs at least 200" in capsys.readouterr().err and not bad.exists()


def test_monitor_cli_with_a_model_adapts_on_alarm(tmp_path):
    """The model path: features from a bundled CNN, digits then MNIST, BatchNorm adaptation
    switched on at the first alarm while the detector keeps the unadapted model's features."""
    out = tmp_path / "run"
    code = main(["monitor", "--model", "small-cnn", "--reference", "digits", "--reference-split",
                 "train", "--reference-limit", "400", "--stream", "digits", "--stream", "mnist",
                 "--limit", "100", "--ert", "2000", "--window", "20", "--bootstraps", "100",
                 "--adapt", "bn", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["samples"] == 200 and res["adapt"] == "bn"
    first = res["first_alarm_per_segment"]
    assert first["mnist"] is not None and 100 < first["mnist"] <= 130
    assert any(a.get("adapted_from_here") for a in res["alarms"])
    assert res["running_error"] is not None and res["source_error"] is not None
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
