"""Merge methods on small hand-checkable tensors, their invariants, and chunked == whole-tensor."""

import math

import pytest
import torch

from deltatune import algebra as alg
from deltatune.algebra import tensors
from deltatune.algebra.errors import MergeConfigError, MergeError


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_registry_lists_methods_with_papers():
    methods = alg.merge_methods()
    for name in (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "slerp",
        "model_stock",
        "fisher",
        "regmean",
        "della",
    ):
        assert name in methods and methods[name].paper.startswith("https://")
    assert methods["ties"].needs_base and not methods["linear"].needs_base
    with pytest.raises(MergeConfigError, match="unknown merge method 'tie'"):
        alg.get_method("tie")
    with pytest.raises(MergeConfigError, match="has no parameter 'densty'"):
        methods["ties"].resolve([{"densty": 0.5}], {})
    with pytest.raises(MergeConfigError, match="must be a float"):
        methods["ties"].resolve([{"density": "half"}], {})
    assert methods["ties"].resolve([{"density": "0.5"}], {"normalize": "false"}) == {
        "weight": [1.0],
        "density": [0.5],
        "normalize": False,
        "rescale": False,
        "lambda_": 1.0,
        "int8_mask": False,
    }


def test_task_arithmetic_by_hand():
    base = t(1, 2, 3)
    out = alg.task_arithmetic(base, [t(2, 2, 3), t(1, 0, 5)], weight=[1.0, 0.5], lambda_=2.0)
    # base + 2·(1·[1,0,0] + 0.5·[0,-2,2]) = [3, 0, 5]
    assert torch.equal(out, t(3, 0, 5))
    normalized = alg.task_arithmetic(
        base, [t(2, 2, 3), t(1, 0, 5)], weight=[1.0, 0.5], normalize=True
    )
    assert torch.allclose(normalized, base + (t(1, 0, 0) + 0.5 * t(0, -2, 2)) / 1.5)


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = torch.zeros(4)
    m1, m2 = t(3, -1, 0.5, 2), t(-2, -2, 1, 0.1)
    out = alg.ties(base, [m1, m2], weight=[1.0, 1.0], density=[0.5, 0.5])
    # trimmed: [3,0,0,2] and [-2,-2,0,0]; elected signs of the sums [1,-2,0,2]: +,-,+,+;
    # entry 0 keeps only 3, entry 1 only -2, entry 2 nothing, entry 3 only 2 (each divided by 1)
    assert torch.equal(out, t(3, -2, 0, 2))
    # density 1, agreeing signs, normalize: plain mean of the task vectors
    assert torch.allclose(
        alg.ties(torch.zeros(2), [t(1, 2), t(3, 4)], weight=[1.0, 1.0], density=[1.0, 1.0]), t(2, 3)
    )


def test_elect_signs_sum_and_count():
    stacked = torch.stack([t(3, -1, 0), t(-1, -1, 0), t(-1, 5, 0)])
    assert torch.equal(
        alg.elect_signs(stacked, "sum"),
        torch.tensor([[True, False, False], [False, False, False], [False, True, False]]),
    )
    # count: two of three negative in column 0 → negatives agree; column 1 too
    assert torch.equal(
        alg.elect_signs(stacked, "count")[:, :2],
        torch.tensor([[False, True], [True, True], [True, False]]),
    )
    merged = alg.generalized_task_arithmetic(
        torch.zeros(3), list(stacked), weight=[1.0] * 3, consensus="count", normalize=True
    )
    assert torch.equal(merged, t(-1, -1, 0))
    merged = alg.generalized_task_arithmetic(
        torch.zeros(3), list(stacked), weight=[1.0] * 3, consensus="sum", normalize=True
    )
    assert torch.equal(merged, t(3, 5, 0))


def test_breadcrumbs_drops_smallest_and_outliers():
    base = torch.zeros(10)
    m = torch.arange(1.0, 11.0)
    out = alg.breadcrumbs(base, [m], weight=[1.0], density=[0.5], gamma=[0.2])
    # keep 5 of 10: drop the 2 largest (gamma 0.2) and the 3 smallest → 4..8 survive
    assert torch.equal(out, torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0]))


