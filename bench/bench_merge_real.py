"""Merging on real data (issue 6): multi-task (BBC topics + tweet sentiment, each with its own head)
and multi-domain (one tweet-sentiment LoRA per domain) merges of MiniLM deltas.

    # reduced form, as in RESULTS.md
    .venv/bin/python bench/bench_merge_real.py
    # one part (its own RESULTS section)
    .venv/bin/python bench/bench_merge_real.py --parts multi-domain
    .venv/bin/python bench/bench_merge_real.py --max-length 128 --epochs 2 --limit 4000

(a) multi-task: one LoRA (r=8, query,value) and one full fine-tuning per task, each with its own new
head; the encoder changes are merged into one body and every task is evaluated with the merged body
and its own head. (b) multi-domain: one LoRA + head per domain (airlines, nfl, apple, cars) from the
same seeded head; the whole deltas (head included) are merged and evaluated on every domain and on
the held-out `other` domain. Normalised accuracy = merged accuracy / the task's own fine-tuned
model's accuracy, averaged over the tasks (domains). Hyper-parameters (TA λ, TIES/DARE density,
RegMean α) are picked on the validation splits; learned merging fits per-block coefficients by
entropy minimisation on unlabeled validation examples. Trained deltas are cached in
`.cache/bench_merge_real/`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
CACHE = ROOT / ".cache" / "bench_merge_real"

import torch  # noqa: E402
from torch import nn  # noqa: E402

DOMAINS = ("airlines", "nfl", "apple", "cars")
PARTS = ("multi-task", "multi-domain")
ABOUT = {
    "multi-task": (
        "(a) one LoRA (r=8, query,value) and one full fine-tuning per task, each with its own new "
        "head; the encoder changes are merged into one body and every task is evaluated with the "
        "merged body and its own head."
    ),
    "multi-domain": (
        "(b) one LoRA + head per domain (airlines, nfl, apple, cars) from the same seeded head; "
        "the whole deltas (head included) are merged and evaluated on every domain and on the "
        "held-out `other` domain. Fisher and RegMean merge the shared head with the body's "
        "statistics (each domain's statistics from its own model, own head included); the other "
        "methods average the head changes. The joint-training row is a reference, not a merge: one "
        "LoRA trained on the four domains' training examples together."
    ),
    "common": (
        "Normalised accuracy = merged accuracy / the task's own fine-tuned model's accuracy, "
        "averaged over the tasks (domains). Hyper-parameters (TA λ, TIES/DARE density, RegMean α) "
        "are picked on the validation splits; learned merging fits per-block coefficients (init "
        "0.3, Adam) by entropy minimisation on unlabeled validation examples of every task, taken "
        "in turn. Trained deltas are cached in `.cache/bench_merge_real/`."
    ),
}
HEADINGS = {"multi-task": "Merging on real data: multi-task (issue 6)",
            "multi-domain": "Merging on real data: multi-domain (issue 6)"}


class MultiHead(nn.Module):
    """One encoder (attribute ``encoder``, as in MeanPoolClassifier), a head per task; ``task``
    picks it."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.encoder, self.heads = encoder, nn.ModuleDict(heads)

    def forward(self, input_ids, attention_mask, task: str, labels=None, **_):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.heads[task]((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class Bound(nn.Module):
    def __init__(self, model: MultiHead, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, **batch):
        return self.model(task=self.task, **batch)


def entry(num_labels: int, max_length: int):
    from deltatune.models import load_model

    torch.manual_seed(0)  # the same new head for every delta of a task
    return load_model("minilm", num_labels=num_labels, max_length=max_length)


def train(name: str, data: str | list[str], kind: str, args, lr: float | None = None,
          class_weights: str | None = None) -> dict:
    """Train (or load from the cache) one delta: its encoder task vector, head tensors and own
    accuracy. ``data`` may be several data sets, trained on together (``--limit`` examples of
    each)."""
    import deltatune as dt
    from deltatune.algebra import TaskVector
    from deltatune.data import load_data
    from deltatune.io import load_tensors, save_tensors
    from deltatune.train import TrainConfig, fit

    lr = lr if lr is not None else (1e-3 if kind == "lora" else 5e-5)
    out = CACHE / (f"{name}-{kind}-L{args.max_length}-e{args.epochs}-n{args.limit}-lr{lr:g}"
                   + (f"-cw{class_weights}" if class_weights else ""))
    if not (out / "tv.safetensors").exists():
        if isinstance(data, str):
            train_set = load_data(data, "train", limit=args.limit)
        else:
            from deltatune.data import Dataset

            parts = [load_data(d, "train", limit=args.limit) for d in data]
            train_set = Dataset(
                " + ".join(data),
                parts[0].task,
                [ex for p in parts for ex in p.examples],
                parts[0].label_names,
            )
        e = entry(len(train_set.label_names), args.max_length)
        base = {k: v.clone() for k, v in e.model.state_dict().items()}
        if kind == "lora":
            dt.attach(
                e.model,
                dt.LoRA(
                    r=8, alpha=16, targets=["query", "value"], trainable_modules=["classifier"]
                ),
            )
        cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=16,
            lr=lr,
            seed=0,
            progress=False,
            eval_each_epoch=False,
            keep_best=False,
            class_weights=class_weights,
        )
        fit(e.model, train_set, e.collate, cfg, task=e.task)
        if kind == "lora":
            tv = TaskVector.from_adapter(e.model, "default")
        else:
            tv = TaskVector.from_state_dicts(base, e.model.state_dict())
        tv.save(out / "tv.safetensors")
        save_tensors(out / "labels.safetensors", {"n": torch.tensor([len(train_set.label_names)])})
    tv = TaskVectorLoad(out / "tv.safetensors")
    n = int(load_tensors(out / "labels.safetensors")["n"][0])
    return {"name": name, "data": data, "tv": tv, "labels": n}


def TaskVectorLoad(path):  # noqa: N802 - a loader with the class's name reads best at the call site
    from deltatune.algebra import TaskVector

    return TaskVector.load(path)


def split_head(tv):
    """(encoder task vector, head change) of a delta: the head is everything under
    ``classifier``."""
    from deltatune.algebra import TaskVector

    body = TaskVector({k: v for k, v in tv.items() if not k.startswith("classifier.")})
    head = {k.removeprefix("classifier."): v for k, v in tv.items() if k.startswith("classifier.")}
    return body, head


def build(
    tasks: list[dict], body_tv, heads: dict[str, dict], max_length: int
) -> tuple[MultiHead, dict]:
    """A MultiHead on the base encoder + ``body_tv``, one head per task (seeded init + its
    change)."""
    mods = {}
    base = None
    for t in tasks:
        e = entry(t["labels"], max_length)
        base = base or e
        head = e.model.classifier
        with torch.no_grad():
            for k, v in heads[t["name"]].items():
                getattr(head, k).add_(v)
        mods[t["name"]] = head
    model = MultiHead(base.model.encoder, mods)
    body_tv.apply_to(model)
    return model.eval(), {"collate": base.collate, "task": base.task}


def evaluate_all(
    model: MultiHead, meta: dict, evals: dict[str, tuple[str, object]]
) -> dict[str, float]:
    from deltatune.train import evaluate

    return {name: evaluate(Bound(model, head), data, meta["collate"], task=meta["task"])["accuracy"]
            for name, (head, data) in evals.items()}


def stats_batches(data, collate, n: int, task: str):
    ex = data.examples[:n]
    out = []
    for i in range(0, len(ex), 8):
        b = collate(ex[i:i + 8])
        b["task"] = task
        out.append(b)
    return out


def merges(tasks, base_model_fn, evals_val, evals_test, args, share_head: bool):
    """Every merge method's merged accuracies (test), with hyper-parameters picked on validation."""
    from deltatune.algebra import (
        TaskVector,
        diagonal_fisher,
        gram_matrices,
        learn_merge_coefficients,
        merge_state_dicts,
        merge_task_vectors,
    )

    bodies, heads = {}, {}
    for t in tasks:
        bodies[t["name"]], heads[t["name"]] = split_head(t["tv"])
    vectors = [bodies[t["name"]] for t in tasks]
    own_heads = dict(heads)
    if (
        share_head
    ):  # domains: one head; the average of the head changes (Fisher, RegMean: merged like the body)
        mean_head = {
            k: sum(heads[t["name"]][k] for t in tasks) / len(tasks) for k in heads[tasks[0]["name"]]
        }
        heads = {"shared": mean_head}
        head_tasks = [{"name": "shared", "labels": tasks[0]["labels"]}]
    else:
        head_tasks = tasks
    results, chosen = {}, {}

    def score(tv, which, head_changes=None):
        model, meta = build(
            head_tasks, tv, heads if head_changes is None else head_changes, args.max_length
        )
        accs = evaluate_all(model, meta, which)
        return accs

    def pick(method, grid, merge=None, head_changes=None):
        """Test accuracies of the grid point best on validation; ``merge(params)`` builds the task
        vector (default: ``merge_task_vectors`` with ``method``)."""
        best = None
        for params in grid:
            tv = merge(params) if merge else merge_task_vectors(vectors, method, **params)
            val = score(tv, evals_val, head_changes)
            mean = sum(val.values()) / len(val)
            if best is None or mean > best[0]:
                best = (mean, params, tv)
        chosen[method] = best[1]
        return score(best[2], evals_test, head_changes)

    # λ = 1/n is the plain average of the deltas (a uniform soup); 0.5 and 1 add them up more
    # strongly
    lambdas = sorted({round(1 / len(tasks), 4), 0.5, 1.0})
    results["task arithmetic"] = pick(
        "task_arithmetic", [{"lambda_": lam, "weight": 1.0} for lam in lambdas]
    )
    results["TIES"] = pick(
        "ties", [{"density": d, "weight": 1.0, "lambda_": 1.0} for d in (0.2, 0.5)]
    )
    results["DARE-TIES"] = pick(
        "dare_ties", [{"density": d, "weight": 1.0, "seed": 0} for d in (0.3, 0.6)]
    )
    # Fisher and RegMean need each fine-tuned model's statistics on its own training data
    names = sorted({k for v in vectors for k in v})
    if (
        share_head
    ):  # the shared head is merged with the body's statistics, each model keeping its own head
        names += [f"heads.shared.{k}" for k in heads["shared"]]
    sds, fishers, grams = [], [], []
    untouched, _ = build(
        head_tasks, TaskVector({}), {n: {} for n in heads}, args.max_length
    )  # the seeded heads as drawn
    base_sd = {k: v.detach().clone() for k, v in untouched.state_dict().items() if k in names}
    base_model, meta = build(
        head_tasks, TaskVector({}), heads, args.max_length
    )  # learned merging starts from it
    for t, tv in zip(tasks, vectors):
        head = "shared" if share_head else t["name"]
        model, _ = build(
            head_tasks,
            tv,
            {"shared": own_heads[t["name"]]} if share_head else heads,
            args.max_length,
        )
        from deltatune.data import load_data

        data = load_data(t["data"], "train", limit=args.stats)
        batches = stats_batches(data, meta["collate"], args.stats, head)
        fishers.append(
            diagonal_fisher(
                model, batches, params=names, labels=lambda b: b["labels"], max_samples=args.stats
            )
        )
        grams.append(gram_matrices(model, batches))
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items() if k in names})

    def to_tv(sd):
        return TaskVector({k: sd[k].float() - base_sd[k].float() for k in names})

    merged_head = (
        {"shared": {}} if share_head else None
    )  # the merged shared head is in the task vector
    results["Fisher"] = score(
        to_tv(merge_state_dicts("fisher", sds, stats=fishers)), evals_test, merged_head
    )
    gram_stats = [{k: g for k, g in gr.items() if k in names} for gr in grams]
    # α scales the Gram off-diagonals (the paper's default 0.9)
    results["RegMean"] = pick(
        "regmean",
        [{"alpha": a} for a in (0.5, 0.9, 1.0)],
        head_changes=merged_head,
        merge=lambda p: to_tv(
            merge_state_dicts("regmean", sds, base=base_sd, stats=gram_stats, **p)
        ),
    )
    # learned merging on unlabeled validation examples of every task
    per_task = []
    for head, data in evals_val.values():
        per_task.append(stats_batches(data, meta["collate"], args.stats, head))
        for b in per_task[-1]:
            b.pop("labels", None)
    # round robin over the tasks: the fit cycles through the batches, and may stop before the end of
    # the list
    unlabeled = [b for group in itertools.zip_longest(*per_task) for b in group if b is not None]
    learned = learn_merge_coefficients(
        base_model,
        vectors,
        unlabeled,
        granularity="block",
        steps=args.learn_steps,
        lr=args.learn_lr,
    )
    tv = TaskVector(
        {k: learned.state[k].float() - base_sd[k].float() for k in names if k in learned.state}
    )
    results["learned (AdaMerging, per block)"] = score(tv, evals_test)
    return results, chosen


