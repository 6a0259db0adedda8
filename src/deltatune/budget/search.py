"""Multi-objective search over delta configurations: highest validation accuracy, fewest parameters.

The search space is a small grid over the unified view's dimensions (He et al.,
https://arxiv.org/abs/2110.04366): the method (function + insertion: LoRA, AdaLoRA, (IA)³,
bottleneck adapters), its position (named groups of modules, e.g. attention q/v or the FFN), its
size (rank, reduction factor) and its scaling. Every candidate is built on the model once to count
its trainable parameters, and only those within the budget are searched, so an impossible space
fails before anything trains. Optuna's multi-objective TPE sampler
(https://arxiv.org/abs/2304.11127) then picks candidates; each trial trains in its own ``trial_N/``
directory with its own ``results.json``; the study lives in ``study.db`` (SQLite) beside them, so
rerunning with ``resume=True`` continues where it stopped. See :mod:`deltatune.budget.search_report`
for the Pareto plot and tables.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..core.registry import Registry
from .sensitivity import BudgetError

#: named positions as regular expressions over module paths (BERT-style encoders; Llama-style too)
POSITIONS: dict[str, str] = {
    "qv": r".*\.(query|value|q_proj|v_proj)",
    "attn": (
        r".*\.(attention\.self\.(query|key|value)|attention\.output\.dense"
        r"|self_attn\.[qkvo]_proj)"
    ),
    "ffn": r".*layers?\.\d+\.(intermediate\.dense|output\.dense|mlp\.(gate|up|down)_proj)",
    "all": r".*layers?\.\d+\..*(query|key|value|dense|[qkvo]_proj|(gate|up|down)_proj)",
}


@dataclass(frozen=True)
class SearchSpace:
    """The grid searched. Options per method; ``positions`` name entries of :data:`POSITIONS` (or a
    user-given ``custom`` group of name suffixes); ``lr`` is the learning rate per method."""

    methods: tuple[str, ...] = ("lora", "adalora", "ia3", "bottleneck")
    positions: tuple[str, ...] = ("qv", "attn", "ffn", "all")
    lora_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    lora_scales: tuple[float, ...] = (1.0, 2.0)  # alpha = scale × rank
    adalora_target_ranks: tuple[int, ...] = (2, 4, 8)  # init_r = 1.5 × target
    bottleneck_factors: tuple[float, ...] = (8.0, 16.0, 32.0, 64.0)
    bottleneck_styles: tuple[str, ...] = ("pfeiffer", "houlsby")
    custom_targets: tuple[
        str, ...
    ] = ()  # name suffixes: adds (and only searches) position "custom"
    lr: dict[str, float] = field(
        default_factory=lambda: {"lora": 5e-4, "adalora": 1e-3, "ia3": 3e-3, "bottleneck": 5e-4}
    )


@dataclass(frozen=True)
class Candidate:
    """One configuration: a method, its spec options (no head), and its trainable delta
    parameters."""

    key: str
    method: str
    options: dict[str, Any]
    params: int

    def spec(self, head: tuple[str, ...] = ()):
        from ..core.spec import registered_methods

        return registered_methods()[self.method](**self.options, trainable_modules=tuple(head))


#: one (key, options) grid builder per searchable method: ``build(space, where)`` where ``where``
#: maps each searched position to its target options. A method joins the search by registering one.
Where = dict[str, dict[str, Any]]  # searched position → its target options
GRIDS: Registry[Callable[[SearchSpace, Where], list[tuple[str, dict]]]] = Registry(
    "searchable method",
    BudgetError,
    message="method {name!r} is not searchable{hint}; choose from {known}",
)


@GRIDS.register("lora")
def _lora_grid(space: SearchSpace, where: Where) -> list[tuple[str, dict]]:
    return [
        (f"lora r={r} alpha={s * r:g} @{p}", {"r": r, "alpha": s * r, **w})
        for p, w in where.items()
        for r in space.lora_ranks
        for s in space.lora_scales
    ]


@GRIDS.register("adalora")
def _adalora_grid(space: SearchSpace, where: Where) -> list[tuple[str, dict]]:
    out = []
    for p, w in where.items():
        for t in space.adalora_target_ranks:
            init = (3 * t + 1) // 2  # init_r = 1.5 × target
            key = f"adalora target_r={t} init_r={init} @{p}"
            out.append((key, {"target_r": t, "init_r": init, "alpha": float(init), **w}))
    return out


@GRIDS.register("ia3")
def _ia3_grid(space: SearchSpace, where: Where) -> list[tuple[str, dict]]:
    return [("ia3 @key,value,ffn-out", {})]  # (IA)³ has one natural position


@GRIDS.register("bottleneck")
def _bottleneck_grid(space: SearchSpace, where: Where) -> list[tuple[str, dict]]:
    return [
        (f"bottleneck {st} factor={f:g}", {"style": st, "reduction_factor": f})
        for st in space.bottleneck_styles
        for f in space.bottleneck_factors
    ]


def _grid(space: SearchSpace) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, method, options) of every point of the space, before the budget filter."""
    positions = ("custom",) if space.custom_targets else space.positions
    unknown = [p for p in positions if p != "custom" and p not in POSITIONS]
    if unknown:
        raise BudgetError(f"unknown position {unknown[0]!r}; choose from {', '.join(POSITIONS)}")
    where = {
        p: (
            {"targets": tuple(space.custom_targets)}
            if p == "custom"
            else {"target_regex": POSITIONS[p]}
        )
        for p in positions
    }
    return [
        (key, method, options)
        for method in space.methods
        for key, options in GRIDS.get(method)(space, where)
    ]


