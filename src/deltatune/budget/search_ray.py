"""The Ray Tune backend of :mod:`deltatune.budget.search`: the same study, trials run in parallel.

The search definition does not change with the backend: :class:`~.search.Study` (the Optuna study in
``study.db``, multi-objective TPE over the candidates, no configuration trained twice) proposes
every trial, here through a Ray Tune :class:`~ray.tune.search.Searcher`, and Ray Tune runs
``workers`` trials at a time in local worker processes (``ray.init`` on this machine only: no
cluster, no dashboard). Each trial writes ``trial_N/results.json`` exactly as with the Optuna
backend, and its metrics are told to the same study, so the Pareto front, ``trials.json`` and
``results.json`` are the Optuna backend's, and a study started with one backend resumes with the
other. Resuming reads ``study.db`` (the completed trials), not Ray's experiment state: a trial
interrupted mid-way runs again under a new number, as with Optuna. Ray's own files go to
``OUT/ray/``.

Ray Tune: Liaw et al., https://arxiv.org/abs/1807.05118; https://docs.ray.io/en/latest/tune/
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .search import Candidate, Study, TrialFn
from .sensitivity import BudgetError


def _trainable(
    config: dict[str, Any],
    train_trial: TrialFn,
    cands: dict[str, Candidate],
    out: str,
    threads: int,
) -> None:
    """One trial in a Ray worker: train the proposed candidate in ``OUT/trial_N`` and report its
    metrics."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    cand = cands[config["config"]]
    metrics = train_trial(cand, Path(out) / f"trial_{config['number']}")
    # Ray adds its own fields to a result and flattens nested dicts: the metrics travel as one JSON
    # string.
    tune.report({"val_accuracy": float(metrics["val_accuracy"]), "params": cand.params,
                 "deltatune_metrics": json.dumps(metrics)})


def _searcher(study: Study, progress: Callable[[str], None] | None) -> Any:
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        """Asks :class:`Study` for each trial's configuration and tells it each result. Stops
        proposing after the first failed trial (the error is raised once the running ones end)."""

        def __init__(self) -> None:
            super().__init__(metric="val_accuracy", mode="max")
            self.numbers: dict[str, int] = {}  # Ray trial id -> study trial number
            self.failed: list[int] = []

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.failed or study.done():
                return Searcher.FINISHED
            if not study.room():
                return None  # the rest of the target is in flight: wait for it
            number, cand = study.propose()
            self.numbers[trial_id] = number
            return {"config": cand.key, "number": number}

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            number = self.numbers.pop(trial_id, None)
            if number is None:
                return
            if error or not result or "deltatune_metrics" not in result:
                study.fail(number)
                self.failed.append(number)
                return
            metrics = json.loads(result["deltatune_metrics"])
            study.complete(number, metrics)
            if progress:
                progress(
                    f"trial {number}: {metrics.get('key', '?')}: val accuracy "
                    f"{metrics['val_accuracy']:.4f}, {int(result['params']):,} parameters"
                )

        # The study is its own checkpoint (study.db): nothing for Ray to save or restore.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

    return StudySearcher()


def run_ray(
    study: Study,
    train_trial: TrialFn,
    *,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run the rest of ``study`` with Ray Tune, ``workers`` trials at a time on this machine.

    Starts a local Ray instance (and shuts it down) unless one is already running in this process;
    each trial gets ``cpus // workers`` CPU cores and as many torch threads."""
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    if study.done():
        return
    cpus = max(workers, os.cpu_count() or 1)
    os.environ.setdefault(
        "RAY_AIR_NEW_OUTPUT", "0"
    )  # Tune's older reporter honours verbose=0 (no tables)
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        per_trial = max(1, int(ray.cluster_resources().get("CPU", cpus)) // workers)
        searcher = _searcher(study, progress)
        trainable = tune.with_resources(
            tune.with_parameters(
                _trainable,
                train_trial=train_trial,
                cands=dict(study.by_key),
                out=str(study.out),
                threads=per_trial,
            ),
            {"cpu": per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            # one Ray trial per configuration still to train (repeats the sampler proposes never
            # reach Ray)
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=workers),
                num_samples=study.target - len(study.seen),
            ),
            run_config=tune.RunConfig(
                name="deltatune-search",
                storage_path=str(study.out / "ray"),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    if searcher.failed:
        errors = [r.error for r in grid if r.error is not None]
        first = str(errors[0]).strip().splitlines()[-1] if errors else "see OUT/ray/ for its log"
        raise BudgetError(
            f"search trial {searcher.failed[0]} failed in its Ray worker ({first}); fix it and "
            "rerun with --resume"
        )