def test_dare_drops_and_rescales_reproducibly():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 50, generator=g)
    ft = base + torch.randn(200, 50, generator=g)
    tau = ft - base
    out = alg.dare_linear(base, [ft], weight=[1.0], density=[0.3], seed=7)
    kept = (out - base) != 0
    assert 0.27 < kept.float().mean() < 0.33
    assert torch.isclose((out - base).abs().sum(), tau.abs().sum(), rtol=1e-4)  # L1 kept (rescale)
    assert torch.allclose(
        (out - base)[kept] / tau[kept],
        torch.full((int(kept.sum()),), float((out - base).abs().sum() / tau[kept].abs().sum())),
        rtol=1e-3,
    )
    assert torch.equal(out, alg.dare_linear(base, [ft], weight=[1.0], density=[0.3], seed=7))
    assert not torch.equal(out, alg.dare_linear(base, [ft], weight=[1.0], density=[0.3], seed=8))
    assert torch.allclose(
        alg.dare_ties(base, [ft, ft], weight=[1.0, 1.0], density=[1.0, 1.0], normalize=True), ft
    )


def test_slerp_geometry():
    e0, e1 = t(1, 0), t(0, 1)
    assert torch.allclose(alg.slerp(e0, [e1], t=0.0), e0)
    assert torch.allclose(alg.slerp(e0, [e1], t=1.0), e1)
    mid = alg.slerp(e0, [e1], t=0.5)
    assert torch.allclose(mid, t(1, 1) / math.sqrt(2)) and math.isclose(
        float(mid.norm()), 1.0, rel_tol=1e-6
    )
    # nearly collinear: linear interpolation
    assert torch.allclose(alg.slerp(t(1, 0), [t(2, 0)], t=0.25), t(1.25, 0))


def test_model_stock_ratio():
    base = torch.zeros(2)
    # orthogonal task vectors: cos = 0 → t = 0 → the base
    assert torch.allclose(alg.model_stock(base, [t(1, 0), t(0, 1)]), base)
    # identical task vectors: cos = 1 → t = 1 → their average
    assert torch.allclose(alg.model_stock(base, [t(1, 1), t(1, 1)]), t(1, 1))
    # cos = 0.5 for two models: t = 2·0.5 / 1.5 = 2/3
    a, b = t(1, 0), t(0.5, math.sqrt(3) / 2)
    assert torch.allclose(alg.model_stock(base, [a, b]), (a + b) / 2 * (2 / 3), atol=1e-6)
    rows = alg.model_stock(
        torch.zeros(2, 2), [torch.stack([a, t(1, 1)]), torch.stack([b, t(1, 1)])], filter_wise=True
    )
    assert torch.allclose(rows, torch.stack([(a + b) / 3, t(1, 1)]), atol=1e-6)


def test_linear_and_fisher_weighting():
    a, b = t(0, 10), t(4, 20)
    assert torch.allclose(alg.linear(None, [a, b], weight=[3.0, 1.0]), t(1, 12.5))
    assert torch.allclose(alg.linear(None, [a, b], weight=[0.5, 0.5], normalize=False), t(2, 15))
    # Fisher: model a is certain about entry 0, model b about entry 1
    fa, fb = t(1e6, 0), t(0, 1e6)
    merged = alg.fisher(None, [a, b], weight=[1.0, 1.0], stats=[fa, fb])
    assert torch.allclose(merged, t(0, 20), atol=1e-3)
    assert torch.allclose(alg.fisher(None, [a, b], weight=[1.0, 1.0]), t(2, 15))


