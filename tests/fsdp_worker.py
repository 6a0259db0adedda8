"""Helper process for tests/test_train_fsdp.py and bench/bench_fsdp.py (not collected by pytest).

    # FSDP on 2 CPU processes (gloo): LoRA, full fine-tuning, and a LoRA run interrupted at step 3
    # and resumed from its step-2 checkpoint, each saved under OUT/
    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_worker.py OUT

Run without ``accelerate launch`` (one process, twice the per-process batch: the same global
batch) it writes the reference the sharded results must equal. The model has no dropout and no
BatchNorm, so one process and two see exactly the same numbers up to summation order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import deltatune as dt
from deltatune.train import BaseCallback, TrainConfig, fit

D, HIDDEN, CLASSES, N_TRAIN = 16, 64, 3, 96
PER_PROCESS_BATCH = 8  # x 2 processes; the one-process reference runs 16


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build(kind: str) -> nn.Module:
    """The same model in every process: ``lora`` (LoRA on fc1/fc2 + a trainable head over a frozen
    base) or ``full`` (every parameter trains)."""
    torch.manual_seed(0)
    model = MLP()
    if kind == "lora":
        dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["fc1", "fc2"], trainable_modules=["head"]),
                  name="default")
    return model


def data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, D, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[labels] + torch.randn(n, D, generator=g)
    return [{"x": x[i], "label": int(labels[i])} for i in range(n)]


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([e["x"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


TRAIN, EVAL = data(N_TRAIN, 1), data(40, 2)


def config(world: int, **over) -> TrainConfig:
    """The same global batch for any number of processes."""
    base = dict(epochs=2, batch_size=PER_PROCESS_BATCH * 2 // world, lr=1e-2, warmup_ratio=0.1,
                weight_decay=0.01, max_grad_norm=1.0, seed=3, progress=False, fsdp=True)
    return TrainConfig(**{**base, **over})


class Stop(BaseCallback):
    """Interrupts the run after ``step`` (every process at once, like a job that is killed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"stopped after step {step}")


class Probe(BaseCallback):
    """Records, at the first step, how much of the trainable tensors this process holds."""

    def __init__(self) -> None:
        self.local = self.total = 0
        self.sharded = False

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if step == 1:
            from torch.distributed.tensor import DTensor

            for p in model.parameters():
                if p.requires_grad:
                    self.sharded |= isinstance(p, DTensor)
                    local = p.to_local() if isinstance(p, DTensor) else p
                    self.local, self.total = self.local + local.numel(), self.total + p.numel()


def save(model: nn.Module, kind: str, path: Path) -> None:
    """What a run saves: the delta as an adapter directory (LoRA + head: ``delta.safetensors``)
    or the whole model (full fine-tuning: ``model.safetensors``)."""
    from safetensors.torch import save_file

    if kind == "lora":
        dt.save_adapter(model, path, name="default")
    else:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(path / "model.safetensors"))


def run(kind: str, out: Path, world: int, **over) -> tuple[nn.Module, dict]:
    model, probe = build(kind), Probe()
    result = fit(model, TRAIN, collate, config(world, **over), eval_data=EVAL, out_dir=out,
                 task="text-classification", callbacks=[probe])
    return model, {"seconds": result.train_seconds, "steps": result.steps,
                   "peak_rss_mb": result.peak_rss_mb, "final": result.final,
                   "sharded": probe.sharded, "local_trainable": probe.local,
                   "trainable": probe.total}


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    torch.set_num_threads(1)
    out = Path(argv[0])
    state = PartialState(cpu=True)  # gloo on CPU: accelerate needs cpu=True to launch DDP there
    world, rank = state.num_processes, state.process_index
    report: dict = {"world": world}
    for kind in ("lora", "full"):
        t0 = time.perf_counter()
        model, info = run(kind, out / kind, world)
        info["wall"] = time.perf_counter() - t0
        report[kind] = info
        if rank == 0:
            save(model, kind, out / f"{kind}_saved")
    if world > 1:  # interrupted after step 3 (checkpoint at step 2), resumed by a fresh model
        try:
            fit(build("lora"), TRAIN, collate, config(world, save_every=2), eval_data=EVAL,
                out_dir=out / "resumed", task="text-classification", callbacks=[Stop(3)])
        except KeyboardInterrupt:
            pass
        model = build("lora")
        result = fit(model, TRAIN, collate, config(world, save_every=2), eval_data=EVAL,
                     out_dir=out / "resumed", resume=True, task="text-classification")
        report["resumed_from_step"] = result.resumed_from_step
        # an unsharded (DDP) fit after the sharded ones, in the same processes
        ddp = fit(build("lora"), TRAIN, collate, config(world, fsdp=False, max_steps=1),
                  task="text-classification")
        report["ddp_after_fsdp_steps"] = ddp.steps
        if rank == 0:
            save(model, "lora", out / "resumed_saved")
    (out / f"report_{world}_rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