def table(
    rows: dict[str, dict[str, float]], own: dict[str, float], cols: list[str]
) -> tuple[list[str], float]:
    lines = [
        "| method | " + " | ".join(cols) + " | normalised accuracy (mean) |",
        "|---" * (len(cols) + 2) + "|",
    ]
    best = 0.0
    for method, accs in rows.items():
        norm = sum(accs[c] / own[c] for c in cols) / len(cols)
        best = max(best, norm) if method != "individual" else best
        lines.append(
            f"| {method} | "
            + " | ".join(f"{100 * accs[c]:.1f}" for c in cols)
            + f" | {100 * norm:.1f}% |"
        )
    return lines, best


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=2000, help="training examples per task / domain")
    ap.add_argument(
        "--eval-limit", type=int, default=400, help="validation and test examples per task"
    )
    ap.add_argument(
        "--stats", type=int, default=64, help="examples for Fisher / Gram / learned merging"
    )
    ap.add_argument(
        "--learn-steps",
        type=int,
        default=100,
        help="Adam steps of learned merging (one batch of 8 each)",
    )
    ap.add_argument(
        "--learn-lr",
        type=float,
        default=1e-2,
        help="learning rate of the merge coefficients (init 0.3)",
    )
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument(
        "--domain-lr",
        type=float,
        default=3e-3,
        help="learning rate of the per-domain LoRAs (tweet-sentiment's, picked on validation in "
        "bench_accuracy)",
    )
    ap.add_argument(
        "--domain-class-weights",
        choices=["balanced", "none"],
        default="balanced",
        help="loss weights of the per-domain LoRAs: balanced (the domains' label priors differ, "
        "and the held-out domain's is unknown) or none",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    for part in args.parts:
        t0 = time.time()
        sections = multi_task(args) if part == "multi-task" else multi_domain(args)
        for text in sections:
            print(text, flush=True)
        shown = [a for a in sys.argv[1:] if a not in PARTS and a != "--parts"]
        cmd = (
            "`.venv/bin/python bench/bench_merge_real.py --parts "
            + part
            + "".join(" " + a for a in shown)
            + "`"
        )
        lr = (
            f", per-domain LoRA learning rate {args.domain_lr:g}, class weights "
            f"{args.domain_class_weights}"
            if part == "multi-domain"
            else ""
        )
        text = (
            f"Command: {cmd} (MiniLM at {args.max_length} tokens, {args.epochs} epoch(s), "
            f"{args.limit} training examples per task/domain{lr}, {args.eval_limit} "
            f"validation/test examples per task; {time.time() - t0:.0f} s). "
            + ABOUT[part]
            + " "
            + ABOUT["common"]
            + "\n\n"
            + "\n\n".join(sections)
        )
        if not args.no_write:
            from _results import write_section

            write_section(HEADINGS[part], text)


def multi_task(args) -> list[str]:
    from deltatune.data import load_data

    sections = []
    for kind in ("lora", "full"):
        tasks = [
            train("bbc", "bbc-news", kind, args),
            train("tweets", "tweet-sentiment", kind, args),
        ]
        ev = {
            t["name"]: {
                s: (t["name"], load_data(t["data"], s, limit=args.eval_limit))
                for s in ("val", "test")
            }
            for t in tasks
        }
        val = {n: e["val"] for n, e in ev.items()}
        test = {n: e["test"] for n, e in ev.items()}
        own = {}
        for t in tasks:
            body, head = split_head(t["tv"])
            model, meta = build([t], body, {t["name"]: head}, args.max_length)
            own[t["name"]] = evaluate_all(model, meta, {t["name"]: test[t["name"]]})[t["name"]]
        rows, chosen = merges(tasks, None, val, test, args, share_head=False)
        lines, best = table({"individual": own, **rows}, own, ["bbc", "tweets"])
        sections.append(
            f"**(a) multi-task, {'LoRA r=8' if kind == 'lora' else 'full fine-tuning'}** (test "
            f"accuracy %; picked on validation: {chosen})\n\n"
            + "\n".join(lines)
            + f"\n\nBest normalised accuracy: **{100 * best:.1f}%** (aim ≥ 90%)."
        )
    return sections


def multi_domain(args) -> list[str]:
    from deltatune.data import load_data

    tasks = [
        train(
            d,
            f"tweet-sentiment:{d}",
            "lora",
            args,
            lr=args.domain_lr,
            class_weights=None
            if args.domain_class_weights == "none"
            else args.domain_class_weights,
        )
        for d in DOMAINS
    ]
    val = {
        d: ("shared", load_data(f"tweet-sentiment:{d}", "val", limit=args.eval_limit))
        for d in DOMAINS
    }
    test = {
        d: ("shared", load_data(f"tweet-sentiment:{d}", "test", limit=args.eval_limit))
        for d in (*DOMAINS, "other")
    }
    singles = {}
    for t in tasks:
        body, head = split_head(t["tv"])
        model, meta = build(
            [{"name": "shared", "labels": t["labels"]}], body, {"shared": head}, args.max_length
        )
        singles[t["name"]] = evaluate_all(model, meta, test)
    own = {d: singles[d][d] for d in DOMAINS}
    own["other"] = max(singles[d]["other"] for d in DOMAINS)
    # reference, not a merge: one LoRA trained on the four domains' training examples together
    joint = train(
        "joint-" + "-".join(DOMAINS),
        [f"tweet-sentiment:{d}" for d in DOMAINS],
        "lora",
        args,
        lr=args.domain_lr,
        class_weights=None if args.domain_class_weights == "none" else args.domain_class_weights,
    )
    body, head = split_head(joint["tv"])
    model, meta = build(
        [{"name": "shared", "labels": joint["labels"]}], body, {"shared": head}, args.max_length
    )
    references = {f"single: {d}": singles[d] for d in DOMAINS}
    references["joint training (reference, not a merge)"] = evaluate_all(model, meta, test)
    rows, chosen = merges(tasks, None, val, test, args, share_head=True)
    cols = [*DOMAINS, "other"]
    lines, _ = table({**references, **rows}, own, list(DOMAINS))
    lines[0] = lines[0].replace(
        " | normalised accuracy (mean) |",
        " | other | normalised accuracy (mean over the 4 domains) |",
    )
    lines[1] = "|---" * (len(cols) + 2) + "|"
    fixed = lines[:2]
    for line, (method, accs) in zip(lines[2:], list({**references, **rows}.items())):
        head, _, norm = line.rpartition(" | ")
        fixed.append(f"{head} | {100 * accs['other']:.1f} | {norm}")
    best_method = max(rows, key=lambda m: sum(rows[m][d] / own[d] for d in DOMAINS))
    best_single_other = max(singles[d]["other"] for d in DOMAINS)
    beats = [m for m in rows if rows[m]["other"] > best_single_other]
    return [
        "**(b) multi-domain, tweet sentiment, LoRA r=8 per domain** (test accuracy %; picked on "
        "validation: "
        f"{chosen})\n\n" + "\n".join(fixed) + "\n\nBest single-domain delta on `other`: "
        f"{100 * best_single_other:.1f}%. Merges above it on `other`: {', '.join(beats) or 'none'} "
        "(aim: the domain merge beats every single-domain delta). Best normalised accuracy: "
        f"{best_method}."
    ]


if __name__ == "__main__":
    main()