def delta_parameters(model: nn.Module, name: str) -> int:
    """Trainable parameters of delta ``name`` without trainable module copies (a head trains in
    every configuration). SVD-form deltas count their live triplets at the end (AdaLoRA:
    ``target_r`` per module on average), ``rank × (in + out + 1)``."""
    from ..core.host import DeltaHost, iter_hosts

    return sum(host.part(name).budget_parameters() for _, host in iter_hosts(model)
               if isinstance(host, DeltaHost) and name in host.delta_names())


def candidates(
    model: nn.Module, space: SearchSpace, budget: int, head: tuple[str, ...] = ()
) -> list[Candidate]:
    """Every point of ``space`` that fits ``budget`` on ``model`` (parameters counted by attaching
    it); ``head``: modules that are not delta positions (a new classifier)."""
    from ..core.errors import SpecError, TargetError
    from ..core.model import attach, detach
    from .sensitivity import candidate_paths

    linear = [
        p
        for p in candidate_paths(
            model, space.custom_targets or None
        )  # unknown targets: one-line error
        if not any(p == h or p.startswith(h + ".") for h in head)
    ]
    if not linear:
        raise BudgetError("the search space's positions hold no Linear layer outside the head")
    shapes = dict(model.named_modules())
    smallest = min(sum(shapes[p].weight.shape) for p in linear)
    if budget < smallest:
        raise BudgetError(
            f"budget of {budget:,} parameters is smaller than one rank-1 delta here "
            f"({smallest:,}); give a budget of at least {smallest:,}"
        )
    fits, over = [], []
    for key, method, options in _grid(space):
        cand = Candidate(key, method, options, 0)
        try:
            attach(model, cand.spec(), "_probe")
        except (TargetError, SpecError):
            continue  # a position this model lacks, or a size it cannot take
        try:
            n = delta_parameters(model, "_probe")
        finally:
            detach(model, "_probe")
        (fits if n <= budget else over).append(Candidate(key, method, options, n))
    if not fits:
        if not over:
            raise BudgetError(
                "no configuration of the search space can be built on this model (every position "
                "matches nothing); check --positions / --targets"
            )
        least = min(over, key=lambda c: c.params)
        raise BudgetError(
            f"no configuration of the search space fits the budget of {budget:,} parameters (the "
            f"smallest, {least.key}, needs {least.params:,}); raise the budget or add smaller "
            "options"
        )
    return fits


def uniform_key(cands: list[Candidate]) -> str | None:
    """The key of the plain default among ``cands``: uniform LoRA on every block's Linear layers
    (position ``all``) with the largest rank that fits the budget, ``alpha = 2r`` where the space
    has it. The search trains it first, so the configuration it reports as best (highest
    validation accuracy) is never below the default on validation; None when the space has no
    such LoRA."""
    lora = [c for c in cands if c.method == "lora" and c.key.endswith(" @all")]
    if not lora:
        return None
    return max(
        lora, key=lambda c: (c.params, c.options.get("alpha") == 2 * c.options.get("r", 0))
    ).key


@dataclass
class SearchSetup:
    """What a search runs on; recorded in ``search.json`` and checked again on ``resume``."""

    model: str
    data: str
    budget: int
    trials: int
    max_steps: int = 100
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    keys: list[str] = field(default_factory=list)
    # TrainConfig fields every trial trains with (precision, compile, device, grad_accum, ...)
    train_options: dict[str, Any] | None = None

    def same_run(self, other: dict[str, Any]) -> str | None:
        """The first field (other than ``trials``) in which a recorded setup differs, or None."""
        mine = asdict(self)
        return next((k for k in mine if k != "trials" and other.get(k) != mine[k]), None)


