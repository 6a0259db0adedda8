"""DPO after SFT on SmolLM2: the settings (RPO weight, β, lr) compared on the VALIDATION split,
where bench/bench_llm.py's ``dpo`` part measures the chosen default on test.

    .venv/bin/python bench/bench_llm_dpo_val.py --task tweet-sentiment-chat \\
        --configs 0.1,5e-4,0 0.1,5e-4,1

Each config (``beta,lr,rpo_alpha``) starts from the cached seed-0 SFT adapter of bench_llm.py
(.cache/bench_llm/runs/sft-TASK-0/adapter; run ``bench/bench_llm.py --only sft --seeds 0`` first),
trains DPO as ``deltatune train --from-adapter`` does (reference: a frozen copy of the SFT
adapter; batch 8 pairs; gradient checkpointing; the bench's steps and training pairs), and is
scored on the validation split: exact match and the reference answer's mean token NLL
(``completion_loss``) on ``--val`` chat prompts, reward accuracy (against the base model, as
``deltatune eval``) on ``--val`` preference pairs, plus what the model answered. One process, one
model load; the SFT adapter itself is the first row. Rows are appended to
.cache/bench_llm/dpo_val.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / ".cache" / "bench_llm" / "dpo_val.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="tweet-sentiment-chat")
    p.add_argument("--configs", nargs="+", default=["0.1,5e-4,0", "0.1,5e-4,1"],
                   help="beta,lr,rpo_alpha per config")
    p.add_argument("--val", type=int, default=100, help="validation prompts and pairs scored")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import bench_llm as B

    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.lm.evaluate import evaluate_generation, reward_accuracy
    from deltatune.lm.objectives import frozen_reference
    from deltatune.lm.tokenize import preference_collate
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, fit

    task, s = args.task, B.SETTINGS[args.task]
    adapter = B.RUNS / f"sft-{task}-0" / "adapter"
    if not adapter.is_dir():
        print(f"no SFT adapter at {adapter}: run bench/bench_llm.py --only sft --seeds 0 first")
        return 1
    entry = load_model("smollm2")
    tok = entry.collate.tokenizer
    model = entry.model
    dt.load_adapter(model, adapter, name="default")
    reference = frozen_reference(model, adapter)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train = load_data(B.pref(task), "train", seed=0, limit=s["dpo_limit"])
    val_chat = load_data(task, "val", seed=0, limit=args.val)
    val_pref = load_data(B.pref(task), "val", seed=0, limit=args.val)
    collate = preference_collate(tok, 256)

    def score(label: str, extra: dict) -> None:
        model.eval()
        t0 = time.time()
        gen = evaluate_generation(model, tok, val_chat, max_new_tokens=B.MAX_NEW)
        acc = reward_accuracy(model, tok, val_pref, 0.1)
        answers = collections.Counter(r["prediction"].strip().lower()[:20]
                                      for r in gen.predictions)
        row = {"task": task, "config": label, **extra, "val": args.val,
               "exact_match": gen.metrics["exact_match"],
               "completion_loss": gen.metrics["completion_loss"],
               "reward_accuracy": acc.metrics["reward_accuracy"],
               "logprob_accuracy": acc.metrics["logprob_accuracy"],
               "chosen_reward": acc.metrics["chosen_reward"],
               "rejected_reward": acc.metrics["rejected_reward"],
               "answers": dict(answers.most_common(8)), "eval_s": time.time() - t0}
        print(json.dumps(row), flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")

    score("sft", {})
    for config in args.configs:
        beta, lr, alpha = (float(v) for v in config.split(","))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        cfg = TrainConfig(objective="dpo", dpo_beta=beta, rpo_alpha=alpha, lr=lr,
                          max_steps=s["dpo_steps"], batch_size=B.BATCH, seed=0,
                          gradient_checkpointing=True)
        t0 = time.time()
        run = OUT.parent / "dpo_val_runs" / f"{task}-{config}"
        fit(model, train, collate, cfg, task="causal-lm", reference=reference, out_dir=run)
        metrics = json.loads((run / "metrics.json").read_text())
        steps = [{k: round(float(v), 4) for k, v in st.items()
                  if k in ("rewards_chosen", "rewards_rejected", "nll_chosen", "loss")}
                 for st in metrics.get("steps") or []]
        score(f"dpo beta {beta:g} lr {lr:g} rpo_alpha {alpha:g}",
              {"beta": beta, "lr": lr, "rpo_alpha": alpha, "train_s": time.time() - t0,
               "steps": steps})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
