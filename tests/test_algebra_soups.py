"""Soups, WiSE-FT, learned merging, and the data statistics behind Fisher merging and RegMean."""

import pytest
import torch
from conftest import MLP

from deltatune import algebra as alg
from deltatune.algebra.errors import MergeError


def _states(n, seed=0):
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append(MLP().state_dict())
    return out


def test_uniform_soup_and_wise_ft_endpoints():
    a, b = _states(2)
    soup = alg.uniform_soup([a, b])
    assert all(torch.allclose(soup[k], (a[k] + b[k]) / 2) for k in a)
    assert all(torch.allclose(alg.wise_ft(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.allclose(alg.wise_ft(a, b, 1.0)[k], b[k]) for k in a)
    assert all(
        torch.allclose(alg.wise_ft(a, b, 0.25)[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6) for k in a
    )
    with pytest.raises(MergeError, match=r"alpha must be in \[0, 1\]"):
        alg.wise_ft(a, b, 1.5)


def test_greedy_soup_keeps_only_ingredients_that_help():
    target = _states(1, seed=10)[0]
    good = [{k: v + 0.05 * torch.randn(v.shape) for k, v in target.items()} for _ in range(3)]
    bad = {k: v + 5.0 for k, v in target.items()}

    def score(state):  # closer to the target is better
        return -sum(float((state[k] - target[k]).pow(2).sum()) for k in target)

    result = alg.greedy_soup([bad, *good], score)
    assert 0 not in result.ingredients and len(result.ingredients) == 3
    assert result.score >= max(result.individual)
    assert [kept for _, _, kept in result.history].count(False) == 1


def test_wise_ft_sweep_and_plot(tmp_path):
    a, b = _states(2)

    def evaluate(state):
        d = float(sum((state[k] - a[k]).abs().sum() for k in a))
        return {"id": d, "shift": -d}

    rows = alg.wise_ft_sweep(a, b, evaluate, alphas=[0.0, 0.5, 1.0])
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and rows[0]["id"] == 0.0
    assert rows[1]["id"] == pytest.approx(rows[2]["id"] / 2, rel=1e-5)
    path = alg.plot_wise_ft(rows, tmp_path / "wise.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MergeError, match="needs 'id' and 'shift'"):
        alg.plot_wise_ft([{"alpha": 0.0}], tmp_path / "x.png")


def test_loaded_swaps_state_and_restores(mlp):
    x = torch.randn(3, 8)
    y0 = mlp(x)
    other = _states(1, seed=5)[0]
    with alg.loaded(mlp, other):
        assert not torch.allclose(mlp(x), y0)
    assert torch.equal(mlp(x), y0)


def test_learned_merging_lowers_entropy_on_target_data(mlp):
    torch.manual_seed(0)
    base = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    # task vector 0 sharpens the head (confident predictions), task vector 1 is noise
    sharpen = {"head.weight": base["head.weight"] * 4.0, "head.bias": torch.zeros(3)}
    noise = {n: torch.randn(p.shape) * 0.01 for n, p in base.items()}
    batches = [torch.randn(32, 8) for _ in range(4)]
    result = alg.learn_merge_coefficients(
        mlp, [sharpen, noise], batches, granularity="global", steps=20, lr=0.1, init=0.1
    )
    assert result.coefficients.shape == (2, 1) and result.groups == ["all"]
    assert result.coefficients[0, 0] > 0.5 and result.losses[-1] < result.losses[0]
    assert torch.allclose(
        result.state["head.weight"],
        base["head.weight"] * (1 + 4 * result.coefficients[0, 0])
        + result.coefficients[1, 0] * noise["head.weight"],
        atol=1e-5,
    )
    assert all(
        torch.equal(p, base[n]) for n, p in mlp.named_parameters()
    )  # the model itself is untouched
    per_tensor = alg.learn_merge_coefficients(mlp, [noise], batches, granularity="tensor", steps=1)
    assert per_tensor.coefficients.shape == (1, len(base))
    assert alg.block_of("encoder.layer.3.attention.self.query.weight") == "layer.3"


def test_diagonal_fisher_matches_per_example_gradients(mlp):
    x = torch.randn(5, 8)
    labels = torch.tensor([0, 1, 2, 0, 1])
    fisher = alg.diagonal_fisher(mlp, [(x, labels)], labels=lambda b: b[1])
    ref = torch.zeros_like(mlp.head.weight)
    for i in range(5):
        mlp.zero_grad()
        for p in mlp.parameters():
            p.requires_grad_(True)
        torch.log_softmax(mlp(x[i:i + 1]), -1)[0, labels[i]].backward()
        ref += mlp.head.weight.grad ** 2
    assert set(fisher) == {n for n, _ in mlp.named_parameters()}
    assert torch.allclose(fisher["head.weight"], ref / 5, atol=1e-6)
    sampled = alg.diagonal_fisher(mlp, [x], params=["head.weight"], max_samples=3)
    assert set(sampled) == {"head.weight"} and (sampled["head.weight"] >= 0).all()


def test_gram_matrices_and_regmean_merge_of_state_dicts(mlp):
    x = torch.randn(20, 8)
    grams = alg.gram_matrices(mlp, [x[:10], x[10:]])
    assert set(grams) == {"fc1.weight", "fc2.weight", "head.weight"}
    assert torch.allclose(grams["fc1.weight"], x.T @ x / 20, atol=1e-5)
    a, b = _states(2)
    merged = alg.merge_state_dicts("regmean", [a, b], stats=[grams, grams], alpha=1.0)
    assert torch.allclose(merged["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / 2, atol=1e-4)
    assert torch.allclose(
        merged["fc1.bias"], (a["fc1.bias"] + b["fc1.bias"]) / 2
    )  # no Gram: averaged
