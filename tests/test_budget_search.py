"""deltatune.budget.search: the budget-filtered space, the Optuna study (trial dirs, resume, Pareto
front), `deltatune search` / `deltatune allocate --method adalora`, and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from deltatune.budget import BudgetError
from deltatune.budget.search import (
    SearchSetup,
    SearchSpace,
    candidates,
    check_backend,
    run_search,
    uniform_key,
)
from deltatune.budget.search_report import pareto_front

pytest.importorskip("optuna")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def test_candidates_fit_the_budget_and_count_parameters_exactly():
    model = _bert()
    space = SearchSpace(
        methods=("lora", "adalora", "ia3", "bottleneck"), lora_ranks=(1, 4), lora_scales=(1.0,)
    )
    cands = candidates(model, space, 2_000, head=("classifier",))
    by_key = {c.key: c for c in cands}
    assert all(c.params <= 2_000 for c in cands)
    # LoRA r=1 on query+value of 2 layers: 4 × (32 + 32); r=4 on every layer Linear is over budget
    assert by_key["lora r=1 alpha=1 @qv"].params == 4 * 64
    assert "lora r=4 alpha=4 @all" not in by_key
    ffn = by_key["lora r=1 alpha=1 @ffn"].params
    assert ffn == 2 * 2 * (32 + 37), (
        "ffn = intermediate.dense + output.dense, not attention.output.dense"
    )
    # AdaLoRA counts its final live triplets: target_r × (in + out + 1) per module
    assert by_key["adalora target_r=2 init_r=3 @qv"].params == 2 * 4 * 65
    assert {c.method for c in cands} == {"lora", "adalora", "ia3", "bottleneck"}
    assert list(model.named_modules()) and not any(
        "_probe" in n for n, _ in model.named_modules()
    ), "probes detached"


def test_bad_spaces_and_budgets_are_one_line_errors():
    model = _bert()
    with pytest.raises(BudgetError, match=r"smaller than one rank-1 delta here \(64\)"):
        candidates(model, SearchSpace(), 50, head=("classifier",))
    with pytest.raises(
        BudgetError,
        match="no configuration of the search space fits the budget of 100 parameters "
        r"\(the smallest, .*, needs \d",
    ):
        candidates(model, SearchSpace(methods=("lora", "ia3")), 100, head=("classifier",))
    with pytest.raises(
        BudgetError, match="no Linear layer matches \\['quary'\\]; closest names: query"
    ):
        candidates(model, SearchSpace(custom_targets=("quary",)), 10_000)
    with pytest.raises(BudgetError, match="unknown position 'mlp'"):
        candidates(model, SearchSpace(positions=("mlp",)), 10_000)
    with pytest.raises(BudgetError, match="method 'prefix' is not searchable"):
        candidates(model, SearchSpace(methods=("prefix",)), 10_000)
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(BudgetError, match='pip install "deltatune\\[search\\]"'):
            check_backend("ray")
    with pytest.raises(BudgetError, match="unknown search backend 'hyperopt'"):
        check_backend("hyperopt")


def _fake_trainer(calls):
    """Accuracy rises with log(parameters) but LoRA beats the others: a front with several
    points."""
    import math

    def train(cand, trial_dir):
        calls.append(cand.key)
        acc = 0.5 + 0.03 * math.log(cand.params) + (0.05 if cand.method == "lora" else 0.0)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "results.json").write_text(json.dumps({"key": cand.key, "val_accuracy": acc}))
        return {
            "key": cand.key,
            "method": cand.method,
            "params": cand.params,
            "val_accuracy": acc,
            "test_accuracy": acc,
        }

    return train


def test_study_writes_trial_dirs_a_front_and_resumes(tmp_path):
    model = _bert()
    cands = candidates(
        model, SearchSpace(methods=("lora", "ia3"), lora_scales=(1.0,)), 5_000, head=("classifier",)
    )
    setup = SearchSetup(model="tiny", data="fake", budget=5_000, trials=4)
    calls: list[str] = []
    summary = run_search(setup, cands, _fake_trainer(calls), tmp_path)
    assert len(calls) == 4 and len(set(calls)) == 4, "every trial trains a new configuration"
    dirs = sorted(p.name for p in tmp_path.glob("trial_*"))
    assert len(dirs) == 4 and all((tmp_path / d / "results.json").is_file() for d in dirs)
    assert (tmp_path / "study.db").is_file() and (tmp_path / "pareto.png").read_bytes()[
        :4
    ] == b"\x89PNG"
    rows = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert len(rows) == 4 and summary["trials_done"] == 4
    for r in summary["pareto"]:  # nothing on the front is dominated by any trial
        assert not any(
            o["val_accuracy"] > r["val_accuracy"] and o["params"] <= r["params"] for o in rows
        )
    assert summary["best"]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert "| config | delta parameters |" in (tmp_path / "pareto.md").read_text()

    # the same command again changes nothing; a larger --trials continues the same study
    run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=4),
        cands,
        _fake_trainer(calls),
        tmp_path,
        resume=True,
    )
    assert len(calls) == 4
    more = run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=6),
        cands,
        _fake_trainer(calls),
        tmp_path,
        resume=True,
    )
    assert len(calls) == 6 and len(set(calls)) == 6 and more["trials_done"] == 6
    with pytest.raises(BudgetError, match="holds a search with a different max_steps"):
        run_search(
            SearchSetup(model="tiny", data="fake", budget=5_000, trials=6, max_steps=7),
            cands,
            _fake_trainer(calls),
            tmp_path,
            resume=True,
        )


def test_a_small_grid_is_searched_exhaustively_once(tmp_path):
    model = _bert()
    cands = candidates(
        model,
        SearchSpace(methods=("lora",), positions=("qv",), lora_ranks=(1, 2), lora_scales=(1.0,)),
        5_000,
        head=("classifier",),
    )
    calls: list[str] = []
    summary = run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=10),
        cands,
        _fake_trainer(calls),
        tmp_path,
    )
    assert (
        sorted(calls) == sorted(c.key for c in cands) and summary["trials_done"] == len(cands) == 2
    )


def test_the_uniform_default_trains_first_so_the_best_is_never_below_it(tmp_path):
    """Issue 22: a search that never tried the default could report a config below it."""
    model = _bert()
    space = SearchSpace(methods=("lora", "ia3"), lora_ranks=(1, 2, 4), lora_scales=(1.0, 2.0))
    cands = candidates(model, space, 2_000, head=("classifier",))
    # one rank on every block Linear of the 2 layers costs 2 × (4 × 64 + 2 × 69) = 788: r=2 fits
    # 2,000, r=4 does not; of alpha = r and 2r the default's 2r
    key = uniform_key(cands)
    assert key == "lora r=2 alpha=4 @all"
    calls: list[str] = []

    def train(cand, trial_dir):  # the default is the best on validation here
        calls.append(cand.key)
        acc = 0.9 if cand.key == key else 0.5
        return {"key": cand.key, "method": cand.method, "params": cand.params,
                "val_accuracy": acc, "test_accuracy": acc}

    summary = run_search(
        SearchSetup(model="tiny", data="fake", budget=2_000, trials=3), cands, train, tmp_path,
        first=(key,),
    )
    assert calls[0] == key and len(set(calls)) == 3 and summary["best"]["key"] == key
    # resuming does not train it again; an unknown key is refused before anything is written
    run_search(SearchSetup(model="tiny", data="fake", budget=2_000, trials=4), cands, train,
               tmp_path, resume=True, first=(key,))
    assert calls.count(key) == 1 and len(calls) == 4
    with pytest.raises(BudgetError, match="'lora r=99' to train first is not in the space"):
        run_search(SearchSetup(model="tiny", data="fake", budget=2_000, trials=4), cands, train,
                   tmp_path / "x", first=("lora r=99",))
    assert not (tmp_path / "x").exists()
    assert uniform_key([c for c in cands if c.method == "ia3"]) is None


def test_pareto_front_keeps_only_non_dominated_rows():
    rows = [
        {"trial": 0, "key": "a", "params": 10, "val_accuracy": 0.5},
        {"trial": 1, "key": "b", "params": 20, "val_accuracy": 0.7},
        {"trial": 2, "key": "c", "params": 30, "val_accuracy": 0.6},
        {"trial": 3, "key": "d", "params": 10, "val_accuracy": 0.4},
    ]
    assert [r["key"] for r in pareto_front(rows)] == ["a", "b"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "deltatune.cli.app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )


def test_cli_search_end_to_end_on_minilm(tmp_path):
    out = tmp_path / "s"
    base = [
        "search",
        "--model",
        "minilm",
        "--data",
        "tweet-sentiment",
        "--budget",
        "0.5%",
        "--max-steps",
        "2",
        "--limit",
        "16",
        "--batch-size",
        "8",
        "--methods",
        "lora,adalora",
        "--positions",
        "qv",
        "--out",
        str(out),
    ]
    proc = _cli(*base, "--trials", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["trials_done"] == 2 and results["budget"] == int(0.005 * 22_714_371)
    trial = json.loads((out / "trial_0" / "results.json").read_text())
    assert 0 <= trial["val_accuracy"] <= 1 and trial["params"] <= results["budget"]
    assert (out / "pareto.png").is_file() and "best:" in proc.stdout
    again = _cli(*base, "--trials", "3")
    assert again.returncode == 2 and "exists and is not empty; pass --overwrite" in again.stderr
    resumed = _cli(*base, "--trials", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["trials_done"] == 3
    bad = _cli(
        "search",
        "--model",
        "minilm",
        "--data",
        "tweet-sentiment",
        "--budget",
        "1000",
        "--trials",
        "2",
        "--out",
        str(tmp_path / "b"),
    )
    assert (
        bad.returncode == 2
        and "no configuration of the search space fits the budget of 1,000" in bad.stderr
    )
    # one line (transformers' own loading bar aside), and nothing written
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("error: no configuration")
        and not (tmp_path / "b").exists()
    )
    tiny = _cli(
        "search", "--model", "minilm", "--data", "tweet-sentiment", "--budget", "100",
        "--trials", "2", "--out", str(tmp_path / "t"),
    )
    assert tiny.returncode == 2 and not (tmp_path / "t").exists()
    assert tiny.stderr.strip().splitlines()[-1] == (
        "error: budget of 100 parameters is smaller than one rank-1 delta here (768); give a "
        "budget of at least 768"
    )


def test_cli_allocate_adalora_runs_a_warmup_and_prints_ranks():
    proc = _cli(
        "allocate",
        "--model",
        "minilm",
        "--data",
        "tweet-sentiment",
        "--budget",
        "0.3%",
        "--method",
        "adalora",
        "--steps",
        "4",
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--targets",
        "query,value",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 12 + 1 and lines[-1].startswith("budget 68,143 parameters")
    ranks = [int(line.split("LoRA r=")[1].split()[0]) for line in lines[:-1] if "LoRA r=" in line]
    # 0.3% of MiniLM over 12 matrices of 384+384+1: target rank 7 on average, 84 triplets in all
    assert sum(ranks) == 7 * 12
