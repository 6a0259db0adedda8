"""deltatune vs peft on the same int8 (torchao) base of SmolLM2-135M: same LoRA, batches (issue 21).

    .venv/bin/python bench/bench_quant_peft.py                      # 10 steps, both tools, 2 rounds
    .venv/bin/python bench/bench_quant_peft.py --steps 4 --rounds 1 # smaller

peft supports a quantized base on CPU through torchao's int8 weight-only tensors (its
``TorchaoLoraLinear``; bitsandbytes needs CUDA), so that is the base both tools train on here:

* peft: ``load_model("smollm2")``'s float transformers model, ``torchao.quantize_(...,
  Int8WeightOnlyConfig())`` on every decoder Linear (the tied ``lm_head`` stays float, as in
  deltatune), then ``get_peft_model(LoraConfig(r=8, lora_alpha=16, q_proj/v_proj))``;
* deltatune: ``load_model("smollm2", quantize="int8")`` (re-quantized from the GGUF blocks, layer
  by layer) and ``dt.attach(LoRA(r=8, alpha=16, q_proj/v_proj))``.

Both LoRAs start from the same ``A`` (drawn once, per layer, from a fixed seed) and ``B = 0``; both
train with one identical loop: AdamW (lr 1e-3), the transformers model's own causal-LM loss on the
same batches of tweet-sentiment-chat (assistant tokens only, deltatune's chat collate), batch 8,
no gradient checkpointing, one torch thread. Each tool runs in its own process (peak RSS = that
process's ``ru_maxrss``); rounds alternate the order, and the ratio is taken per round.
Measured: the loss at every step (the two should agree: same base, same start, same data), the
median step time, load and training peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGETS = ("q_proj", "v_proj")
R, ALPHA, LR, BATCH, MAX_LEN = 8, 16, 1e-3, 8, 128


def batches(steps: int):
    from deltatune.data import load_data
    from deltatune.lm.tokenize import chat_collate
    from deltatune.models.gguf import smollm2_tokenizer

    data = load_data("tweet-sentiment-chat", "train", seed=0, limit=steps * BATCH).examples
    collate = chat_collate(smollm2_tokenizer(), MAX_LEN)
    return [collate(data[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]


def same_start(names: list[str], shapes: list[tuple[int, int]]) -> dict:
    """The shared initial ``A`` of every target layer, by its position in the decoder."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {n: (torch.rand(s, generator=g) * 2 - 1) / s[1] ** 0.5 for n, s in zip(names, shapes)}


def build(tool: str):
    import torch
    from torch import nn

    from deltatune.models import load_model

    if tool == "deltatune":
        import deltatune as dt

        lm = load_model("smollm2", quantize="int8").model.lm
        dt.attach(lm, dt.LoRA(r=R, alpha=ALPHA, targets=list(TARGETS)))
        a_params = {n.split(".lora_A")[0].replace(".deltas.default", ""): p
                    for n, p in lm.named_parameters() if n.endswith("lora_A")}
    else:
        from peft import LoraConfig, get_peft_model
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        lm = load_model("smollm2").model.lm
        quantize_(lm, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
        lm = get_peft_model(lm, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                           lora_dropout=0.0))
        a_params = {n.split(".lora_A")[0].replace("base_model.model.", ""): p
                    for n, p in lm.named_parameters() if ".lora_A." in n}
    names = sorted(a_params, key=_layer_order)
    start = same_start(names, [tuple(a_params[n].shape) for n in names])
    with torch.no_grad():
        for n in names:
            a_params[n].copy_(start[n])
    return lm, len(names)


def _layer_order(name: str) -> tuple:
    parts = name.split(".")
    i = parts.index("layers")
    return int(parts[i + 1]), parts[-1]


def worker(tool: str, steps: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = batches(steps)
    tick = time.perf_counter()
    lm, layers = build(tool)
    load_s = time.perf_counter() - tick
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    lm.train()
    losses, times = [], []
    for batch in data:
        tick = time.perf_counter()
        out_ = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"])
        out_.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
        losses.append(float(out_.loss))
    out.write_text(json.dumps({
        "tool": tool, "layers": layers, "trainable": sum(p.numel() for p in params),
        "losses": losses, "step_s": times, "load_s": load_s, "load_peak_mb": load_peak,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=("deltatune", "peft"))
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench_quant_peft")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    runs: dict[str, list[dict]] = {"deltatune": [], "peft": []}
    for r in range(args.rounds):
        order = ("peft", "deltatune") if r % 2 else ("deltatune", "peft")
        for tool in order:
            path = args.out / f"{tool}-{r}.json"
            cmd = ["nice", "-n", "5", PY, __file__, "--worker", tool, "--steps", str(args.steps),
                   "--out", str(path)]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
                return proc.returncode
            runs[tool].append(json.loads(path.read_text()))
            row = runs[tool][-1]
            print(f"round {r} {tool:9s} step median {statistics.median(row['step_s'][1:]):.2f} s"
                  f"  peak {row['peak_mb']:.0f} MB  losses {[round(x, 3) for x in row['losses']]}",
                  flush=True)
    dtr, pfr = runs["deltatune"], runs["peft"]
    step = [statistics.median(d["step_s"][1:]) / statistics.median(q["step_s"][1:])
            for d, q in zip(dtr, pfr)]
    gap = max(abs(a - b) for d, q in zip(dtr, pfr) for a, b in zip(d["losses"], q["losses"]))
    print(f"\nLoRA layers {dtr[0]['layers']} / {pfr[0]['layers']}, trainable "
          f"{dtr[0]['trainable']:,} / {pfr[0]['trainable']:,}")
    print(f"step time deltatune / peft per round: {', '.join(f'{s:.2f}' for s in step)}")
    print(f"peak RSS deltatune / peft: {max(d['peak_mb'] for d in dtr):.0f} / "
          f"{max(q['peak_mb'] for q in pfr):.0f} MB; load peak "
          f"{max(d['load_peak_mb'] for d in dtr):.0f} / "
          f"{max(q['load_peak_mb'] for q in pfr):.0f} MB")
    print(f"largest loss difference over {args.steps} steps: {gap:.2e}")
    (args.out / "summary.json").write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
