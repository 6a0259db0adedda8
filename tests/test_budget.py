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
    alloc = allocate_sensitivity(model, batches, 200, loss, paths=paths)
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
