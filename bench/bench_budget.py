"""Budget benchmark (issues 10, 22): uniform LoRA vs AdaLoRA vs sensitivity allocation vs the best
searched config, tweet-sentiment, MiniLM, at one parameter budget.

    # the issue-22 form: 500 steps, 2000 examples per split, 3 seeds, a 4-trial reduced search
    .venv/bin/python bench/bench_budget.py --seeds 0 1 2 --limit 2000 --max-steps 500 --trials 4
    # smoke
    .venv/bin/python bench/bench_budget.py --limit 16 --max-steps 2 --seeds 0 --trials 2 --no-write

The budget is the delta parameters of uniform LoRA r=4 on every Linear layer of the encoder's blocks
(36 matrices, 165,888 parameters; the new head trains in every variant and is not counted).

- AdaLoRA starts at rank 6 and is pruned to 4 on average (its λ add one parameter per triplet;
  alpha 12, so its scaling 12 / 6 equals uniform LoRA's 8 / 4), on the paper's schedule shape
  (Zhang et al. 2023, GLUE scripts: warm-up ~12% of the steps, final phase ~44%, a re-allocation
  every 100 steps, orthogonality weight 0.1), scaled to the run: ``tinit`` 10%, ``tfinal`` 40%,
  ``delta_t`` = steps / 50, ``orth_reg_weight`` 0.1.
- The sensitivity allocation (SPT-style, 8 batches of the training split) spends the budget on LoRA
  ranks (LoRA only, the library's default), each module scaled by ``2·√(r̄/r)`` (rank-stabilised;
  r̄ = 4 here). ``sensitivity-{sparse,lora}-{rs,constant}`` are the issue-22 diagnosis: with or
  without SPT's sparse entries, rank-stabilised or constant ``alpha / r = 2`` (sparse-constant is
  the form before issue 22).
- The searched config is the best validation accuracy of a reduced ``deltatune.budget.search``
  study (LoRA only: positions qv/attn/ffn/all × rank 1-16, alpha = 2r, at the same steps, data and
  learning rate as uniform LoRA, seed 0) that trains uniform LoRA's own configuration first and
  keeps only configurations with at most the budget's parameters; then it is retrained on every
  seed.

Same data split, steps, batch size and schedule per seed; validation and test accuracy, mean ± std.
Every finished run is appended to ``bench/budget_runs.jsonl`` and reused by a rerun with the same
settings, so a long run can be stopped and continued.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

DATA = "tweet-sentiment"
LR = {"uniform-lora": 1e-3, "adalora": 2e-3, "sensitivity": 1e-3, "searched": None}
#: the sensitivity allocation's forms: (sparse entries beside the ranks, scaling of the ranks);
#: "sensitivity" is the default form, the others are the issue-22 diagnosis (sparse-constant is
#: the form before it: alpha = 2r everywhere, LoRA + sparse entries)
SENSITIVITY = {
    "sensitivity": (False, "rs"),
    "sensitivity-sparse-rs": (True, "rs"),
    "sensitivity-lora-rs": (False, "rs"),
    "sensitivity-sparse-constant": (True, "constant"),
    "sensitivity-lora-constant": (False, "constant"),
}
RUNS = ROOT / "bench" / "budget_runs.jsonl"


def search_space():
    """The reduced search space: LoRA at four positions, ranks 1-16, alpha = 2r, uniform LoRA's
    learning rate (so its own configuration trains exactly as the uniform-lora row)."""
    from deltatune.budget.search import SearchSpace

    return SearchSpace(
        methods=("lora",),
        positions=("qv", "attn", "ffn", "all"),
        lora_ranks=(1, 2, 4, 8, 16),
        lora_scales=(2.0,),
        lr={"lora": LR["uniform-lora"]},
    )


def _splits(seed: int, limit: int | None, val_limit: int | None = None):
    from deltatune.data import load_data

    return {
        s: load_data(DATA, s, seed=seed, limit=val_limit if s == "val" and val_limit else limit)
        for s in ("train", "val", "test")
    }


def _attach(variant: str, entry, splits, budget: int, steps: int, searched=None):
    """Attach ``variant``'s delta(s); returns (callbacks, learning rate, delta parameters,
    ranks)."""
    import torch

    import deltatune as dt
    from deltatune.budget import AdaLoRASchedule, allocate_sensitivity
    from deltatune.budget.search import POSITIONS, delta_parameters
    from deltatune.train.losses import compute_loss, forward, labels_of

    head = tuple(entry.head)
    model = entry.model
    if variant == "uniform-lora":
        dt.attach(
            model,
            dt.LoRA(r=4, alpha=8, target_regex=POSITIONS["all"], trainable_modules=head),
            "default",
        )
        return [], LR[variant], delta_parameters(model, "default"), None
    if variant == "adalora":
        dt.attach(
            model,
            dt.AdaLoRA(
                init_r=6,
                target_r=4,
                alpha=12.0,
                target_regex=POSITIONS["all"],
                total_step=steps,
                tinit=steps // 10,
                tfinal=(2 * steps) // 5,
                delta_t=max(1, steps // 50),
                orth_reg_weight=0.1,
                trainable_modules=head,
            ),
            "default",
        )
        return [AdaLoRASchedule("default")], LR[variant], delta_parameters(model, "default"), None
    if variant in SENSITIVITY:
        import re

        paths = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(POSITIONS["all"], n)
        ]
        examples = splits["train"].examples[: 8 * 16]
        batches = [entry.collate(examples[i:i + 16]) for i in range(0, len(examples), 16)]

        def loss(m, b):
            return compute_loss(forward(m, b), labels_of(b, "classification"), "classification")

        sparse, scaling = SENSITIVITY[variant]
        alloc = allocate_sensitivity(model, batches, budget, loss, paths=paths, sparse=sparse)
        if scaling == "rs":  # each module 2·√(r̄/r): uniform LoRA's alpha / r = 2 at r̄ = 4
            alloc.attach(model, "default", scale=2.0, trainable_modules=head)
        else:  # alpha / r = 2 at every rank, as before issue 22
            ranks = {r.path: r.rank for r in alloc.rows if r.rank}
            alpha = {p: 2.0 * r for p, r in ranks.items()}
            alloc.attach(model, "default", alpha_pattern=alpha, trainable_modules=head)
        return [], LR["sensitivity"], alloc.used, {r.path: r.rank for r in alloc.rows}
    cand = searched
    dt.attach(model, cand.spec(head), "default")
    callbacks = [AdaLoRASchedule("default", total_step=steps)] if cand.method == "adalora" else []
    return callbacks, search_space().lr.get(cand.method, 5e-4), cand.params, None


def run(variant: str, seed: int, args, budget: int, searched=None) -> dict:
    import torch

    from deltatune.budget.adalora import enforce_ranks, final_ranks
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, evaluate, fit

    torch.manual_seed(seed)
    splits = _splits(seed, args.limit, args.val_limit)
    entry = load_model("minilm", num_labels=len(splits["train"].label_names))
    steps = args.max_steps or -(-len(splits["train"]) // args.batch_size)  # one epoch by default
    callbacks, lr, params, ranks = _attach(variant, entry, splits, budget, steps, searched)
    cfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=lr, seed=seed, progress=False)
    t0 = time.time()
    fit(
        entry.model,
        splits["train"],
        entry.collate,
        cfg,
        eval_data=splits["val"],
        task=entry.task,
        callbacks=callbacks,
    )
    revived = 0
    if variant == "adalora" or (variant == "searched" and searched.method == "adalora"):
        # the trainer restores no state from before the final allocation (AdaLoRASchedule.
        # keeps_best), so this finds nothing to prune; it is kept as a check, recorded per run
        revived = enforce_ranks(entry.model, "default")
        ranks = final_ranks(entry.model, "default")
    val = evaluate(entry.model, splits["val"], entry.collate, task=entry.task)
    test = evaluate(entry.model, splits["test"], entry.collate, task=entry.task)
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": test["accuracy"],
        "val_accuracy": val["accuracy"],
        "params": params,
        "lr": lr,
        "steps": steps,
        "ranks": ranks,
        "revived_triplets": revived,
        "seconds": time.time() - t0,
        "config": searched.key if searched else None,
    }


UNIFORM_KEY = "lora r=4 alpha=8 @all"  # uniform LoRA's configuration as the search names it
#: issue 22's schedule, with the best state chosen only from the final allocation on
VERSION = {"adalora": "adalora v22 keeps_best"}


def cached_run(variant: str, seed: int, args, budget: int, searched=None, runs: Path = RUNS):
    """``run`` unless ``runs`` holds the same configuration, seed and settings (variant names do not
    count: uniform LoRA and the searched configuration "lora r=4 alpha=8 @all" are one run)."""
    if searched:
        config = searched.key
    elif variant in SENSITIVITY:
        sparse, scaling = SENSITIVITY[variant]
        config = f"sensitivity {'lora+sparse' if sparse else 'lora'} {scaling}"
    else:
        config = UNIFORM_KEY if variant == "uniform-lora" else VERSION[variant]
    lr = (
        search_space().lr.get(searched.method, 5e-4)
        if searched
        else LR["sensitivity" if variant in SENSITIVITY else variant]
    )
    key = {"config": config, "seed": seed, "max_steps": args.max_steps, "limit": args.limit,
           "val_limit": args.val_limit, "batch_size": args.batch_size, "lr": lr}
    if runs.is_file():
        for line in runs.read_text().splitlines():
            row = json.loads(line)
            if {k: row.get(k) for k in key} == key:
                return {**row, "variant": variant}
    row = {**run(variant, seed, args, budget, searched), **key}
    if not args.no_write:
        with runs.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def search_best(args, budget: int, out: Path):
    """The searched config: the best validation accuracy of a reduced study within the budget
    (seed 0) that trains uniform LoRA's configuration first; every trial is a bench run, cached."""
    from deltatune.budget.search import SearchSetup, candidates, run_search
    from deltatune.io.files import write_json
    from deltatune.models import load_model

    splits = _splits(0, args.limit, args.val_limit)
    entry = load_model("minilm", num_labels=len(splits["train"].label_names))
    cands = candidates(entry.model, search_space(), budget, tuple(entry.head))
    assert UNIFORM_KEY in {c.key for c in cands}, "the space must hold uniform LoRA's config"
    setup = SearchSetup(
        model="minilm",
        data=DATA,
        budget=budget,
        trials=args.trials,
        max_steps=args.max_steps or 0,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=0,
    )

    def trial(cand, trial_dir: Path) -> dict:
        row = cached_run("searched", 0, args, budget, cand)
        metrics = {"key": cand.key, "method": cand.method, "params": cand.params,
                   "val_accuracy": row["val_accuracy"], "test_accuracy": row["accuracy"]}
        write_json(trial_dir / "results.json", {"job": "search-trial", **metrics})
        return metrics

    summary = run_search(
        setup, cands, trial, out, resume=True, progress=print, first=(UNIFORM_KEY,)
    )
    best = summary["best"]
    return next(c for c in cands if c.key == best["key"]), summary


