"""Budget benchmark (issue 10): uniform LoRA vs AdaLoRA vs sensitivity allocation vs the best
searched config, tweet-sentiment, MiniLM, at one parameter budget.

    # 3 seeds, 1 epoch, 12 search trials
    .venv/bin/python bench/bench_budget.py
    # reduced
    .venv/bin/python bench/bench_budget.py --seeds 0 --limit 400 --max-steps 60 --trials 4
    # smoke
    .venv/bin/python bench/bench_budget.py --limit 16 --max-steps 2 --seeds 0 --trials 2 --no-write

The budget is the delta parameters of uniform LoRA r=4 on every Linear layer of the encoder's blocks
(36 matrices, 165,888 parameters; the new head trains in every variant and is not counted). AdaLoRA
starts at rank 6 and is pruned to 4 on average (its λ add one parameter per triplet; alpha 12, so
its scaling 12 / 6 equals uniform LoRA's 8 / 4); the sensitivity allocation (SPT-style, 8 batches
of the training split) spends the budget on LoRA ranks and sparse entries; the searched config is
the best validation accuracy of a `deltatune.budget.search` study over LoRA / AdaLoRA / (IA)³ /
bottleneck configurations within the budget (seed 0), then retrained on every seed. Same data split,
steps, batch size and schedule per seed; test accuracy, mean ± std.
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


def _splits(seed: int, limit: int | None):
    from deltatune.data import load_data

    return {s: load_data(DATA, s, seed=seed, limit=limit) for s in ("train", "val", "test")}


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
                tfinal=steps // 5,
                trainable_modules=head,
            ),
            "default",
        )
        return [AdaLoRASchedule("default")], LR[variant], delta_parameters(model, "default"), None
    if variant == "sensitivity":
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

        alloc = allocate_sensitivity(model, batches, budget, loss, paths=paths)
        ranks = {
            r.path: r.rank for r in alloc.rows if r.rank
        }  # scaling alpha / r = 2 as uniform LoRA's
        alloc.attach(
            model,
            "default",
            alpha_pattern={p: 2.0 * r for p, r in ranks.items()},
            trainable_modules=head,
        )
        return [], LR[variant], alloc.used, {r.path: r.rank for r in alloc.rows}
    cand = searched
    dt.attach(model, cand.spec(head), "default")
    callbacks = [AdaLoRASchedule("default", total_step=steps)] if cand.method == "adalora" else []
    from deltatune.budget.search import SearchSpace

    return callbacks, SearchSpace().lr.get(cand.method, 5e-4), cand.params, None


def run(variant: str, seed: int, args, budget: int, searched=None) -> dict:
    import torch

    from deltatune.budget import final_ranks
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, evaluate, fit

    torch.manual_seed(seed)
    splits = _splits(seed, args.limit)
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
    test = evaluate(entry.model, splits["test"], entry.collate, task=entry.task)
    if variant == "adalora" or (variant == "searched" and searched.method == "adalora"):
        ranks = final_ranks(entry.model, "default")
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": test["accuracy"],
        "params": params,
        "steps": steps,
        "ranks": ranks,
        "seconds": time.time() - t0,
        "config": searched.key if searched else None,
    }


def search_best(args, budget: int, out: Path):
    """The searched config: the best validation accuracy of a study within the budget (seed 0)."""
    from deltatune.budget.search import (
        SearchSetup,
        SearchSpace,
        candidates,
        run_search,
        text_trainer,
    )
    from deltatune.models import load_model

    splits = _splits(0, args.limit)
    entry = load_model("minilm", num_labels=len(splits["train"].label_names))
    space = SearchSpace()
    cands = candidates(entry.model, space, budget, tuple(entry.head))
    setup = SearchSetup(
        model="minilm",
        data=DATA,
        budget=budget,
        trials=args.trials,
        max_steps=args.max_steps or 200,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=0,
    )
    summary = run_search(setup, cands, text_trainer(setup, space), out, resume=True, progress=print)
    best = summary["best"]
    return next(c for c in cands if c.key == best["key"]), summary


def plot_ranks(rows: list[dict], path: Path) -> Path:
    """Per-matrix ranks: AdaLoRA's final ranks and the sensitivity allocation's, against uniform r=4
    (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.io.files import save_figure

    ada = next((r["ranks"] for r in rows if r["variant"] == "adalora" and r["ranks"]), {})
    sens = next((r["ranks"] for r in rows if r["variant"] == "sensitivity" and r["ranks"]), {})
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
        "--max-steps", type=int, default=None, help="optimizer steps per run (default: one epoch)"
    )
    ap.add_argument(
        "--trials", type=int, default=12, help="search trials (each trains --max-steps, or 200)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--variants", nargs="+", default=["uniform-lora", "adalora", "sensitivity", "searched"]
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
            row = run(variant, seed, args, budget, searched if variant == "searched" else None)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    lines = [
        "| variant | delta parameters | % of budget | test accuracy (mean ± std) | seeds |",
        "|---|---|---|---|---|",
    ]
    for variant in args.variants:
        accs = [r["accuracy"] * 100 for r in rows if r["variant"] == variant]
        params = next(r["params"] for r in rows if r["variant"] == variant)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = f"searched: {searched.key}" if variant == "searched" else variant
        lines.append(
            f"| {name} | {params:,} | {100 * params / budget:.1f} | {statistics.mean(accs):.2f} ± "
            f"{std:.2f} | {len(accs)} |"
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
        f"{', '.join(f'{k} {v}' for k, v in LR.items() if v)}, searched: the search's own per "
        f"method; budget {budget:,} delta parameters = uniform LoRA r=4 on all 36 encoder Linear "
        "layers; head trained and not counted).\n\n"
        + "\n".join(lines)
        + (
            f"\n\nSearch: {summary['trials_done']} trials, Pareto front:\n\n{summary['table']}"
            if summary
            else ""
        )
        + f"\n\nPer-matrix ranks (seed 0): `{png.relative_to(ROOT) if not scratch else png}`."
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section(
            "Parameter budgets: uniform LoRA vs AdaLoRA vs sensitivity vs search (issue 10)", body
        )


if __name__ == "__main__":
    main()
