"""The Ray Tune backend of deltatune.budget.search, reduced form: a tiny BERT's candidates, 2 local
workers, 4 trials. Every trial has its results.json, trials really overlap in time, the front is
non-dominated, the summary has the Optuna backend's schema, and the study resumes (with either
backend)."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

from deltatune.budget import BudgetError
from deltatune.budget.search import SearchSetup, SearchSpace, candidates, run_search

pytest.importorskip("optuna")
ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

# The fake trainer below runs in Ray's worker processes, which cannot import this test module by
# name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def _local_ray():
    """One local Ray instance for the module (run_search uses a running one and leaves it
    running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cands():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    return candidates(
        model, SearchSpace(methods=("lora", "ia3"), lora_scales=(1.0,)), 5_000, head=("classifier",)
    )


def _fake_train(cand, trial_dir):
    """Accuracy rises with log(parameters), LoRA gets a bonus."""
    start = time.time()
    acc = 0.5 + 0.03 * math.log(cand.params) + (0.05 if cand.method == "lora" else 0.0)
    metrics = {"key": cand.key, "method": cand.method, "params": cand.params, "val_accuracy": acc,
               "test_accuracy": acc, "start": start, "end": time.time()}
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "results.json").write_text(
        json.dumps({"job": "search-trial", "trial": int(trial_dir.name[6:]), **metrics})
    )
    return metrics


def _paired_train(cand, trial_dir):
    """Marks its start and waits (up to a minute) until a second trial has started too: with two
    workers that happens at once, one trial at a time it never does, whatever the machine's load."""
    start = time.time()
    marks = trial_dir.parent / "_started"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / trial_dir.name).touch()
    while len(list(marks.iterdir())) < 2 and time.time() - start < 60:
        time.sleep(0.1)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "peer.json").write_text(
        json.dumps({"peer": len(list(marks.iterdir())) >= 2, "from": start})
    )
    return _fake_train(cand, trial_dir)


def _broken_train(cand, trial_dir):
    raise RuntimeError("out of memory in the fake trainer")


def test_ray_backend_runs_two_workers_writes_trials_and_the_optuna_schema(tmp_path):
    cands = _cands()
    setup = SearchSetup(model="tiny", data="fake", budget=5_000, trials=4)
    summary = run_search(setup, cands, _paired_train, tmp_path / "ray", backend="ray", workers=2)

    dirs = sorted(tmp_path.joinpath("ray").glob("trial_*"))
    trials = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert len(trials) == 4 and len({t["key"] for t in trials}) == 4, (
        "4 trials, each a new configuration"
    )
    first = min((json.loads((d / "peer.json").read_text()) for d in dirs), key=lambda m: m["from"])
    assert first["peer"], "a second trial started while the first was still running (two workers)"

    rows = json.loads((tmp_path / "ray" / "trials.json").read_text())["trials"]
    assert summary["trials_done"] == 4 and len(rows) == 4
    assert {(r["trial"], r["key"]) for r in rows} == {(t["trial"], t["key"]) for t in trials}, (
        "trial_N is study trial N"
    )
    for r in summary["pareto"]:
        assert not any(
            o["val_accuracy"] >= r["val_accuracy"]
            and o["params"] <= r["params"]
            and (o["val_accuracy"], o["params"]) != (r["val_accuracy"], r["params"])
            for o in rows
        )
    assert summary["best"]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert (tmp_path / "ray" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| config | delta parameters |" in (tmp_path / "ray" / "pareto.md").read_text()

    # same schema as the Optuna backend's summary and rows
    ref = run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=2),
        cands,
        _fake_train,
        tmp_path / "opt",
    )
    assert set(ref) == set(summary) and set(ref["pareto"][0]) == set(summary["pareto"][0])
    ref_rows = json.loads((tmp_path / "opt" / "trials.json").read_text())["trials"]
    assert set(ref_rows[0]) == set(rows[0])

    # resume: a larger --trials continues the same study (trained configurations are not repeated)
    more = run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=6),
        cands,
        _fake_train,
        tmp_path / "ray",
        resume=True,
        backend="ray",
        workers=2,
    )
    keys = [
        json.loads((d / "results.json").read_text())["key"]
        for d in tmp_path.joinpath("ray").glob("trial_*")
    ]
    assert more["trials_done"] == 6 and len(keys) == 6 and len(set(keys)) == 6
    # ... and with the other backend: it is the same study
    last = run_search(
        SearchSetup(model="tiny", data="fake", budget=5_000, trials=7),
        cands,
        _fake_train,
        tmp_path / "ray",
        resume=True,
    )
    keys = [
        json.loads((d / "results.json").read_text())["key"]
        for d in tmp_path.joinpath("ray").glob("trial_*")
    ]
    assert last["trials_done"] == 7 and len(set(keys)) == 7


def test_a_failing_trial_is_a_one_line_error_and_marked_failed(tmp_path):
    import optuna

    cands = _cands()
    with pytest.raises(
        BudgetError,
        match=r"search trial \d+ failed in its Ray worker "
        r"\(.*out of memory in the fake trainer.*\); "
        "fix it and rerun with --resume",
    ):
        run_search(
            SearchSetup(model="tiny", data="fake", budget=5_000, trials=2),
            cands,
            _broken_train,
            tmp_path,
            backend="ray",
            workers=2,
        )
    study = optuna.load_study(
        study_name="deltatune-search", storage=f"sqlite:///{tmp_path / 'study.db'}"
    )
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.RUNNING not in states
    with pytest.raises(BudgetError, match="at least 1 worker"):
        run_search(
            SearchSetup(model="tiny", data="fake", budget=5_000, trials=2),
            cands,
            _fake_train,
            tmp_path / "w",
            backend="ray",
            workers=0,
        )
    assert not (tmp_path / "w").exists()
