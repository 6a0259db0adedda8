"""Per-input OOD scores (issue 23): each score against a hand computation, detection on real digits
with a small trained model, save/load, `deltatune score`, and the one-line errors."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import deltatune.deploy as dd
from deltatune.cli.app import main
from deltatune.deploy.online import one_thread

pytest.importorskip("scipy")


def _gaussians(n=300, d=6, classes=3, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.eye(classes, d) * 4
    return means[y] + torch.randn(n, d, generator=g) + shift, y


class Tiny(nn.Module):
    def __init__(self, d=64, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained for a few seconds on sklearn's 8x8 digits (real data)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_thread():  # tiny steps: spinning OpenMP threads would cost more than the work
        for _ in range(80):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[train]), y[train]).backward()
            opt.step()
    model.eval()
    # far shift: the same images with their pixels in a fixed random order
    scramble = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    return model, x[train], x[test], x[test][:, scramble]


def test_scores_match_hand_computations():
    f, y = _gaussians()
    z = f[:, :3] * 2.0  # logits of some fixed head
    q_f, _ = _gaussians(n=20, seed=1, shift=1.0)
    q_z = q_f[:, :3] * 2.0
    msp = dd.OODScorer.fit_representations("msp", logits=z).score_representations(logits=q_z)
    assert torch.allclose(msp, -q_z.double().softmax(-1).max(-1).values)
    energy = dd.OODScorer.fit_representations("energy", logits=z, temperature=2.0)
    assert torch.allclose(energy.score_representations(logits=q_z),
                          -2.0 * torch.logsumexp(q_z.double() / 2.0, -1))
    maha = dd.OODScorer.fit_representations("mahalanobis", features=f, labels=y, shrinkage=0.0)
    f64, q64 = f.double(), q_f.double()
    means = torch.stack([f64[y == c].mean(0) for c in range(3)])
    cov = sum((f64[y == c] - means[c]).T @ (f64[y == c] - means[c]) for c in range(3)) / len(f)
    prec = torch.linalg.inv(cov)
    want = torch.stack([torch.einsum("nd,de,ne->n", q64 - m, prec, q64 - m) for m in means]).min(0)
    assert torch.allclose(maha.score_representations(features=q_f), want.values, rtol=1e-6)
    knn = dd.OODScorer.fit_representations("knn", features=f, k=3)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    brute = torch.cdist(unit(q64), unit(f64)).sort(1).values[:, 2]
    assert torch.allclose(knn.score_representations(features=q_f), brute, atol=1e-5)


def test_vim_matches_the_paper_recipe():
    torch.manual_seed(0)
    w, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    f, _ = _gaussians()
    f = f.double()
    z = f @ w.T + b
    scorer = dd.OODScorer.fit_representations("vim", features=f, logits=z, head=(w, b), dim=2)
    o = -torch.linalg.pinv(w) @ b
    vals, vecs = torch.linalg.eigh((f - o).T @ (f - o) / len(f))
    ns = vecs[:, vals.argsort(descending=True)[2:]]
    alpha = z.max(1).values.mean() / ((f - o) @ ns).norm(dim=1).mean()
    q = f[:10] + 3
    qz = q @ w.T + b
    want = alpha * ((q - o) @ ns).norm(dim=1) - torch.logsumexp(qz, -1)
    assert torch.allclose(scorer.score_representations(features=q, logits=qz), want, atol=1e-8)


def test_auroc_agrees_with_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=g).round(), torch.randn(150, generator=g).round() + 0.5
    want = roc_auc_score(np.r_[np.zeros(200), np.ones(150)], np.r_[a.numpy(), b.numpy()])
    assert dd.auroc(a, b) == pytest.approx(want, abs=1e-12)


def test_real_digits_far_shift_is_found_and_scorers_round_trip(digits_model, tmp_path):
    model, train, test, scrambled = digits_model
    aurocs = {}
    for method in dd.SCORES.names():
        scorer = dd.fit_ood(model, train, method)
        s_in, s_out = scorer.score(model, test), scorer.score(model, scrambled)
        aurocs[method] = dd.auroc(s_in, s_out)
        # the threshold is the 95% quantile of the reference: ~5% of fresh in-distribution flagged
        assert 0.0 <= float((s_in > scorer.threshold).double().mean()) <= 0.15
        scorer.save(tmp_path / method)
        again = dd.OODScorer.load(tmp_path / method)
        assert torch.equal(again.score(model, scrambled), s_out)
        assert again.threshold == scorer.threshold
        assert not list(tmp_path.glob(f"{method}/*.pkl"))
    assert aurocs["mahalanobis"] > 0.9 and aurocs["knn"] > 0.9 and aurocs["vim"] > 0.9, aurocs
    one = dd.ood_scores(model, train, scrambled[:5], method="knn", k=5)
    assert one.shape == (5,) and torch.isfinite(one).all()


@pytest.mark.parametrize("method", ["mahalanobis", "vim", "knn"])
def test_thresholds_hold_with_a_reference_barely_wider_than_the_features(method):
    # 120 samples of 40 features: in-sample Gaussians/subspaces fit the reference's noise, so an
    # in-sample threshold would flag a large share of new in-distribution inputs
    g = torch.Generator().manual_seed(0)
    ref, fresh = torch.randn(120, 40, generator=g), torch.randn(2000, 40, generator=g)
    head = (torch.randn(3, 40, generator=g), torch.zeros(3))
    logits = lambda x: x @ head[0].T  # noqa: E731
    scorer = dd.OODScorer.fit_representations(method, features=ref, logits=logits(ref),
                                              head=head)
    flagged = float((scorer.score_representations(fresh, logits(fresh)) > scorer.threshold)
                    .double().mean())
    assert flagged < 0.15, flagged


def test_bad_inputs_are_one_line_errors(digits_model):
    model, train, test, _ = digits_model
    f, y = _gaussians()
    knn = dd.OODScorer.fit_representations("knn", features=f)
    with pytest.raises(dd.DeployError, match="7 columns but the scorer was fitted on 6"):
        knn.score_representations(features=torch.randn(4, 7))
    bad = f[:4].clone()
    bad[1, 2] = math.nan
    with pytest.raises(dd.DeployError, match="NaN or inf values \\(1 of 4 rows\\)"):
        knn.score_representations(features=bad)
    with pytest.raises(dd.DeployError, match="NaN"):
        dd.OODScorer.fit_representations("knn", features=bad)
    with pytest.raises(dd.DeployError, match="not more than k=10"):
        dd.OODScorer.fit_representations("knn", features=f[:10])
    with pytest.raises(dd.DeployError, match="unknown OOD score 'knm'"):
        dd.fit_ood(model, train, "knm")
    with pytest.raises(dd.DeployError, match="no option 'kk'"):
        dd.fit_ood(model, train, "knn", kk=3)
    headless = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(dd.DeployError, match="no nn.Linear head; pass layer="):
        dd.ood_scores(headless, train, test, method="knn")
    assert dd.ood_scores(headless, train, test[:7], method="energy").shape == (7,)
    with pytest.raises(dd.DeployError, match="holds no scorer.json"):
        dd.OODScorer.load(".")


def test_score_cli_fits_saves_and_reloads(tmp_path, capsys):
    rng = np.random.default_rng(0)
    scale = np.array([1, 1, 0.05, 0.05, 0.05])  # the reference lies near a plane, ...
    np.save(tmp_path / "ref.npy", (rng.normal(size=(300, 5)) * scale).astype(np.float32))
    np.save(tmp_path / "far.npy", (rng.normal(size=(100, 5)) * scale[::-1]).astype(np.float32))
    np.save(tmp_path / "wide.npy", rng.normal(size=(10, 6)).astype(np.float32))
    out = tmp_path / "run"
    code = main(["score", "--reference", str(tmp_path / "ref.npy"), "--inputs",
                 str(tmp_path / "far.npy"), "--method", "knn", "--opt", "k=5", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["scorer"]["method"] == "knn" and res["scorer"]["options"]["k"] == 5
    assert res["flagged"] == 100 and res["auroc_vs_reference"] > 0.99
    scores = np.load(out / "scores.npy", allow_pickle=False)
    assert scores.shape == (100,) and (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (out / "scorer").iterdir()} == {"scorer.json", "scorer.safetensors"}
    again = tmp_path / "again"
    assert main(["score", "--scorer", str(out / "scorer"), "--inputs", str(tmp_path / "far.npy"),
                 "--out", str(again)]) == 0
    assert np.allclose(np.load(again / "scores.npy"), scores)
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["score", "--scorer", str(out / "scorer"), "--inputs",
                 str(tmp_path / "wide.npy"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "6 columns but the scorer was fitted on 5" in err
    assert not bad.exists()
    assert main(["score", "--inputs", str(tmp_path / "far.npy"), "--out", str(bad)]) == 2
    assert "--reference" in capsys.readouterr().err