def summary_keys(summary: dict) -> list[str]:
    """The configurations the search trained."""
    trials = json.loads(Path(summary["trials_json"]).read_text())["trials"]
    return [t["key"] for t in trials]


def plot_ranks(rows: list[dict], path: Path) -> Path:
    """Per-matrix ranks: AdaLoRA's final ranks and the sensitivity allocation's, against uniform r=4
    (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.io.files import save_figure

    ada = next((r["ranks"] for r in rows if r["variant"] == "adalora" and r["ranks"]), {})
    sens = next((r["ranks"] for r in rows if r["variant"] in SENSITIVITY and r["ranks"]), {})
    paths = list(ada or sens)
    short = [
        p.split("layer.")[-1]
        .replace("attention.self.", "")
        .replace("attention.output.dense", "attn-out")
        .replace("intermediate.dense", "ffn-in")
        .replace("output.dense", "ffn-out")
        for p in paths
    ]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    x = range(len(paths))
    if ada:
        ax.bar([i - 0.2 for i in x], [ada[p] for p in paths], width=0.4, label="AdaLoRA (final)")
    if sens:
        ax.bar(
            [i + 0.2 for i in x],
            [sens.get(p, 0) for p in paths],
            width=0.4,
            label="sensitivity (LoRA part)",
        )
    ax.axhline(4, ls="--", c="k", lw=1, label="uniform LoRA r=4")
    ax.set_xticks(list(x), short, rotation=90, fontsize=7)
    ax.set_ylabel("rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=None, help="examples per split (reduced runs)")
    ap.add_argument(
        "--val-limit", type=int, default=None, help="validation examples (default: --limit)"
    )
    ap.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps per run (default: one epoch)"
    )
    ap.add_argument(
        "--trials", type=int, default=4, help="search trials (the first is uniform LoRA's config)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["uniform-lora", "adalora", "sensitivity", "searched"],
        choices=["uniform-lora", "adalora", *SENSITIVITY, "searched"],
    )
    ap.add_argument(
        "--out",
        default=None,
        help="search study directory, resumed if it exists (default: a temporary "
        "one with --no-write, else runs/bench_budget_search)",
    )
    ap.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS.md and bench/ untouched"
    )
    ap.add_argument(
        "--no-section",
        action="store_true",
        help="record the runs in bench/budget_runs.jsonl but leave RESULTS.md alone (partial runs)",
    )
    args = ap.parse_args()

    import deltatune as dt
    from deltatune.budget.search import POSITIONS, delta_parameters
    from deltatune.models import load_model

    probe = load_model("minilm", num_labels=3)
    dt.attach(probe.model, dt.LoRA(r=4, target_regex=POSITIONS["all"]), "probe")
    budget = delta_parameters(probe.model, "probe")
    print(
        f"budget: {budget:,} delta parameters (uniform LoRA r=4 on the encoder's Linear layers)",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench_budget_")) if args.no_write else None
    out = (
        Path(args.out)
        if args.out
        else (scratch / "search" if scratch else ROOT / "runs" / "bench_budget_search")
    )
    searched, summary = (
        search_best(args, budget, out) if "searched" in args.variants else (None, None)
    )
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            row = cached_run(
                variant, seed, args, budget, searched if variant == "searched" else None
            )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    lines = [
        "| variant | delta parameters | % of budget | val accuracy | test accuracy (mean ± std) "
        "| per seed | − uniform LoRA (test) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["seed"]: r["accuracy"] * 100 for r in rows if r["variant"] == "uniform-lora"}
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        accs = [r["accuracy"] * 100 for r in mine]
        vals = [r["val_accuracy"] * 100 for r in mine]
        params = mine[0]["params"]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = f"searched: {searched.key}" if variant == "searched" else variant
        diffs = [r["accuracy"] * 100 - base[r["seed"]] for r in mine if r["seed"] in base]
        gap = "—"
        if variant != "uniform-lora" and diffs:
            mean = statistics.mean(diffs)
            gap = f"{mean:+.2f} ({'≥ uniform' if mean >= 0 else 'loses'})"
        lines.append(
            f"| {name} | {params:,} | {100 * params / budget:.1f} | {statistics.mean(vals):.2f} | "
            f"{statistics.mean(accs):.2f} ± {std:.2f} | {' / '.join(f'{a:.2f}' for a in accs)} | "
            f"{gap} | {len(accs)} |"
        )
    png = plot_ranks(rows, (scratch or ROOT / "bench") / "budget_ranks.png")
    cmd = (
        "`.venv/bin/python bench/bench_budget.py "
        + " ".join(a for a in sys.argv[1:] if a != "--no-write")
        + "`"
    )
    body = (
        f"Command: {cmd} (MiniLM-L6, {DATA}, batch {args.batch_size}, {rows[0]['steps']} steps per "
        f"run, examples per split: {args.limit or 'all'}; learning rates: "
        f"{', '.join(f'{k} {v}' for k, v in LR.items() if v)}, searched: uniform LoRA's; "
        f"budget {budget:,} delta parameters = uniform LoRA r=4 on all 36 encoder Linear "
        "layers; head trained and not counted; AdaLoRA 6 → 4 with tinit / tfinal / delta_t = "
        f"{rows[0]['steps'] // 10} / {2 * rows[0]['steps'] // 5} / {max(1, rows[0]['steps'] // 50)}"
        " steps, orthogonality weight 0.1; every run in `bench/budget_runs.jsonl`).\n\n"
        + "\n".join(lines)
        + (
            f"\n\nSearch (reduced: LoRA only, positions qv / attn / ffn / all × rank 1-16, alpha "
            f"2r, {len(summary_keys(summary))} of the configurations within the budget trained, "
            f"uniform LoRA's first; picked on validation accuracy): {summary['trials_done']} "
            f"trials, Pareto front:\n\n{summary['table']}"
            if summary
            else ""
        )
        + f"\n\nPer-matrix ranks (seed 0): `{png.relative_to(ROOT) if not scratch else png}`."
    )
    print(body)
    if not (args.no_write or args.no_section):
        from _results import write_section

        write_section(
            "Parameter budgets: uniform LoRA vs AdaLoRA vs sensitivity vs search (issue 10)", body
        )


if __name__ == "__main__":
    main()
