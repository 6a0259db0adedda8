"""The trainer: learning, schedules, accumulation, causal LMs, callbacks, atomic checkpoints,
bit-identical resume after SIGKILL, corrupt checkpoints and 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import BaseCallback, CheckpointError, TrainConfig, TrainError, evaluate, fit
from deltatune.train import checkpoint as ckpt
from deltatune.train.optim import build_optimizer, lr_factor

sys.path.insert(0, str(Path(__file__).parent))
import train_worker as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "text-classification"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is much faster (no spin-waiting),
    # and the subprocess runs use one thread too, so all runs do identical arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 1e-2, "progress": False, **kw})


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- config and schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", 2.5),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("warmup_ratio", 1.0),
        ("schedule", "step"),
        ("grad_accum", True),
        ("max_grad_norm", -1.0),
        ("save_every", 0),
        ("metric", ""),
    ],
)
def test_config_rejects_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})


def test_lr_schedules():
    warm = [lr_factor(s, 10, 4, "linear") for s in range(4)]
    assert warm == [0.25, 0.5, 0.75, 1.0]  # no wasted zero-lr step, full lr at the end of warmup
    linear = [lr_factor(s, 10, 4, "linear") for s in range(4, 10)]
    assert linear == sorted(linear, reverse=True) and linear[-1] == pytest.approx(1 / 6)
    cosine = [lr_factor(s, 10, 0, "cosine") for s in range(10)]
    assert (
        cosine[0] == 1.0
        and cosine[5] == pytest.approx(0.5)
        and all(a > b for a, b in zip(cosine, cosine[1:]))
    )
    assert [lr_factor(s, 10, 2, "constant") for s in range(2, 10)] == [1.0] * 8


def test_optimizer_only_trainable_and_no_decay_on_bias_and_norm():
    model = W.build_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, TrainConfig(weight_decay=0.1))
    decay, rest = ({id(p) for p in g["params"]} for g in opt.param_groups)
    names = {id(p): n for n, p in named}
    assert {names[i] for i in decay} == {"hidden.weight", "head.weight"}
    assert {names[i] for i in rest} == {"norm.weight", "norm.bias", "hidden.bias", "head.bias"}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert id(model.embed.weight) not in decay | rest  # frozen


# -- training --------------------------------------------------------------------------------------
def test_fit_learns_keeps_best_and_reports(tmp_path):
    model = W.build_model()
    frozen = model.embed.weight.detach().clone()
    before = evaluate(model, W.EVAL, W.clean_collate, task=TASK)
    cfg = quick(epochs=4, schedule="cosine", warmup_ratio=0.1)
    res = fit(model, W.TRAIN, W.clean_collate, cfg, eval_data=W.EVAL, out_dir=tmp_path, task=TASK)
    assert torch.equal(model.embed.weight, frozen) and not model.training
    assert res.steps == 4 * 9 and res.epochs_done == 4 and res.samples == 4 * 130
    assert res.final["accuracy"] > max(0.8, before["accuracy"] + 0.2)
    best = max(e["accuracy"] for e in json.loads((tmp_path / "metrics.json").read_text())["epochs"])
    assert res.best["accuracy"] == best
    # The best evaluated state is what the model holds now (BatchNorm statistics included).
    now = evaluate(model, W.EVAL, W.clean_collate, task=TASK)
    assert now["accuracy"] == res.best["accuracy"] and now["loss"] == pytest.approx(
        res.best["loss"], abs=1e-6
    )
    metrics = json.loads(Path(res.metrics_path).read_text())
    lrs = [s["lr"] for s in metrics["steps"]]
    assert (
        len(lrs) == 36
        and lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
        and lrs[4:] == sorted(lrs[4:], reverse=True)
    )
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4] and metrics["finished"] is True
    assert metrics["throughput"]["samples_per_second"] > 0 and res.peak_rss_mb > 10
    assert all(s["grad_norm"] >= 0 for s in metrics["steps"])
    assert Path(res.curve_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.checkpoint_path is None and not (tmp_path / "checkpoint").exists()


def test_grad_accum_equals_a_larger_batch():
    cfg = dict(epochs=1, lr=1e-2, max_grad_norm=None, progress=False, warmup_ratio=0.0)
    data = W.TRAIN[:128]
    runs = []
    for bs, accum in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        model = W.build_model().eval()
        model.drop.p = 0.0  # dropout masks differ by batch split; the arithmetic should not
        model.norm = nn.Identity()  # batch statistics too
        fit(
            model,
            data,
            W.clean_collate,
            TrainConfig(batch_size=bs, grad_accum=accum, **cfg),
            task=TASK,
        )
        runs.append(trainable(model))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-5)
    # and the runs moved away from the start by much more than that tolerance
    start = trainable(W.build_model())
    assert (runs[0]["head.weight"] - start["head.weight"]).abs().max() > 1e-2


def test_max_steps_overrides_epochs_and_evaluates_at_the_end(tmp_path):
    model = W.build_model()
    res = fit(
        model,
        W.TRAIN,
        W.clean_collate,
        quick(epochs=1, max_steps=12, keep_best=False),
        eval_data=W.EVAL,
        out_dir=tmp_path,
        task=TASK,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert res.steps == 12 and res.epochs_done == 1  # 9 steps per epoch: one full epoch + 3 steps
    assert [(e["epoch"], e["step"], e.get("partial", False)) for e in metrics["epochs"]] == [
        (1, 9, False),
        (2, 12, True),
    ]
    assert res.final["step"] == 12
    assert evaluate(model, W.EVAL, W.clean_collate, task=TASK)["loss"] == pytest.approx(
        res.final["loss"], abs=1e-6
    )


def test_without_per_epoch_evaluation_the_end_is_evaluated_once(tmp_path):
    res = fit(
        W.build_model(),
        W.TRAIN,
        W.clean_collate,
        quick(eval_each_epoch=False),
        eval_data=W.EVAL,
        out_dir=tmp_path,
        task=TASK,
    )
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [("accuracy" in e, e.get("partial", False)) for e in epochs] == [
        (False, False),
        (True, False),
    ]
    assert res.final["epoch"] == 2 and res.best == res.final


def test_causal_lm_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if (
            "q_proj" in name
            or "v_proj" in name
            or "lm_head" in name
            or name.endswith("norm.weight")
        ):
            p.requires_grad_(True)
    gen = random.Random(0)
    seqs = []
    for _ in range(96):  # arithmetic progressions mod 31 (token 0 is padding), ragged lengths
        start, step, length = gen.randrange(1, 32), gen.choice([1, 2, 3]), gen.randrange(6, 13)
        seqs.append([1 + (start + i * step) % 31 for i in range(length)])

    def collate(batch):
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])
        mask = (ids != 0).long()
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }

    before = evaluate(model, seqs[64:], collate, task="causal-lm", batch_size=32)
    frozen = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    res = fit(
        model, seqs[:64], collate, quick(epochs=5, lr=2e-2), eval_data=seqs[64:], task="causal-lm"
    )
    after = evaluate(model, seqs[64:], collate, task="causal-lm", batch_size=32)
    assert before["tokens"] == after["tokens"] == sum(len(s) - 1 for s in seqs[64:])
    assert after["loss"] < before["loss"] - 0.3
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert res.best["loss"] <= res.final["loss"]  # selected by lowest loss, and restored:
    assert after["loss"] == pytest.approx(res.best["loss"], abs=1e-5)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, frozen)


class Fixed(nn.Module):
    """Logits are the input itself: evaluation against hand-computed numbers."""

    def forward(self, logits):
        return logits


def test_evaluate_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labels = [0, 1, 0, -100]  # the last one is ignored
    data = [{"logits": logits[i], "labels": labels[i]} for i in range(4)]
    def coll(b):
        return {
            "logits": torch.stack([e["logits"] for e in b]),
            "labels": torch.tensor([e["labels"] for e in b]),
        }

    got = evaluate(Fixed(), data, coll, task="image-classification", batch_size=3)
    expected = F.cross_entropy(logits[:3], torch.tensor(labels[:3]))
    assert (
        got["accuracy"] == pytest.approx(2 / 3)
        and got["n"] == 3
        and got["loss"] == pytest.approx(float(expected))
    )
    lm = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([[1, 2, -100, 4]])
    res = evaluate(Fixed(), [0], lambda _: {"logits": lm, "labels": seq}, task="causal-lm")
    # positions 0 and 2 predict tokens 2 and 4; position 1 predicts an ignored label
    manual = (F.cross_entropy(lm[0, [0, 2]], torch.tensor([2, 4]), reduction="sum") / 2).item()
    assert (
        res["tokens"] == 2
        and res["loss"] == pytest.approx(manual)
        and res["perplexity"] == pytest.approx(math.exp(manual))
    )


def test_bad_inputs_give_one_line_errors(tmp_path):
    frozen = W.build_model().requires_grad_(False)
    with pytest.raises(TrainError, match="no trainable parameters"):
        fit(frozen, W.TRAIN, W.clean_collate, quick())
    with pytest.raises(TrainError, match="task='regression'"):
        fit(W.build_model(), W.TRAIN, W.clean_collate, quick(), task="regression")
    with pytest.raises(TrainError, match="metric='f1'"):
        fit(W.build_model(), W.TRAIN, W.clean_collate, quick(metric="f1"))
    with pytest.raises(TrainError, match="empty"):
        fit(W.build_model(), [], W.clean_collate, quick())
    with pytest.raises(TrainError, match="need out_dir"):
        fit(W.build_model(), W.TRAIN, W.clean_collate, quick(), resume=True)
    with pytest.raises(TrainError, match="collate must return a dict"):
        fit(W.build_model(), W.TRAIN, lambda b: tuple(W.clean_collate(b).values()), quick())
    with pytest.raises(TrainError, match=r"causal-lm needs logits \(batch, time, vocab\)"):
        fit(W.build_model(), W.TRAIN, W.clean_collate, quick(), task="causal-lm")
    nan = [{"x": torch.full((W.D,), float("nan")), "label": 0}] * 32
    model = W.build_model()
    with pytest.raises(TrainError, match="loss became nan at step 1"):
        fit(model, nan, W.clean_collate, quick())
    assert torch.equal(model.head.weight, W.build_model().head.weight)  # no NaN update was applied
    with pytest.warns(UserWarning, match="no checkpoint"):
        fit(
            W.build_model(),
            W.TRAIN[:32],
            W.clean_collate,
            quick(epochs=1),
            out_dir=tmp_path,
            resume=True,
        )


# -- callbacks -------------------------------------------------------------------------------------
class Recorder(BaseCallback):
    def __init__(self, strength: float) -> None:
        self.strength, self.starts, self.steps, self.epochs, self.extras = strength, 0, [], [], 0

    def on_train_start(self, model):
        self.starts += 1

    def penalty(self, model, batch, outputs):
        assert outputs.shape == (batch["labels"].shape[0], W.CLASSES)
        return self.strength * model.head.weight.pow(2).sum()

    def extra_batch(self):
        self.extras += 1
        return W.clean_collate(W.EVAL[:4])  # "replayed" examples

    def on_step_end(self, model, step):
        self.steps.append(step)

    def on_epoch_end(self, model, epoch, metrics):
        self.epochs.append((epoch, round(metrics["accuracy"], 6)))
        return {"replayed": float(self.extras)}


class OnlyStepEnd:  # duck-typed: a callback needs only the hooks it uses
    def __init__(self) -> None:
        self.calls = 0

    def on_step_end(self, model, step):
        self.calls += 1


def test_callbacks_hooks_return_values(tmp_path):
    plain = W.build_model()
    fit(plain, W.TRAIN, W.clean_collate, quick(grad_accum=2), task=TASK)
    model, rec, duck = W.build_model(), Recorder(strength=5.0), OnlyStepEnd()
    res = fit(
        model,
        W.TRAIN,
        W.clean_collate,
        quick(grad_accum=2),
        eval_data=W.EVAL,
        out_dir=tmp_path,
        callbacks=[rec, duck],
        task=TASK,
    )
    assert (
        rec.starts == 1
        and rec.steps == list(range(1, res.steps + 1)) == list(range(1, 11))
        and duck.calls == 10
    )
    assert rec.extras == 2 * 9  # one extra batch per micro-batch (9 per epoch)
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [(e["epoch"], round(e["accuracy"], 6)) for e in epochs] == rec.epochs
    assert [e["replayed"] for e in epochs] == [9.0, 18.0]
    steps = json.loads((tmp_path / "metrics.json").read_text())["steps"]
    assert all(s["penalty"] > 0 for s in steps)
    # the penalty pulled the head towards zero (Adam: about lr per step and element), training
    # without it let the head grow
    start = W.build_model().head.weight.norm()
    assert model.head.weight.norm() < start - 0.2 and plain.head.weight.norm() > start


# -- checkpoints -----------------------------------------------------------------------------------
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    reference = W.build_model()
    fit(reference, W.TRAIN, W.collate, W.CONFIG, eval_data=W.EVAL, out_dir=tmp_path / "ref")
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "train_worker.py"), "kill", str(killed), "0.08"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while not (killed / "checkpoint" / "trainer.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 1.5))  # a random moment: mid-step, mid-eval or mid-checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    saved = json.loads((ckpt.find(killed) / "trainer.json").read_text())["state"]["step"]
    assert 2 <= saved < 35
    resumed = W.build_model()  # same initialisation; the checkpoint carries what training changed
    res = fit(resumed, W.TRAIN, W.collate, W.CONFIG, eval_data=W.EVAL, out_dir=killed, resume=True)
    assert res.resumed_from_step == saved and res.steps == 35
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics, bit for bit
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    new_metrics = json.loads((killed / "metrics.json").read_text())
    assert (
        new_metrics["steps"] == ref_metrics["steps"]
        and new_metrics["epochs"] == ref_metrics["epochs"]
    )


def _short_run(out: Path, **kw) -> None:
    fit(W.build_model(), W.TRAIN[:64], W.collate, quick(epochs=1, batch_size=8, save_every=4, **kw),
        out_dir=out, task=TASK)


def test_failed_write_keeps_previous_checkpoint_and_old_name_is_found(tmp_path, monkeypatch):
    _short_run(tmp_path)
    before = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def failing(tensors, path, *a, **k):  # write one file, then the disk is "full"
        calls.append(path)
        if len(calls) > 1:
            Path(path).write_bytes(b"partial")
            raise OSError("No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        ckpt.save(
            tmp_path,
            {"model": {"w": torch.ones(2)}, "optimizer": {"m": torch.ones(2)}},
            {"state": {}},
        )
    monkeypatch.undo()
    files, meta = ckpt.load(tmp_path / "checkpoint")
    assert meta == before and set(files) == {"model", "optimizer", "rng"}
    assert not list(tmp_path.glob(".checkpoint.*"))  # the temporary directory is gone
    # A kill between the two renames leaves only checkpoint.old: resume finds it.
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    res = fit(W.build_model(), W.TRAIN[:64], W.collate, quick(epochs=1, batch_size=8, save_every=4),
              out_dir=tmp_path, task=TASK, resume=True)
    assert res.resumed_from_step == 8 == res.steps
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "checkpoint.old").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"), ("flip", "truncated or corrupt"), ("json", "corrupt"),
    ("no-json", "incomplete"), ("config", "TrainConfig.batch_size=4 differs"),
])
def test_damaged_or_mismatched_checkpoint_is_a_clear_error(tmp_path, damage, message):
    _short_run(tmp_path)
    cdir = tmp_path / "checkpoint"
    batch = 8
    if damage == "truncate":
        data = (cdir / "optimizer.safetensors").read_bytes()
        (cdir / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((cdir / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (cdir / "model.safetensors").write_bytes(bytes(data))
    elif damage == "json":
        (cdir / "trainer.json").write_text('{"format": "deltatune-train-checkpoint", "vers')
    elif damage == "no-json":
        (cdir / "trainer.json").unlink()
    else:
        batch = 4
    with pytest.raises(TrainError, match=message) as info:
        fit(
            W.build_model(),
            W.TRAIN[:64],
            W.collate,
            quick(epochs=1, batch_size=batch, save_every=4),
            out_dir=tmp_path,
            task=TASK,
            resume=True,
        )
    assert "\n" not in str(info.value)
    if damage != "config":
        assert isinstance(info.value, CheckpointError)


# -- distributed -----------------------------------------------------------------------------------
def test_ddp_two_processes_on_cpu(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "train_worker.py"),
        "ddp",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        metrics["world_size"] == 2 and metrics["steps_per_epoch"] == 11
    )  # 130 / (6 x 2): 11 steps, the last one padded
    first, last = metrics["epochs"][0], metrics["epochs"][-1]
    assert (
        last["train_loss"] < first["train_loss"] - 0.1
        and metrics["best"]["loss"] < first["loss"] - 0.1
    )
    assert metrics["final"]["n"] == len(W.EVAL)  # evaluation shards summed over both processes
    _, meta = ckpt.load(tmp_path / "checkpoint")
    assert set(meta["rng"]) == {"rank0", "rank1"} and meta["rng"]["rank0"] != meta["rng"]["rank1"]


def test_lisa_trains_only_the_drawn_blocks_and_redraws():
    from deltatune.train.lisa import LISA, find_blocks

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.head = nn.Linear(8, 2)

        def forward(self, x, **_):
            h = self.inp(x)
            for layer in self.layers:
                h = torch.relu(layer(h))
            return self.head(h)

    torch.manual_seed(0)
    net = Net()
    assert find_blocks(net)[0] == "layers"
    cb = LISA(layers=1, interval=2, seed=0)
    cb.on_train_start(net)
    drawn = [list(cb.active)]
    trainable = [i for i, b in enumerate(net.layers) if b.weight.requires_grad]
    assert trainable == cb.active and net.inp.weight.requires_grad and net.head.weight.requires_grad
    for step in range(1, 21):
        cb.on_step_end(net, step)
        drawn.append(list(cb.active))
    assert len({tuple(d) for d in drawn}) > 1, "blocks are re-drawn"
    again = LISA(layers=1, interval=2, seed=0)
    again.on_train_start(net)
    again.on_step_end(net, 14)
    assert again.active == drawn[14], (
        "the draw depends only on seed and step: resume draws the same blocks"
    )
    again.on_train_end(net)
    cb.on_train_end(net)
    assert all(p.requires_grad for p in net.parameters()), "flags restored at the end"
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    data = [{"x": x[i], "label": int(y[i])} for i in range(32)]
    def collate(ex):
        return {
            "x": torch.stack([e["x"] for e in ex]),
            "labels": torch.tensor([e["label"] for e in ex]),
        }

    fit(
        net,
        data,
        collate,
        TrainConfig(
            max_steps=1,
            batch_size=32,
            lr=0.1,
            progress=False,
            eval_each_epoch=False,
            lisa_layers=2,
            lisa_interval=5,
        ),
        task="text-classification",
    )
    moved = {
        i
        for i, b in enumerate(net.layers)
        if not torch.equal(b.weight, before[f"layers.{i}.weight"])
    }
    assert len(moved) == 2 and not torch.equal(net.head.weight, before["head.weight"])
    assert all(p.requires_grad for p in net.parameters()), "fit gives the flags back"
    with pytest.raises(TrainError, match="lisa_layers=9 but layers has only 4 blocks"):
        LISA(layers=9).on_train_start(net)
    with pytest.raises(TrainError, match="lisa_interval"):
        TrainConfig(lisa_interval=0)


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class _Images(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values, labels=None):
        return self.net(pixel_values)


def _image_data(n=48):
    g = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": 3.0 + 2.0 * torch.randn(1, 6, 6, generator=g), "label": i % 3}
        for i in range(n)
    ]


def _image_collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


@pytest.mark.parametrize("mode", ["auto", "update", "freeze"])
def test_norm_stats_of_frozen_batchnorm_stay_put_under_a_delta(mode, tmp_path):
    import deltatune as dt

    model = _Images(_bn_cnn())
    dt.attach(model, dt.LoRA(r=2, target_types=["Conv2d"], trainable_modules=["net.5"]))
    before = model.net[1].running_mean.clone()
    cfg = TrainConfig(
        max_steps=3,
        batch_size=16,
        lr=1e-2,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
        norm_stats=mode,
    )
    fit(model, _image_data(), _image_collate, cfg, task="image-classification")
    moved = not torch.equal(model.net[1].running_mean, before)
    assert moved == (
        mode == "update"
    )  # inputs have mean 3: train-mode BatchNorm would move its mean
    if mode == "auto":  # the saved delta alone reproduces the trained model
        dt.save_adapter(model, tmp_path / "a")
        fresh = _Images(_bn_cnn())
        dt.load_adapter(fresh, tmp_path / "a")
        x = _image_collate(_image_data(4))["pixel_values"]
        assert torch.allclose(fresh.eval()(x), model.eval()(x), atol=1e-6)


def test_norm_stats_auto_updates_batchnorm_that_trains():
    model = _Images(_bn_cnn())  # full fine-tuning: every BatchNorm has trainable affine parameters
    before = model.net[1].running_mean.clone()
    fit(
        model,
        _image_data(),
        _image_collate,
        TrainConfig(
            max_steps=2, batch_size=16, progress=False, eval_each_epoch=False, keep_best=False
        ),
        task="image-classification",
    )
    assert not torch.equal(model.net[1].running_mean, before)
    with pytest.raises(TrainError, match="norm_stats"):
        TrainConfig(norm_stats="sometimes")


def test_a_precision_left_in_accelerate_by_another_library_is_not_inherited():
    """trl's configs default to bf16 and accelerate keeps one process-wide state: a deltatune run
    after a trl run in the same process must still train in its own (fp32) precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="bf16")  # what a trl trainer leaves behind
    try:
        torch.manual_seed(0)
        model = W.build_model().eval()
        cfg = TrainConfig(epochs=1, batch_size=32, progress=False, max_steps=1)
        fit(model, W.TRAIN[:32], W.clean_collate, cfg, task=TASK)
        assert AcceleratorState().mixed_precision == "no"
    finally:
        AcceleratorState._reset_state()
