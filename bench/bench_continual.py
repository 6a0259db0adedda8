"""Continual adaptation benchmark (issues 9, 22): every strategy on three streams; average accuracy
and forgetting.

    .venv/bin/python bench/bench_continual.py  # reduced form, as in RESULTS.md
    .venv/bin/python bench/bench_continual.py --steps 150 --limit 4000 --max-length 128   # larger
    .venv/bin/python bench/bench_continual.py --streams mnist-corruptions --strategies replay lae
    .venv/bin/python bench/bench_continual.py --held val --opt ewc:lam=3 --strategies ewc  # tuning

Streams: BBC News topics in 3 class-incremental tasks (MiniLM, task id hidden at test time), tweet
sentiment over the domains airlines -> nfl -> apple -> cars (MiniLM), MNIST under fog -> zoom blur
-> contrast -> impulse noise at severity 3 (the small BatchNorm CNN, first trained for 2 epochs on
20,000 clean MNIST digits, since it has no bundled weights). Every strategy trains LoRA (r=8 on
query,value for MiniLM; r=4 on the CNN's convolutions) plus the classification head, the same number
of optimizer steps per task; joint trains once on all tasks with that many steps per task in total.
The prompt pools (l2p, dualprompt, coda-prompt) train a pool of 4-token soft prompts (--method
prompt) and the head on the frozen MiniLM; simplecil and ranpac train nothing (class means / ridge
on frozen features); aper trains the LoRA on the first task only; ease one LoRA per task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

STRATEGIES = ["sequential", "joint", "replay", "ewc", "lwf", "lae", "zscl", "merge", "olora",
              "simplecil", "aper", "ranpac", "ease", "l2p", "dualprompt", "coda-prompt"]
#: stream → (model, LoRA options, learning rate, batch size)
STREAMS = {
    "bbc-news-classinc": ("minilm", {"r": 8, "alpha": 16, "targets": ("query", "value")}, 1e-3, 16),
    # lr chosen on the validation stream (held='val'): at 1e-3 and at 2e-2 sequential fine-tuning
    # learns only each domain's majority class in 20 steps (its rows equal the class shares); at
    # 5e-3 it learns the sentiment of a domain (apple 69% after apple) before the next one
    "tweet-domains": ("minilm", {"r": 8, "alpha": 16, "targets": ("query", "value")}, 5e-3, 16),
    "mnist-corruptions": ("small-cnn", {"r": 4, "alpha": 8, "target_types": ("Conv2d",)}, 3e-3, 32),
}
REPLAY_FREE = ("ewc", "lwf", "lae", "zscl", "merge", "olora", "simplecil", "aper", "ranpac", "ease",
               "l2p", "dualprompt", "coda-prompt")
PET = ("replay", *REPLAY_FREE)
OLD_LR = {"tweet-domains": 1e-3}  # the learning rate of rows cached without one in their key
FEATURE_ONLY = ("simplecil", "ranpac")  # train nothing: the learning rate does not matter
PROMPT_POOLS = ("l2p", "dualprompt", "coda-prompt")  # --method prompt, 4 virtual tokens
#: strategy options per stream (ZSCL's reference set: unlabeled data from outside the stream's
#: tasks)
OPTIONS = {
    ("mnist-corruptions", "replay"): {"buffer_size": 500, "replay_batch": 32},
    ("tweet-domains", "replay"): {"buffer_size": 500},
    ("bbc-news-classinc", "replay"): {"buffer_size": 500},
    ("tweet-domains", "zscl"): {"reference": "tweet-sentiment:other", "reference_size": 512},
    ("bbc-news-classinc", "zscl"): {"reference": "tweet-sentiment:other", "reference_size": 512},
    ("mnist-corruptions", "zscl"): {"reference": "digits", "reference_size": 512},
}
CACHE = ROOT / ".cache" / "bench_continual"


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    ap.add_argument("--limit", type=int, default=1000,
                    help="training examples drawn per data set (then split by task)")
    ap.add_argument("--limit-test", type=int, default=200, help="test examples drawn per data set")
    ap.add_argument("--max-length", type=int, default=32, help="MiniLM tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training seeds (initialisation, data order); the split stays seed 0")
    ap.add_argument("--held", choices=("test", "val"), default="test",
                    help="evaluate on the test split, or on the validation split (tuning; writes "
                         "nothing to RESULTS.md)")
    ap.add_argument("--opt", action="append", default=[], metavar="STRATEGY:KEY=VALUE",
                    help="override a strategy option (tuning), e.g. ewc:lam=3")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="only tabulate rows already measured (by any --tag) with these settings")
    ap.add_argument("--tag", default="",
                    help="write rows to a cache file of this tag (processes run side by side)")
    ap.add_argument("--fresh", action="store_true",
                    help="re-run every (stream, strategy) instead of reusing cached rows")
    args = ap.parse_args()
    settings = (f"steps{args.steps}-limit{args.limit}-test{args.limit_test}-len{args.max_length}"
                f"-{args.held}")
    cache_file = CACHE / f"rows-{settings}{'-' + args.tag if args.tag else ''}.json"
    cached: dict = {}
    if not args.fresh:  # every process's rows with these settings (parallel runs use --tag)
        for f in sorted(CACHE.glob(f"rows-{settings}*.json")):
            cached.update(json.loads(f.read_text()))
    overrides: dict[str, dict] = {}
    for o in args.opt:
        st, _, kv = o.partition(":")
        k, _, v = kv.partition("=")
        overrides.setdefault(st, {})[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v

    import torch

    import deltatune as dt
    from deltatune import continual as cl
    from deltatune.models import load_model
    from deltatune.train import TrainConfig

    t_all = time.time()
    for name in args.streams:
        model_name, lora, lr, batch = STREAMS[name]
        stream = cl.make_stream(name, limit_train=args.limit, limit_test=args.limit_test,
                                held=args.held)
        rows: dict[str, list] = {}
        skipped: dict[str, str] = {}
        for strategy in args.strategies:
            opts = {**OPTIONS.get((name, strategy), {}), **overrides.get(strategy, {})}
            for seed in args.seeds:
                key = f"{name}/{strategy}/{json.dumps(opts, sort_keys=True)}/seed{seed}"
                if lr != OLD_LR.get(name, lr) and strategy not in FEATURE_ONLY:
                    key += f"/lr{lr:g}"  # not the rows cached before this stream's lr moved
                if key in cached:  # rows of an earlier run with the same settings
                    if "skipped" in cached[key]:
                        skipped[strategy] = cached[key]["skipped"]
                    else:
                        rows.setdefault(strategy, []).append(cl.ContinualResult(**cached[key]))
                    continue
                if args.cached_only:
                    continue
                torch.manual_seed(seed)
                options = {"max_length": args.max_length} if model_name == "minilm" else {}
                entry = load_model(model_name, num_labels=len(stream.label_names), **options)
                if model_name == "small-cnn":  # no bundled weights: pretrained on clean MNIST
                    entry.model.load_state_dict(_pretrained_cnn(entry))
                cfg = TrainConfig(max_steps=args.steps, batch_size=batch, lr=lr, seed=seed,
                                  progress=False, eval_each_epoch=False, keep_best=False)
                spec = (dt.PromptTuning(num_virtual_tokens=4) if strategy in PROMPT_POOLS
                        else dt.LoRA(**lora))
                made = cl.make_strategy(strategy, **({"seed": seed, **opts}
                                                     if "seed" in _options(cl, strategy) else opts))
                try:
                    r = cl.run_stream(entry.model, entry.collate, stream, made, cfg, spec=spec,
                                      head=entry.head)
                except Exception as exc:  # noqa: BLE001 - a strategy that cannot run here
                    if strategy not in PROMPT_POOLS:
                        raise
                    skipped[strategy] = str(exc).splitlines()[0]
                    cached[key] = {"skipped": skipped[strategy]}
                else:
                    rows.setdefault(strategy, []).append(r)
                    cached[key] = r.to_dict()
                    print(name, strategy, seed, f"avg {r.average_accuracy:.4f} forgetting "
                          f"{r.forgetting}", f"{r.seconds:.0f}s", flush=True)
                CACHE.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(cached))
                tmp.replace(cache_file)
        section = _table(name, model_name, stream, rows, skipped, args.seeds)
        print(section, flush=True)
        if not args.no_write and args.held == "test":
            _write(name, section, args, time.time() - t_all)


def _options(cl, strategy: str) -> dict:
    return cl.STRATEGIES.get(strategy).options()


def _mean(values: list) -> float:
    return sum(values) / len(values)


def _table(name, model_name, stream, rows, skipped, seeds) -> str:
    n = len(seeds)
    lines = [
        f"| strategy | average accuracy %{' (mean ± sd over seeds)' if n > 1 else ''} | "
        "forgetting (pt) | final row (%) | time (s) |",
        "|---|---|---|---|---|",
    ]
    avg = {s: _mean([r.average_accuracy for r in rs]) for s, rs in rows.items()}
    for s, rs in rows.items():
        accs = [100 * r.average_accuracy for r in rs]
        sd = (sum((a - _mean(accs)) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 \
            if len(accs) > 1 else None
        fs = [r.forgetting for r in rs if r.forgetting is not None]
        f = f"{100 * _mean(fs):.1f}" if fs else "—"
        last = [_mean([r.accuracy_matrix[-1][j] for r in rs]) for j in range(len(stream.tasks))]
        lines.append(
            f"| {s} | {_mean(accs):.2f}{f' ± {sd:.2f}' if sd is not None else ''} | {f} | "
            f"{' / '.join(f'{100 * a:.0f}' for a in last)} | "
            f"{_mean([r.seconds for r in rs]):.0f} |"
        )
    for s, why in skipped.items():
        lines.append(f"| {s} | cannot run: {why.split(' (')[0]} | — | — | — |")
    return (
        f"**{name}** ({stream.scenario}-incremental, {model_name}; tasks: "
        f"{' -> '.join(t.name for t in stream.tasks)}; train/test examples per task: "
        f"{', '.join(f'{len(t.train)}/{len(t.test)}' for t in stream.tasks)}; seeds "
        f"{', '.join(map(str, seeds))})\n\n" + "\n".join(lines) + f"\n\n{_verdict(name, avg)}"
    )


def _write(stream: str, section: str, args, seconds: float) -> None:
    """One RESULTS.md section per stream, so a run of some streams leaves the others' tables in
    place."""
    argv = [a for a in sys.argv[1:] if a != "--cached-only"]  # the command that measures them
    cmd = "`.venv/bin/python bench/bench_continual.py" + "".join(" " + a for a in argv) + "`"
    body = (
        f"Command: {cmd} ({args.steps} optimizer steps per task, MiniLM at {args.max_length} "
        f"tokens, on the shared 2-core machine under a load average of {os.getloadavg()[0]:.0f} "
        "from other jobs when this table was written, one torch thread per process; rows measured "
        "side by side with --tag and tabulated from the cache; time (s) is each row's wall time "
        "under that load). "
        + __doc__.split("Streams:")[1].strip().replace("\n", " ")
        + f" Learning rate {STREAMS[stream][2]:g}, batch size {STREAMS[stream][3]}."
        + " Strategy options (the others at their defaults, chosen on the validation streams,"
        " `--held val`: see docs/continual.md): "
        + "; ".join(f"{st}: {o}" for (name, st), o in OPTIONS.items() if name == stream)
        + "."
        + ' BatchNorm statistics of the frozen CNN stay fixed (the trainer\'s default '
        '`norm_stats="auto"`).'
        + " Forgetting = mean over earlier tasks of (best accuracy before the last task − final "
        "accuracy).\n\n"
        + section
    )
    print(body, flush=True)
    if not args.no_write:
        from _results import write_section

        write_section(f"Continual adaptation (issues 9, 22): {stream}", body)


def _pretrained_cnn(entry) -> dict:
    """Weights of the small CNN after 2 epochs on clean MNIST (cached in
    .cache/bench_continual/)."""
    import torch

    from deltatune.data import load_data
    from deltatune.io import load_tensors, save_tensors
    from deltatune.train import TrainConfig, fit

    path = ROOT / ".cache" / "bench_continual" / "small-cnn-mnist.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        fit(
            entry.model,
            load_data("mnist", "train", limit=20000),
            entry.collate,
            TrainConfig(
                epochs=2,
                batch_size=64,
                lr=3e-3,
                progress=False,
                eval_each_epoch=False,
                keep_best=False,
            ),
            task=entry.task,
        )
        save_tensors(path, entry.model.state_dict())
    return load_tensors(path)


def _verdict(name: str, avg: dict[str, float]) -> str:
    """The issue-22 aims that this stream's table decides."""
    seq, joint = avg.get("sequential"), avg.get("joint")
    free = {s: a for s, a in avg.items() if s in REPLAY_FREE}
    if seq is None or not free:
        return ""
    best = max(free, key=free.get)
    below = [s for s in free if free[s] <= seq]
    out = [f"Best replay-free strategy: **{best}** {100 * free[best]:.1f}% (sequential "
           f"{100 * seq:.1f}%" + (f", joint {100 * joint:.1f}%)." if joint is not None else ").")]
    if name == "bbc-news-classinc" and joint is not None:
        ok = joint - free[best] <= 0.03
        out.append(f"Aim (a replay-free strategy within 3 points of joint): "
                   f"{'met' if ok else 'NOT met'} ({100 * (free[best] - joint):+.1f} pt vs joint).")
    if name == "tweet-domains":
        ok = free[best] - seq >= 0.05
        out.append("Aim (best replay-free ≥ 5 points above sequential): "
                   f"{'met' if ok else 'NOT met'} ({100 * (free[best] - seq):+.1f} pt).")
    out.append("Not above sequential here: " + (", ".join(below) if below else "none") + ".")
    return " ".join(out)


if __name__ == "__main__":
    main()