def test_regmean_is_the_least_squares_merge():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 6, generator=g) for _ in range(2)]
    ws = [torch.randn(3, 6, generator=g) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    merged = alg.regmean(None, ws, weight=[1.0, 1.0], stats=grams, alpha=1.0)
    # argmin_W Σ_k ||X_k Wᵀ − X_k W_kᵀ||²
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    ref = torch.linalg.lstsq(x_all.double(), y_all.double()).solution.T.float()
    assert torch.allclose(merged, ref, atol=1e-4)
    # same inputs for both models: RegMean is the plain average
    same = alg.regmean(None, ws, weight=[1.0, 1.0], stats=[grams[0], grams[0]], alpha=1.0)
    assert torch.allclose(same, (ws[0] + ws[1]) / 2, atol=1e-5)
    with pytest.raises(MergeError, match="does not fit"):
        alg.regmean(None, ws, weight=[1.0, 1.0], stats=[torch.eye(3), torch.eye(3)])


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(MergeError, match=r"input 1 has shape \(3,\) but input 0 has \(2,\)"):
        alg.ties(torch.zeros(2), [torch.zeros(3)], weight=[1.0], density=[0.5])


def test_kth_largest_is_exact_by_bracket_and_by_radix():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 70, generator=g).abs()
    x[:100] = 0  # uneven rows, as when part of a model did not change
    blocks = list(tensors.row_ranges(x.shape, 3000))
    for k in (1, 10_500, 14_000, 14_001, 21_000):
        ref = float(torch.topk(x.flatten(), k).values[-1])
        assert tensors.kth_largest(x.shape, lambda a, b: x[a:b], k, chunk=3000) == ref
        assert tensors._radix(blocks, lambda a, b: x[a:b], k) == ref


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"weight": [1.0, 0.5, 2.0], "density": [0.2, 0.5, 0.9]}),
        (
            "breadcrumbs_ties",
            {"weight": [1.0, 0.5, 2.0], "density": [0.3, 0.5, 0.7], "gamma": [0.05, 0.1, 0.01]},
        ),
        ("dare_ties", {"weight": [1.0, 0.5, 2.0], "density": [0.3, 0.5, 0.7], "seed": 3}),
        (
            "della",
            {
                "weight": [1.0, 1.0, 1.0],
                "density": [0.4, 0.5, 0.6],
                "epsilon": [0.1, 0.1, 0.1],
                "seed": 1,
            },
        ),
        ("model_stock", {}),
        ("task_arithmetic", {"weight": [0.3, 0.3, 0.3]}),
    ],
)
def test_chunked_equals_whole_tensor(monkeypatch, method, params):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(120, 40, generator=g)
    models = [base + torch.randn(120, 40, generator=g) * 0.1 for _ in range(3)]
    spec = alg.get_method(method)
    whole = spec(base, models, **params)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 1000)  # 25 rows per block, 5 blocks
    chunked = spec(base, models, **params)
    if method in ("dare_ties", "della"):  # random masks are drawn per block: same law, other draws
        assert chunked.shape == whole.shape and torch.isfinite(chunked).all()
        return
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_streamed_output_goes_to_a_sink_in_row_order(monkeypatch):
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 30)
    base, other = torch.zeros(9, 10), torch.ones(9, 10)
    chunks = []

    class Sink:
        def write(self, c):
            chunks.append(c)

    assert alg.linear(None, [base, other], weight=[1.0, 1.0], out=Sink()) is None
    assert len(chunks) == 3 and torch.equal(torch.cat(chunks), torch.full((9, 10), 0.5))


def test_lowrank_concat_and_svd():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 7, generator=g), torch.randn(5, 2, generator=g)
    a2, b2 = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    l1, l2 = alg.LowRank(a1, b1, 0.5), alg.LowRank(a2, b2, 2.0)
    cat = alg.concat_lora([l1, l2], weights=[1.0, -1.0])
    assert cat.rank == 5 and torch.allclose(cat.dense(), l1.dense() - l2.dense(), atol=1e-6)
    full = alg.svd_lora([l1, l2], rank=5)
    assert torch.allclose(full.dense(), l1.dense() + l2.dense(), atol=1e-5)
    low = alg.svd_lora([l1, l2], rank=2)
    u, s, vh = torch.linalg.svd(l1.dense() + l2.dense())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert low.rank == 2 and torch.allclose(low.dense(), best, atol=1e-5)
    assert alg.LowRank(a1, b1, 1.0, transposed=True).dense().shape == (7, 5)
    with pytest.raises(MergeError, match="cannot be combined"):
        alg.concat_lora([l1, alg.LowRank(torch.randn(2, 6), b1)])
