"""deltatune.compress: codec round trips, packed files, adapters that attach compressed, CLI, bad
input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import compress as dc
from deltatune.algebra import TaskVector
from deltatune.compress import codecs
from deltatune.io import save_tensors

CODECS = ["compeft", "bitdelta", "dare", "int8", "int4", "lowrank"]


def _delta(shape=(48, 40), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- packing is exact ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_bit_and_nibble_packing_round_trip_exactly(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    assert torch.equal(codecs.unpack_bits(codecs.pack_bits(bits), n), bits)
    assert codecs.pack_bits(bits).numel() == (n + 7) // 8
    nib = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))
    assert torch.equal(codecs.unpack_nibbles(codecs.pack_nibbles(nib), n).long(), nib)


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_positions_pick_the_smaller_layout_and_are_exact(density):
    keep = torch.rand(4000, generator=torch.Generator().manual_seed(1)) < density
    parts = codecs.encode_positions(keep)
    assert ("index" in parts) == (density == 0.01)
    assert torch.equal(codecs.decode_positions(parts, 4000), keep)


# -- codecs ----------------------------------------------------------------------------------------
def test_compeft_keeps_top_k_signs_with_one_scale():
    d = _delta()
    c = dc.compress_tensors({"w": d}, "compeft", density=0.1)
    out = c.tensor("w")
    kept = out != 0
    assert kept.sum() == round(0.1 * d.numel())
    assert d.abs()[kept].min() >= d.abs()[~kept].max()  # exactly the largest magnitudes
    assert torch.equal(torch.sign(out[kept]), torch.sign(d[kept]))
    assert torch.allclose(out[kept].abs(), d.abs()[kept].mean().expand(int(kept.sum())))
    std = dc.compress_tensors({"w": d}, "compeft", density=0.1, scale="std", alpha=2.0).tensor("w")
    assert torch.allclose(std[kept].abs().unique(), 2 * d.std().reshape(1))


def test_bitdelta_is_sign_times_mean_magnitude():
    d = _delta()
    out = dc.compress_tensors({"w": d}, "bitdelta").tensor("w")
    assert torch.equal(torch.sign(out), torch.sign(d)) and torch.allclose(
        out.abs(), d.abs().mean().expand_as(d)
    )


def test_dare_is_seeded_unbiased_and_rescaled():
    d = _delta((200, 200))
    a = dc.compress_tensors({"w": d}, "dare", density=0.3, seed=1).tensor("w")
    b = dc.compress_tensors({"w": d}, "dare", density=0.3, seed=1).tensor("w")
    assert torch.equal(a, b)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(a[kept], d[kept] / 0.3)


@pytest.mark.parametrize("codec,bound", [("int8", 1 / 127), ("int4", 1 / 7)])
def test_int_quantisation_error_is_within_half_a_step_per_row(codec, bound):
    d = _delta()
    out = dc.compress_tensors({"w": d}, codec).tensor("w")
    step = d.abs().amax(dim=1, keepdim=True) * bound
    assert ((out - d).abs() <= step / 2 + 1e-6).all()


def test_lowrank_is_the_truncated_svd():
    u = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
    v = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    exact = u @ v
    assert torch.allclose(
        dc.compress_tensors({"w": exact}, "lowrank", rank=6).tensor("w"), exact, atol=1e-4
    )
    d = _delta()
    c = dc.compress_tensors({"w": d}, "lowrank", rank=4)
    s = torch.linalg.svdvals(d)
    assert torch.allclose(
        torch.linalg.matrix_norm(c.tensor("w") - d), s[4:].square().sum().sqrt(), rtol=1e-4
    )
    assert c.metas["w"]["energy"] == pytest.approx(
        float(s[:4].square().sum() / s.square().sum()), rel=1e-5
    )


@pytest.mark.parametrize("codec", CODECS)
def test_save_load_round_trip_is_bit_exact(tmp_path, codec):
    tensors = {
        "layer.weight": _delta(),
        "layer.bias": torch.randn(48),
        "conv.weight": torch.randn(8, 4, 3, 3),
    }
    c = dc.compress_tensors(tensors, codec, min_numel=64)
    c.save(tmp_path / "c")
    back = dc.load_compressed(tmp_path / "c")
    for name in tensors:
        assert torch.equal(back.tensor(name), c.tensor(name))
    assert torch.equal(
        back.tensor("layer.bias"), tensors["layer.bias"]
    )  # vectors stay raw (lossless)
    assert back.metas["layer.weight"]["codec"] == codec
    assert back.ratio == pytest.approx(c.ratio) and c.packed_bytes < c.original_bytes


# -- adapters and task vectors ---------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("codec", ["compeft", "bitdelta", "dare", "int8", "int4"])
def test_compressed_adapter_attaches_like_any_other(tmp_path, codec):
    model = _mlp()
    dt.attach(model, dt.LoRA(r=8, targets=["0", "2"]), name="a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    dt.save_adapter(model, tmp_path / "a")
    c = dc.compress_adapter(tmp_path / "a", codec, min_numel=256)
    c.save(tmp_path / "c")
    other = _mlp()
    dt.load_adapter(other, tmp_path / "c")
    x = torch.randn(5, 64)
    decoded = {k: c.tensor(k) for k in c.names()}
    with torch.no_grad():
        for n, p in other.named_parameters():
            key = n.replace(".deltas.a.", ".")  # the tensors the adapter holds are the decoded ones
            if "lora_" in n:
                assert torch.equal(p, decoded[key])
        if codec.startswith(
            "int"
        ):  # quantisation keeps the outputs close; the sparse/sign codecs need data
            assert torch.allclose(other(x), model(x), atol=0.05)
    info = dt.io.read_adapter_info(tmp_path / "c")
    assert info["codec"] == codec and info["ratio"] > 1 and info["method"] == "lora"


def test_task_vector_from_checkpoints_applies_and_extracts_to_lora(tmp_path):
    base, ft = _mlp(), _mlp()
    with torch.no_grad():
        ft[0].weight.add_(0.05 * _delta((64, 64), 3))
        ft[2].weight.add_(0.05 * _delta((8, 64), 4))
        ft[0].bias.add_(0.1)
    save_tensors(tmp_path / "base.safetensors", base.state_dict())
    save_tensors(tmp_path / "ft.safetensors", ft.state_dict())
    c = dc.compress_checkpoint(
        tmp_path / "ft.safetensors", tmp_path / "base.safetensors", "lowrank", rank=8, min_numel=256
    )
    assert c.metas["0.weight"]["codec"] == "lowrank" and c.metas["0.bias"]["codec"] == "raw"
    tv = c.to_task_vector()
    x = torch.randn(5, 64)
    restored = tv.apply_to(_mlp())
    full = TaskVector.from_state_dicts(base.state_dict(), ft.state_dict())
    exact = full.to_rank(8).apply_to(_mlp())
    with torch.no_grad():
        assert torch.allclose(restored(x), exact(x), atol=1e-5)
    model = _mlp()
    report = dc.extract_lora(model, full, rank=8)
    assert sorted(report["hosts"]) == ["0", "2"] and report["dropped"] == ["0.bias", "2.bias"]
    dt.save_adapter(model, tmp_path / "lora", format="peft")  # a plain LoRA, peft layout too
    fresh = _mlp()
    dt.load_adapter(fresh, tmp_path / "lora")
    with (
        torch.no_grad()
    ):  # the LoRA holds the matrices; the dropped bias change is all that is missing
        fresh[0].base.bias.add_(0.1)
        assert torch.allclose(fresh(x), exact(x), atol=1e-4)


def test_scales_can_be_searched_and_calibrated():
    base = _mlp()
    ft = _mlp()
    with torch.no_grad():
        ft[0].weight.add_(0.05 * _delta((64, 64), 3))
    tv = TaskVector.from_state_dicts(base.state_dict(), ft.state_dict())
    c = dc.compress_task_vector(tv, "bitdelta", min_numel=256)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    target = ft(x).detach()

    def error(cd):
        return (cd.to_task_vector().apply_to(_mlp())(x) - target).square().mean().item()

    best, scores = dc.search_alpha(c, lambda cd: -error(cd))
    assert set(scores) == {0.5, 0.75, 1.0, 1.25, 1.5, 2.0} and error(best) == pytest.approx(
        -max(scores.values())
    )
    calibrated = dc.calibrate_scales(
        c, _mlp(), dict(base.state_dict()), teacher=lambda b: ft(b), batches=[x], steps=30, lr=1e-3
    )
    assert error(calibrated) < error(c)
    assert torch.equal(
        torch.sign(calibrated.tensor("0.weight")), torch.sign(c.tensor("0.weight"))
    )  # signs fixed


def test_real_minilm_lora_compressed_stays_close(tmp_path):
    from deltatune.models import load_model

    entry = load_model("minilm", num_labels=5, max_length=32)
    dt.attach(
        entry.model,
        dt.LoRA(r=8, targets=["query", "value"], trainable_modules=["classifier"]),
        name="a",
    )
    with torch.no_grad():
        for n, p in entry.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    dt.save_adapter(entry.model, tmp_path / "a")
    dc.compress_adapter(tmp_path / "a", "int8").save(tmp_path / "c")
    batch = entry.collate([{"text": "Shares rose after the bank's results.", "label": 0},
                           {"text": "The striker scored twice.", "label": 1}])
    batch.pop("labels", None)
    other = load_model("minilm", num_labels=5, max_length=32).model
    dt.load_adapter(other, tmp_path / "c")
    with torch.no_grad():
        assert torch.allclose(
            other(**batch), entry.model(**batch), atol=5e-3
        )  # int8: ~0.4% of each row max


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(dc.CompressError, match="unknown codec 'zip'"):
        dc.compress_tensors({"w": _delta()}, "zip")
    with pytest.raises(dc.CompressError, match="density=0"):
        dc.compress_tensors({"w": _delta()}, "compeft", density=0)
    with pytest.raises(dc.CompressError, match="rank 100 is larger than the matrix allows"):
        dc.compress_tensors({"w": _delta()}, "lowrank", rank=100, min_numel=1)
    with pytest.raises(dc.CompressError, match="NaN or inf"):
        dc.compress_tensors({"w": torch.full((40, 40), float("nan"))}, "int8")
    with pytest.raises(
        dc.CompressError, match="no tensor of this delta can take the bitdelta codec"
    ):
        dc.compress_tensors({"bias": torch.randn(40)}, "bitdelta")
    model = _mlp()
    dt.attach(model, dt.LoRA(r=4, targets=["0"]), name="a")
    dt.save_adapter(model, tmp_path / "a")
    with pytest.raises(dc.CompressError, match="already low-rank factors"):
        dc.compress_adapter(tmp_path / "a", "lowrank")
    with pytest.raises(dc.CompressError, match="larger than"):
        dc.extract_lora(_mlp(), TaskVector({"2.weight": torch.randn(8, 64)}), rank=9)


def test_corrupt_or_truncated_packed_files_are_refused(tmp_path):
    c = dc.compress_tensors({"w": _delta()}, "compeft", min_numel=16)
    c.save(tmp_path / "c")
    data = (tmp_path / "c" / "compressed.safetensors").read_bytes()
    (tmp_path / "c" / "compressed.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(dc.CompressError, match="missing, truncated or corrupt"):
        dc.load_compressed(tmp_path / "c")
    c.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "compressed.json").read_text())
    cfg["entries"]["w"]["shape"] = [48, 41]
    (tmp_path / "d" / "compressed.json").write_text(json.dumps(cfg))
    with pytest.raises(dc.CompressError, match="corrupt"):
        dc.load_compressed(tmp_path / "d").tensor("w")
    with pytest.raises(dc.CompressError, match="holds no compressed.json"):
        dc.load_compressed(tmp_path)


# -- CLI -------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "deltatune.cli.app", *map(str, args)], capture_output=True, text=True
    )


def test_cli_compress_info_and_errors(tmp_path):
    model = _mlp()
    dt.attach(model, dt.LoRA(r=8, targets=["0", "2"]), name="a")
    dt.save_adapter(model, tmp_path / "a")
    proc = _cli(
        "compress",
        tmp_path / "a",
        "--codec",
        "bitdelta",
        "--min-numel",
        "256",
        "--out",
        tmp_path / "b",
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["codec"] == "bitdelta" and results["bytes_before"] > results["bytes_after"] > 0
    assert results["ratio"] == pytest.approx(
        results["bytes_before"] / results["bytes_after"], rel=1e-3
    )
    info = _cli("info", tmp_path / "b")
    assert info.returncode == 0 and "bitdelta" in info.stdout and "packed" in info.stdout
    again = _cli("compress", tmp_path / "a", "--codec", "bitdelta", "--out", tmp_path / "b")
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = _cli("compress", tmp_path / "a", "--codec", "lowrank", "--out", tmp_path / "c")
    assert (
        bad.returncode == 2 and "already low-rank" in bad.stderr and not (tmp_path / "c").exists()
    )
    unknown = _cli("compress", tmp_path / "a", "--codec", "gzip", "--out", tmp_path / "c")
    assert unknown.returncode == 2 and "unknown codec" in unknown.stderr
    nobase = _cli(
        "compress", tmp_path / "a" / "delta.safetensors", "--codec", "int8", "--out", tmp_path / "c"
    )
    assert nobase.returncode == 2 and "--base" in nobase.stderr and not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.*")), "no temporary directory left behind"
