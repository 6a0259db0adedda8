"""Merging the tweet and BBC chat LoRAs into one adapter, the merge chosen on validation prompts
(issue 20). Run by ``bench/bench_llm.py --only merge``; on its own:

    .venv/bin/python bench/bench_llm_merge.py TWEET_ADAPTER BBC_ADAPTER OUT --json FILE

Why a search: the plain sum of the two LoRAs (task arithmetic, λ = 1 each) lost 19% of the tweet
adapter's exact match and 56% of the BBC one's: both deltas sit on the same q_proj/v_proj
layers of every block, so on a tweet the BBC delta still fires (and the other way round), and the
two "answer with one word" directions they share add up to twice their size. Which remedy works
is an empirical question, so every candidate below is scored on each task's VALIDATION prompts
(the test prompts are never looked at) and the one with the best worst-task ratio
merged / adapter alone is saved to OUT for ``deltatune eval`` on the test split:

* task arithmetic with a weight λ per task on a small grid (``lora_concat``: exact);
* TIES and DARE-TIES on the dense ΔW's (deltatune's merge methods), stored at rank 64;
* RegMean (``regmean``): per layer, the ΔW minimising Σ_k ||X_k ΔW^T − X_k ΔW_k^T||² over each
  task's own layer inputs X_k (Gram matrices from training conversations, each with its own
  adapter on): the merge keeps each delta's effect on its own task's inputs, which is the
  subspace the other task's inputs should not disturb. Its result has rank ≤ 16 (each term
  ΔW_k G_k has rank ≤ 8), so rank 16 stores it exactly.

Greedy answers of at most ``--max-new-tokens`` tokens, exact match after strip + case fold, as
``deltatune eval`` scores them. Writes ``--json``: every candidate's val exact match per task,
the adapters alone on the same prompts, and the chosen one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("tweet-sentiment-chat", "bbc-news-chat")
#: (λ tweet, λ bbc) tried by task arithmetic; (1, 1) is the plain sum
GRID = [(1.0, 1.0), (0.5, 0.5), (0.75, 0.75), (1.0, 0.5), (0.5, 1.0)]


def tokenizer_of(entry):
    return getattr(entry.collate, "tokenizer", None) or getattr(entry, "tokenizer", None)


def val_exact_match(model, tokenizer, examples, name: str | None, max_new: int) -> float:
    """Exact match of greedy answers with delta ``name`` alone active (None: as the model is)."""
    from deltatune.lm.evaluate import chat_reference, normalize
    from deltatune.lm.generate import generate

    refs = [chat_reference(e) for e in examples]
    answers = generate(model, tokenizer, [p for p, _ in refs], adapters=name,
                       max_new_tokens=max_new, batch_size=16)
    return sum(normalize(g.text) == normalize(r) for (_, r), g in zip(refs, answers)) / len(refs)


def layer_grams(model, tokenizer, name: str, examples) -> dict[str, torch.Tensor]:
    """Mean xᵀx of the inputs of every host that delta ``name`` changes (keyed ``PATH.weight``),
    over whole training conversations run with ``name`` alone active."""
    import deltatune as dt
    from deltatune.core.host import iter_hosts
    from deltatune.lm.generate import causal_lm
    from deltatune.lm.template import render

    lm = causal_lm(model)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(key: str):
        def collect(module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]
        return collect

    handles = [host.register_forward_pre_hook(hook(f"{path}.weight"))
               for path, host in iter_hosts(model) if name in host.delta_names()]
    before = dt.active(model)
    dt.set_active(model, name)
    try:
        with torch.inference_mode():
            for ex in examples:
                text = render(tokenizer, ex["messages"], None, add_generation_prompt=False)
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                lm(input_ids=ids[:, :256])
    finally:
        dt.set_active(model, before)
        for h in handles:
            h.remove()
    return {k: (sums[k] / rows[k]).float() for k in sums}


def regmean_vector(vectors, grams, alpha: float):
    """RegMean of the dense ΔW's with deltatune's ``regmean`` (off-diagonals of each Gram scaled
    by ``alpha``), factored at rank 16 (exact: the merge of two rank-8 deltas has rank ≤ 16)."""
    from deltatune.algebra import regmean
    from deltatune.algebra.task_vector import TaskVector

    out = {}
    for key in vectors[0]:
        taus = [v[key].dense().float() if hasattr(v[key], "dense") else v[key] for v in vectors]
        out[key] = regmean(None, taus, weight=[1.0] * len(taus),
                           stats=[g[key] for g in grams], alpha=alpha)
    return TaskVector(out).to_rank(16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapters", nargs=2, type=Path, help="the tweet and the BBC adapter")
    ap.add_argument("out", type=Path, help="where the chosen merge is saved (peft layout)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--val", type=int, default=100, help="validation prompts per task")
    ap.add_argument("--gram", type=int, default=48, help="training conversations per task")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="candidate labels to try (default: all)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the scores already in --json (same settings) and try the rest")
    args = ap.parse_args(argv)

    import deltatune as dt
    from deltatune import algebra as alg
    from deltatune.algebra.compose import attach_lowrank
    from deltatune.algebra.task_vector import TaskVector
    from deltatune.data import load_data
    from deltatune.models import load_model

    tick = time.perf_counter()
    entry = load_model("smollm2")
    model, tokenizer = entry.model, tokenizer_of(entry)
    names = ["tweet", "bbc"]
    for n, path in zip(names, args.adapters):
        dt.load_adapter(model, path, name=n, activate=False)
    val = {t: load_data(t, "val", seed=0, limit=args.val).examples for t in TASKS}
    report: dict = {"val_prompts": {t: len(v) for t, v in val.items()},
                    "max_new_tokens": args.max_new_tokens, "candidates": []}
    old = json.loads(args.json.read_text()) if args.resume and args.json.exists() else {}
    if {k: old.get(k) for k in ("val_prompts", "max_new_tokens")} == {
            k: report[k] for k in ("val_prompts", "max_new_tokens")}:
        report["candidates"] = old.get("candidates", [])
        report["alone"] = old.get("alone")
    done = {r["label"] for r in report["candidates"]}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)

    def score(name: str) -> dict[str, float]:
        return {t: val_exact_match(model, tokenizer, val[t], name, args.max_new_tokens)
                for t in TASKS}

    alone = report.get("alone") or {
        t: val_exact_match(model, tokenizer, val[t], n, args.max_new_tokens)
        for t, n in zip(TASKS, names)}
    report["alone"] = alone
    save()
    print(f"alone (val): {alone}", flush=True)

    factored = [TaskVector.from_adapter(model, n, factored=True, copies=False) for n in names]
    dense = [v.dense() for v in factored]
    grams: list = []

    def regmean_of(alpha: float):
        if not grams:  # Gram matrices once, on training conversations of each task
            train = {t: load_data(t, "train", seed=0, limit=args.gram).examples for t in TASKS}
            grams.extend(layer_grams(model, tokenizer, n, train[t]) for t, n in zip(TASKS, names))
        return regmean_vector(factored, grams, alpha)

    def candidates():
        for lt, lb in GRID[:1]:
            yield (f"task arithmetic λ=({lt:g}, {lb:g})",
                   lambda lt=lt, lb=lb: alg.merge_task_vectors(factored, "lora_concat",
                                                               weight=[lt, lb]))
        yield ("RegMean α=0.9", lambda: regmean_of(0.9))
        for lt, lb in GRID[1:]:
            yield (f"task arithmetic λ=({lt:g}, {lb:g})",
                   lambda lt=lt, lb=lb: alg.merge_task_vectors(factored, "lora_concat",
                                                               weight=[lt, lb]))
        yield ("TIES (density 0.5, λ=1) rank 64",
               lambda: alg.merge_task_vectors(dense, "ties", rank=64, weight=[1.0, 1.0],
                                              density=0.5))
        yield ("DARE-TIES (density 0.5, λ=1) rank 64",
               lambda: alg.merge_task_vectors(dense, "dare_ties", rank=64, weight=[1.0, 1.0],
                                              density=0.5))
        yield ("RegMean α=0.5", lambda: regmean_of(0.5))

    for label, make in candidates():
        if label in done or args.only and not any(o in label for o in args.only):
            continue
        vector = make()
        attach_lowrank(model, vector, "m", activate=False)
        em = score("m")
        dt.detach(model, "m")
        ratio = {t: em[t] / alone[t] if alone[t] else None for t in TASKS}
        row = {"label": label, "val": em, "ratio": ratio,
               "worst": min(r for r in ratio.values() if r is not None)}
        report["candidates"].append(row)
        save()
        print(f"{label}: {em} ratios {ratio}", flush=True)

    best = max(report["candidates"],
               key=lambda r: (r["worst"], sum(r["val"].values())))
    report["chosen"] = best["label"]
    make = dict(candidates())[best["label"]]
    attach_lowrank(model, make(), "merged", activate=False)
    dt.save_adapter(model, args.out, name="merged", format="peft")
    report["seconds"] = time.perf_counter() - tick
    save()
    print(f"chosen: {best['label']} (val worst ratio {best['worst']:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