TrialFn = Callable[[Candidate, Path], dict[str, Any]]


def check_backend(backend: str) -> None:
    """Fail early, in one line, when the search backend cannot run here."""
    from importlib.util import find_spec

    if backend not in ("optuna", "ray"):
        raise BudgetError(f"unknown search backend {backend!r}; use optuna or ray")
    if find_spec("optuna") is None:
        raise BudgetError('deltatune search needs optuna: pip install "deltatune[search]"')
    if backend == "ray" and find_spec("ray") is None:
        raise BudgetError('the ray backend needs Ray Tune: pip install "deltatune[search]"')


class Study:
    """The search definition both backends share: the Optuna study in ``out/study.db``
    (multi-objective TPE over the candidate keys, maximise val accuracy, minimise parameters) and
    the rule that every trial trains a configuration not trained (or in flight) before.

    ``first``: configuration keys trained before the sampler proposes anything (the default
    configuration, so that the best one found is never below it on validation).

    Ask/tell rather than ``optimize()``: a configuration the sampler proposes again is told PRUNED
    (the sampler ignores it; its number is skipped in ``trial_N``) and, after a few repeats, an
    unseen one is enqueued. Trials left RUNNING by a crash or Ctrl-C are marked failed and run again
    under a new number."""

    def __init__(
        self,
        setup: SearchSetup,
        cands: list[Candidate],
        out: Path,
        resume: bool,
        first: tuple[str, ...] = (),
    ) -> None:
        import optuna

        from ..io.files import write_json

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        setup.keys = [c.key for c in cands]
        unknown = [k for k in first if k not in setup.keys]
        if unknown:  # before anything is written
            raise BudgetError(f"configuration {unknown[0]!r} to train first is not in the space")
        record = out / "search.json"
        if resume and record.is_file():
            differs = setup.same_run(json.loads(record.read_text()))
            if differs:
                raise BudgetError(
                    f"--resume: {out} holds a search with a different {differs}; use another --out "
                    "or the same options"
                )
        write_json(record, asdict(setup))
        self.setup, self.out, self.by_key = setup, out, {c.key: c for c in cands}
        self.State = optuna.trial.TrialState
        sampler = optuna.samplers.TPESampler(seed=setup.seed, n_startup_trials=min(10, len(cands)))
        self.study = optuna.create_study(
            study_name="deltatune-search",
            storage=f"sqlite:///{out / 'study.db'}",
            directions=["maximize", "minimize"],
            sampler=sampler,
            load_if_exists=True,
        )
        for t in self.study.get_trials(deepcopy=False, states=[self.State.RUNNING]):
            self.study.tell(t.number, state=self.State.FAIL)
        self.seen = {
            t.params["config"]
            for t in self.study.get_trials(deepcopy=False, states=[self.State.COMPLETE])
        }
        waiting = {  # an enqueued trial holds its parameters as fixed_params until it is asked
            t.system_attrs.get("fixed_params", {}).get("config")
            for t in self.study.get_trials(deepcopy=False, states=[self.State.WAITING])
        }
        for key in first:  # trained before the sampler proposes anything (e.g. the default)
            if key not in self.seen | waiting:
                self.study.enqueue_trial({"config": key})
        self.pending: dict[int, Any] = {}  # trial number -> optuna trial, asked and not yet told
        self.rng = random.Random(setup.seed + len(self.study.trials))
        self.target = min(setup.trials, len(cands))

    def done(self) -> bool:
        return len(self.seen) >= self.target

    def room(self) -> bool:
        """Whether another trial may start now (the target counts the ones in flight)."""
        return len(self.seen) + len(self.pending) < self.target

    def propose(self) -> tuple[int, Candidate]:
        """Ask the sampler until it gives a configuration neither trained nor in flight (call only
        when :meth:`room`); returns (trial number, candidate)."""
        repeats = 0
        while True:
            trial = self.study.ask()
            key = trial.suggest_categorical("config", self.setup.keys)
            if key not in self._busy():
                self.pending[trial.number] = trial
                return trial.number, self.by_key[key]
            self.study.tell(trial, state=self.State.PRUNED)
            repeats += 1
            if repeats >= 3:
                self.study.enqueue_trial(
                    {
                        "config": self.rng.choice(
                            [k for k in self.setup.keys if k not in self._busy()]
                        )
                    }
                )
                repeats = 0

    def _busy(self) -> set[str]:
        return self.seen | {t.params["config"] for t in self.pending.values()}

    def complete(self, number: int, metrics: dict[str, Any]) -> None:
        trial = self.pending.pop(number)
        for k, v in metrics.items():
            trial.set_user_attr(k, v)
        key = trial.params["config"]
        self.study.tell(trial, [float(metrics["val_accuracy"]), float(self.by_key[key].params)])
        self.seen.add(key)

    def fail(self, number: int) -> None:
        self.study.tell(self.pending.pop(number), state=self.State.FAIL)

    def summary(self) -> dict[str, Any]:
        from .search_report import summarise

        return summarise(self.study, self.setup, self.out)


