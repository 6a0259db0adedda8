"""FSDP on two CPU processes against one process (issue 24): MiniLM on tweet-sentiment, LoRA and
full fine-tuning.

    nice -n 5 .venv/bin/python bench/bench_fsdp.py [--steps 8] [--rounds 2] [--write]

The same run twice: ``accelerate launch`` with 2 processes (gloo), FSDP2 sharding (``fsdp=True``),
8 examples per process, and one plain process with 16 examples per batch: the same global batch,
the same examples in the same order. Dropout is switched off (the two layouts would draw different
masks), so the saved deltas must agree up to float summation order. Reported: median step time
(after the first 2 steps) of each layout, the peak RSS of each process, and the largest absolute
difference between the two saved deltas (LoRA: ``delta.safetensors``; full: every weight).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _results import StepTimer  # noqa: E402

GLOBAL_BATCH = 16


def _padded(collate, length: int):
    """``collate`` with every [batch, time] tensor padded to ``length`` tokens (zeros: pad id and
    attention mask 0), so that both layouts run the same shapes."""
    import torch

    def pad(examples):
        batch = collate(examples)
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] < length:
                batch[key] = torch.nn.functional.pad(value, (0, length - value.shape[1]))
        return batch

    return pad


def worker(out: Path, kind: str, steps: int, pad_to: int = 0) -> None:
    import torch
    from accelerate import PartialState
    from safetensors.torch import save_file
    from torch import nn

    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, fit

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    world, rank = state.num_processes, state.process_index
    data = load_data("tweet-sentiment", "train", limit=steps * GLOBAL_BATCH, seed=0)
    torch.manual_seed(0)
    entry = load_model("minilm", num_labels=len(data.label_names))
    for m in entry.model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if kind == "lora":
        dt.attach(entry.model, dt.LoRA(r=8, alpha=16, dropout=0.0,
                                       targets=list(entry.default_targets),
                                       trainable_modules=list(entry.head)), name="default")
    else:
        entry.model.requires_grad_(True)
    timer = StepTimer(first_from_start=True)
    cfg = TrainConfig(max_steps=steps, batch_size=GLOBAL_BATCH // world, lr=5e-4 if kind == "lora"
                      else 5e-5, progress=False, eval_each_epoch=False, keep_best=False,
                      fsdp=True, seed=0)
    collate = _padded(entry.collate, pad_to) if pad_to else entry.collate
    fit(entry.model, data, collate, cfg, task=entry.task, callbacks=[timer])
    if rank == 0:
        if kind == "lora":
            dt.save_adapter(entry.model, out / "saved", name="default")
        else:
            (out / "saved").mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in entry.model.state_dict().items()},
                      str(out / "saved" / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "step_s": statistics.median(timer.times[2:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _launch(out: Path, kind: str, steps: int, world: int, pad_to: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--kind", kind, "--steps",
              str(steps), "--pad-to", str(pad_to)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} on {world} process(es) failed:\n{proc.stderr[-3000:]}")


def _max_diff(a: Path, b: Path) -> tuple[float, int]:
    from safetensors.torch import load_file

    name = "delta.safetensors" if (a / "delta.safetensors").exists() else "model.safetensors"
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys() and x, "the saved tensors differ in names, or are empty"
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x), len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kinds", default="lora,full")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--pad-to", type=int, default=0,
                    help="pad every batch to this many tokens (the same shapes in both layouts)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.kind, args.steps, args.pad_to)
        return
    base = ROOT / ".cache" / ("bench_fsdp" + (f"_pad{args.pad_to}" if args.pad_to else ""))
    lines = ["| fine-tuning | step 2 proc / 1 proc | peak RSS per process (2 proc) | peak RSS "
             "(1 proc) | RSS per process / 1 proc | max abs delta diff | tensors saved |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for kind in args.kinds.split(","):
        ratios, rss2, rss1, diffs = [], [], [], []
        for r in range(args.rounds):
            runs = {}
            for world in (2, 1):  # interleaved, round after round
                out = base / f"{kind}-{world}-{r}"
                _launch(out, kind, args.steps, world, args.pad_to)
                runs[world] = [json.loads((out / f"rank{k}.json").read_text())
                               for k in range(world)]
            ratios.append(max(x["step_s"] for x in runs[2]) / runs[1][0]["step_s"])
            rss2.append(max(x["peak_rss_mb"] for x in runs[2]))
            rss1.append(runs[1][0]["peak_rss_mb"])
            diff, count = _max_diff(base / f"{kind}-2-{r}" / "saved",
                                    base / f"{kind}-1-{r}" / "saved")
            diffs.append(diff)
            print(f"{kind} round {r + 1}: step ratio {ratios[-1]:.2f}, RSS {rss2[-1]:.0f} / "
                  f"{rss1[-1]:.0f} MB, max |diff| {diff:.2e} over {count} tensors", flush=True)
        summary[kind] = {"step_ratio": statistics.median(ratios), "rss2": statistics.median(rss2),
                         "rss1": statistics.median(rss1), "max_diff": max(diffs),
                         "tensors": count}
        s = summary[kind]
        lines.append(f"| {kind} | {s['step_ratio']:.2f}x | {s['rss2']:.0f} MB | {s['rss1']:.0f} "
                     f"MB | {s['rss2'] / s['rss1']:.2f}x | {s['max_diff']:.1e} | {count} |")
    text = "\n".join(lines)
    print(text)
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.write:
        from _results import write_section

        write_section(
            "FSDP on CPU processes (issue 24)",
            "MiniLM on tweet-sentiment (dropout off), FSDP2 through accelerate on 2 CPU processes "
            f"(gloo, 1 thread each) with 8 examples per process against 1 process with 16: the "
            f"same global batch, {args.steps} optimizer steps, {args.rounds} rounds interleaved "
            "(medians; the largest difference over rounds). Step time of the 2-process run is "
            "its slower process's.\n\n"
            f"```\nnice -n 5 .venv/bin/python bench/bench_fsdp.py --steps {args.steps} --rounds "
            f"{args.rounds} --write\n```\n\n" + text,
        )


if __name__ == "__main__":
    main()
