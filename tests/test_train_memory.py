"""Gradient checkpointing (TrainConfig.gradient_checkpointing, --gradient-checkpointing), the
fixed malloc threshold and release_memory (malloc_trim between phases): the same gradients and the
same trained delta as without, switched back off after training, refused in one line for a model
with no blocks to recompute; freed heap holes handed back."""

from __future__ import annotations

import os
import platform

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_chat_llama

import deltatune as dt
from deltatune.cli.app import main
from deltatune.lm.tokenize import chat_collate
from deltatune.models.text import CausalLM
from deltatune.train import TrainConfig, TrainError, fit
from deltatune.train.memory import gradient_checkpointing, release_memory, steady_malloc


def _model() -> CausalLM:
    model = CausalLM(tiny_chat_llama(seed=3))
    dt.attach(model, dt.LoRA(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"]),
              name="default")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero delta, so gradients reach lora_A too
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model, ids, enabled: bool) -> list[torch.Tensor]:
    model.train()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)  # the same dropout masks (checkpointing replays them in backward)
    with gradient_checkpointing(model, enabled):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(ids)
        out.float().pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None], len(saved)


def test_checkpointing_keeps_fewer_tensors_and_gives_the_same_gradients():
    model = _model()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, kept_plain = _grads(model, ids, False)
    ckpt, kept_ckpt = _grads(model, ids, True)
    assert kept_ckpt < kept_plain / 2  # the blocks' activations are not kept
    assert len(plain) == len(ckpt) == 8  # lora_A/B of q and v in 2 layers
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not model.lm.is_activation_checkpointing  # switched back off on exit


def test_fit_with_checkpointing_trains_the_same_delta():
    collate = chat_collate(smol_tokenizer(), 48)
    data = [{"messages": [{"role": "user", "content": f"Say {c}."},
                          {"role": "assistant", "content": c}]}
            for c in ("red", "green", "blue", "black") * 3]
    trained = []
    for enabled in (False, True):
        model = _model()
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False,
                          gradient_checkpointing=enabled)
        res = fit(model, data, collate, cfg, task="causal-lm")
        delta = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        trained.append((res, delta))
        assert not model.lm.is_activation_checkpointing
    (a, da), (b, db) = trained
    assert a.steps == b.steps == 6 and a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    assert da.keys() == db.keys() and len(da) == 8
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-4, atol=1e-6)


def test_a_model_without_blocks_is_refused_before_training(mlp, tmp_path):
    dt.attach(mlp, dt.LoRA(r=2, targets=["fc1"]), name="default")
    x = [(torch.randn(8), 0)] * 4
    with pytest.raises(TrainError, match="holds no transformers or timm model.*"
                                         "--no-gradient-checkpointing"):
        fit(mlp, x, lambda b: b, TrainConfig(gradient_checkpointing=True, progress=False))
    with pytest.raises(TrainError, match="gradient_checkpointing.*true or false"):
        TrainConfig(gradient_checkpointing="yes")


def test_cli_refuses_checkpointing_for_a_model_without_blocks_before_out(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "small-cnn", "--data", "mnist", "--limit", "40",
               "--gradient-checkpointing", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "--no-gradient-checkpointing" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_steady_malloc_is_set_on_glibc():
    assert steady_malloc() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_release_memory_hands_freed_heap_holes_back():
    # 64 KiB blocks come from the heap (below glibc's mmap threshold); freeing every other one
    # leaves holes that free() keeps resident, and release_memory returns them to the system
    blocks = [bytearray(64 << 10) for _ in range(3200)]  # 200 MiB, every page touched
    del blocks[::2]
    held = _rss_mb()
    assert release_memory() is True
    assert _rss_mb() < held - 50  # about 100 MiB of holes; at least half of it back
    del blocks