def run_search(
    setup: SearchSetup,
    cands: list[Candidate],
    train_trial: TrialFn,
    out: Path,
    *,
    resume: bool = False,
    backend: Literal["optuna", "ray"] = "optuna",
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
    first: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run (or continue) the study until ``setup.trials`` distinct configurations are trained (or
    the whole grid, if smaller); return the summary.

    ``train_trial(candidate, trial_dir)`` trains one configuration and returns its metrics (it must
    hold ``val_accuracy``); it writes ``trial_dir/results.json`` and whatever else it wants there.
    ``backend="optuna"`` runs the trials one after another in this process; ``"ray"`` runs
    ``workers`` of them at a time in local Ray Tune worker processes
    (:mod:`deltatune.budget.search_ray`), from the same study, so the two backends resume each
    other's studies and write the same files. ``first``: configuration keys trained before the
    sampler proposes any (see :func:`uniform_key`)."""
    check_backend(backend)
    if backend == "ray" and workers < 1:
        raise BudgetError(f"workers={workers}: the ray backend needs at least 1 worker")
    out = Path(out).resolve()
    study = Study(setup, cands, out, resume, tuple(first))
    if backend == "ray":
        from .search_ray import run_ray

        run_ray(study, train_trial, workers=workers, progress=progress)
        return study.summary()
    while not study.done():
        number, cand = study.propose()
        try:
            metrics = train_trial(cand, out / f"trial_{number}")
        except BaseException:
            study.fail(number)
            raise
        study.complete(number, metrics)
        if progress:
            progress(
                f"trial {number}: {cand.key}: val accuracy {metrics['val_accuracy']:.4f}, "
                f"{cand.params:,} parameters"
            )
    return study.summary()


def text_trainer(setup: SearchSetup, space: SearchSpace) -> TrialFn:
    """The usual trial: a fresh model, the candidate's delta (a new head trains beside it), ``fit``
    for ``setup.max_steps`` steps (AdaLoRA with its schedule), validation and test accuracy, and
    ``trial_dir/results.json``. The data is loaded once, here."""
    import torch

    from ..core.model import attach
    from ..data import load_data
    from ..io.files import write_json
    from ..models import load_model
    from ..train import TrainConfig, evaluate, fit
    from .adalora import final_ranks

    splits = {
        s: load_data(setup.data, s, seed=setup.seed, limit=setup.limit)
        for s in ("train", "val", "test")
    }
    labels = list(getattr(splits["train"], "label_names", []) or [])

    def train_trial(cand: Candidate, trial_dir: Path) -> dict[str, Any]:
        torch.manual_seed(
            setup.seed
        )  # the new head's init must not depend on what ran before this trial
        entry = load_model(setup.model, num_labels=len(labels) or None)
        attach(entry.model, cand.spec(tuple(entry.head)), "default")
        cfg = TrainConfig(
            max_steps=setup.max_steps,
            batch_size=setup.batch_size,
            lr=space.lr.get(cand.method, 5e-4),
            seed=setup.seed,
            progress=False,
            **(setup.train_options or {}),
        )
        result = fit(
            entry.model,
            splits["train"],
            entry.collate,
            cfg,
            eval_data=splits["val"],
            out_dir=trial_dir,
            task=entry.task,
            spec_callbacks=True,
        )  # AdaLoRA's schedule; it keeps the best state from its final allocation on
        val = result.best.get("accuracy", result.final.get("accuracy", 0.0))
        test = evaluate(entry.model, splits["test"], entry.collate, task=entry.task)
        metrics = {
            "key": cand.key,
            "method": cand.method,
            "options": cand.options,
            "params": cand.params,
            "val_accuracy": float(val),
            "test_accuracy": float(test.get("accuracy", 0.0)),
            "steps": result.steps,
        }
        try:  # rank-adaptive deltas (SVD form: AdaLoRA, IncreLoRA) report where their ranks went
            metrics["ranks"] = final_ranks(entry.model, "default")
        except BudgetError:
            pass
        write_json(
            trial_dir / "results.json",
            {"job": "search-trial", "trial": int(trial_dir.name.split("_")[-1]), **metrics},
        )
        return metrics

    return train_trial
