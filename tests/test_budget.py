"""deltatune.budget: sensitivity allocation spends the budget on the sensitive matrices; bad
input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.budget import BudgetError, allocate_sensitivity, candidate_paths, parse_budget


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    x = torch.randn(64, 16)
    y = torch.randint(0, 4, (64,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return model, batches, loss


def test_parse_budget():
    model, _, _ = _setup()
    total = sum(p.numel() for p in model.parameters())
    assert parse_budget("10%", model) == int(0.1 * total)
    assert parse_budget(500, model) == 500 and parse_budget("2k", model) == 2000
    with pytest.raises(BudgetError, match="not a number of parameters"):
        parse_budget("lots", model)
    with pytest.raises(BudgetError, match="less than one parameter"):
        parse_budget("0.00001%", model)


def test_allocation_spends_the_budget_on_the_most_sensitive_entries():
    model, batches, loss = _setup()
    paths = ["0", "2", "4"]
    alloc = allocate_sensitivity(model, batches, 200, loss, paths=paths, sparse=True)
    assert sum(r.chosen for r in alloc.rows) == 200 and alloc.used <= 200
    assert sum(r.score_share for r in alloc.rows) == pytest.approx(1.0, rel=1e-5)
    for (
        r
    ) in alloc.rows:  # a matrix gets a LoRA exactly when it holds a rank-1 LoRA's worth of entries
        assert (r.rank > 0) == (r.chosen >= sum(r.shape)) and r.sparse in (0, r.chosen)
    names = alloc.attach(model, "b")
    assert set(names) <= {"b-lora", "b-sparse"} and names
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == alloc.used
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_attach_scales_every_rank_to_a_uniform_loras_step():
    """Uneven ranks under one constant alpha / r took steps up to ~r/r̄ times too large (issue 22):
    each module now gets scale·√(r̄/r), a uniform LoRA's alpha / r at the uniform rank r̄."""
    import math

    from deltatune.core.model import get_spec

    model, batches, loss = _setup()
    alloc = allocate_sensitivity(model, batches, 400, loss, paths=["0", "2", "4"])
    # r̄ = budget / Σ(out + in) over the candidates: 400 / (48 + 64 + 36)
    assert alloc.uniform_rank == pytest.approx(400 / 148)
    ranks = {r.path: r.rank for r in alloc.rows if r.rank}
    assert len(set(ranks.values())) > 1, "the toy allocation must give uneven ranks"
    alloc.attach(model, "b", scale=2.0)
    spec = get_spec(model, "b-lora")
    for path, r in ranks.items():
        assert spec.scaling_for(path) == pytest.approx(2.0 * math.sqrt(alloc.uniform_rank / r))
    # an explicit scaling from the caller wins
    model2, batches2, loss2 = _setup()
    alloc2 = allocate_sensitivity(model2, batches2, 400, loss2, paths=["0", "2", "4"])
    alloc2.attach(model2, "c", alpha_pattern={p: 2.0 * r for p, r in ranks.items()})
    spec2 = get_spec(model2, "c-lora")
    assert all(spec2.scaling_for(p) == pytest.approx(2.0) for p in ranks)


def test_the_default_is_lora_only_and_spends_the_whole_budget_on_ranks():
    model, batches, loss = _setup()
    both = allocate_sensitivity(model, batches, 400, loss, paths=["0", "2", "4"], sparse=True)
    alloc = allocate_sensitivity(model, batches, 400, loss, paths=["0", "2", "4"])  # LoRA only
    assert not alloc.masks and all(r.sparse == 0 for r in alloc.rows)
    # the rest after rounding down is spent: less than the cheapest matrix still holding entries
    cheapest = min(sum(r.shape) for r in alloc.rows if r.chosen)
    assert 400 - cheapest < alloc.used <= 400
    for a, b in zip(alloc.rows, both.rows):  # ranks only grow, each by at most one
        assert b.rank <= a.rank <= b.rank + 1
    assert alloc.attach(model, "l") == ["l-lora"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == alloc.used


def test_budget_errors():
    model, batches, loss = _setup()
    with pytest.raises(BudgetError, match="smaller than one rank-1 LoRA"):
        allocate_sensitivity(model, batches, 10, loss, paths=["0", "2"])
    with pytest.raises(BudgetError, match="no Linear layer matches"):
        candidate_paths(model, ["query"])


def test_cli_allocate_prints_one_line_per_matrix():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune.cli.app",
            "allocate",
            "--model",
            "minilm",
            "--data",
            "bbc-news",
            "--budget",
            "0.2%",
            "--batches",
            "1",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert (
        len(lines) == 6 * 6 + 1 + 1
        and "sensitivity" in lines[0]
        and lines[-1].startswith("budget ")
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune.cli.app",
            "allocate",
            "--model",
            "minilm",
            "--data",
            "bbc-news",
            "--budget",
            "10",
            "--batches",
            "1",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "smaller than one rank-1 LoRA" in bad.stderr
    assert "give a budget of at least 768" in bad.stderr.strip().splitlines()[-1]
