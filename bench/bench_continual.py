"""Continual adaptation benchmark (issue 9): every strategy on three streams; average accuracy and
forgetting.

    .venv/bin/python bench/bench_continual.py  # reduced form, as in RESULTS.md
    .venv/bin/python bench/bench_continual.py --steps 150 --limit 4000 --max-length 128   # larger
    .venv/bin/python bench/bench_continual.py --streams mnist-corruptions --strategies replay lae

Streams: BBC News topics in 3 class-incremental tasks (MiniLM, task id hidden at test time), tweet
sentiment over the domains airlines -> nfl -> apple -> cars (MiniLM), MNIST under fog -> zoom blur
-> contrast -> impulse noise at severity 3 (the small BatchNorm CNN, first trained for 2 epochs on
20,000 clean MNIST digits, since it has no bundled weights). Every strategy trains LoRA (r=8 on
query,value for MiniLM; r=4 on the CNN's convolutions) plus the classification head, the same number
of optimizer steps per task; joint trains once on all tasks with that many steps per task in total.
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

STRATEGIES = ["sequential", "joint", "replay", "ewc", "lwf", "lae", "zscl", "merge", "olora"]
#: stream → (model, LoRA options, learning rate, batch size)
STREAMS = {
    "bbc-news-classinc": ("minilm", {"r": 8, "alpha": 16, "targets": ("query", "value")}, 1e-3, 16),
    "tweet-domains": ("minilm", {"r": 8, "alpha": 16, "targets": ("query", "value")}, 1e-3, 16),
    "mnist-corruptions": ("small-cnn", {"r": 4, "alpha": 8, "target_types": ("Conv2d",)}, 3e-3, 32),
}
PET = ("replay", "ewc", "lwf", "lae", "zscl", "merge", "olora")
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
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per task")
    ap.add_argument(
        "--limit",
        type=int,
        default=2000,
        help="training examples drawn per data set (then split by task)",
    )
    ap.add_argument("--limit-test", type=int, default=600, help="test examples drawn per data set")
    ap.add_argument("--max-length", type=int, default=64, help="MiniLM tokens")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="re-run every (stream, strategy) instead of reusing cached rows",
    )
    args = ap.parse_args()
    settings = f"steps{args.steps}-limit{args.limit}-test{args.limit_test}-len{args.max_length}"
    cache_file = CACHE / f"rows-{settings}.json"
    cached = {} if args.fresh or not cache_file.exists() else json.loads(cache_file.read_text())

    import torch

    import deltatune as dt
    from deltatune import continual as cl
    from deltatune.models import load_model
    from deltatune.train import TrainConfig

    sections = []
    t_all = time.time()
    for name in args.streams:
        model_name, lora, lr, batch = STREAMS[name]
        stream = cl.make_stream(name, limit_train=args.limit, limit_test=args.limit_test)
        rows = {}
        for strategy in args.strategies:
            opts = OPTIONS.get((name, strategy), {})
            key = f"{name}/{strategy}/{json.dumps(opts, sort_keys=True)}"
            if (
                key in cached
            ):  # rows of an earlier run with the same settings (so runs resume stream by stream)
                rows[strategy] = cl.ContinualResult(**cached[key])
                continue
            torch.manual_seed(0)
            options = {"max_length": args.max_length} if model_name == "minilm" else {}
            entry = load_model(model_name, num_labels=len(stream.label_names), **options)
            if (
                model_name == "small-cnn"
            ):  # the CNN has no bundled weights: pretrain it on clean MNIST once
                entry.model.load_state_dict(_pretrained_cnn(entry))
            cfg = TrainConfig(max_steps=args.steps, batch_size=batch, lr=lr, seed=0, progress=False,
                              eval_each_epoch=False, keep_best=False)
            r = cl.run_stream(entry.model, entry.collate, stream,
                              cl.make_strategy(strategy, **opts), cfg,
                              spec=dt.LoRA(**lora), head=entry.head)
            rows[strategy] = r
            cached[key] = r.to_dict()
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached))
            tmp.replace(cache_file)
            print(
                name,
                strategy,
                f"avg {r.average_accuracy:.4f} forgetting {r.forgetting}",
                f"{r.seconds:.0f}s",
                flush=True,
            )
        lines = [
            "| strategy | average accuracy % | forgetting (pt) | backward transfer (pt) | final "
            "row (%) | time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for s, r in rows.items():
            f = "—" if r.forgetting is None else f"{100 * r.forgetting:.1f}"
            b = "—" if r.backward_transfer is None else f"{100 * r.backward_transfer:.1f}"
            lines.append(
                f"| {s} | {100 * r.average_accuracy:.2f} | {f} | {b} | "
                f"{' / '.join(f'{100 * a:.0f}' for a in r.accuracy_matrix[-1])} | {r.seconds:.0f} |"
            )
        verdict = _verdict(rows)
        sections.append(
            f"**{name}** ({stream.scenario}-incremental, {model_name}; tasks: "
            f"{' -> '.join(t.name for t in stream.tasks)}; train/test examples per task: "
            f"{', '.join(f'{len(t.train)}/{len(t.test)}' for t in stream.tasks)})\n\n"
            + "\n".join(lines)
            + f"\n\n{verdict}"
        )
        _write(
            name, sections[-1], args, time.time() - t_all
        )  # after each stream, so a long run leaves its tables


def _write(stream: str, section: str, args, seconds: float) -> None:
    """One RESULTS.md section per stream, so a run of some streams leaves the others' tables in
    place."""
    cmd = (
        "`.venv/bin/python bench/bench_continual.py" + "".join(" " + a for a in sys.argv[1:]) + "`"
    )
    body = (
        f"Command: {cmd} ({args.steps} optimizer steps per task, MiniLM at {args.max_length} "
        f"tokens, {seconds:.0f} s from the start of the run to the end of this stream, on the "
        "shared 2-core machine; cached rows of an earlier run with the same settings are reused). "
        + __doc__.split("Streams:")[1].strip().replace("\n", " ")
        + " Strategy options (the others at their defaults): "
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

        write_section(f"Continual adaptation (issue 9): {stream}", body)


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


def _verdict(rows) -> str:
    seq, joint = rows.get("sequential"), rows.get("joint")
    pets = {s: r for s, r in rows.items() if s in PET}
    if not (seq and joint and pets):
        return ""
    best = max(pets, key=lambda s: pets[s].average_accuracy)
    r = pets[best]
    ok_f = (
        r.forgetting is not None
        and seq.forgetting is not None
        and r.forgetting <= seq.forgetting / 2
    )
    ok_a = joint.average_accuracy - r.average_accuracy <= 0.05
    return (
        f"Best PET strategy by average accuracy: **{best}** — forgetting {100 * r.forgetting:.1f} "
        f"pt vs sequential {100 * seq.forgetting:.1f} pt ({'≤' if ok_f else '>'} half: aim "
        f"{'met' if ok_f else 'NOT met'}); average accuracy {100 * r.average_accuracy:.1f}% vs "
        f"joint {100 * joint.average_accuracy:.1f}% ({'within' if ok_a else 'more than'} 5 points: "
        f"aim {'met' if ok_a else 'NOT met'})."
    )


if __name__ == "__main__":
    main()
