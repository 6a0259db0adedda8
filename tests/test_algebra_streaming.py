"""Streaming checkpoint merges: sharded inputs and outputs, parameters per tensor, bad input,
memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from deltatune import algebra as alg
from deltatune.algebra import tensors
from deltatune.algebra.errors import MergeConfigError, MergeError

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    **{f"model.layers.{i}.self_attn.q_proj.weight": (16, 16) for i in range(3)},
    **{f"model.layers.{i}.mlp.up_proj.weight": (24, 16) for i in range(3)},
    **{f"model.layers.{i}.input_layernorm.weight": (16,) for i in range(3)},
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}


def make_state(seed, base=None, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    if base is not None:
        state = {k: base[k] + scale * v for k, v in state.items()}
    state["embeddings.position_ids"] = torch.arange(12).view(
        1, 12
    )  # an integer buffer, as BERT saves
    return state


def save_ckpt(path, state, shards=1):
    path.mkdir(parents=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
    else:
        wmap = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(path / fname))
            wmap.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wmap})
        )
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    return path


@pytest.fixture
def ckpts(tmp_path):
    base = make_state(0)
    states = {"base": base, **{f"m{i}": make_state(i, base) for i in (1, 2, 3)}}
    for i, (name, st) in enumerate(states.items()):
        save_ckpt(tmp_path / name, st, shards=1 + i)
    return tmp_path, states


def config(root, method="ties", models=("m1", "m2", "m3"), base="base", **extra):
    data = {
        "merge_method": method,
        "models": [
            {"model": str(root / m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models
        ],
    }
    if base:
        data["base_model"] = str(root / base)
    data.update(extra)
    return alg.parse_merge_config(data)


def read(path):
    return alg.Checkpoint(path).load_all()


def test_streamed_ties_equals_in_memory_per_tensor(ckpts, monkeypatch):
    root, states = ckpts
    cfg = config(root)
    cfg.models[1].parameters = {
        "weight": [0.2, 1.0],
        "density": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}],
    }
    summary = alg.merge_checkpoints(cfg, root / "out", max_shard_bytes=3000)
    out = root / "out"
    assert summary["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
    merged = read(out)
    assert set(merged) == set(states["base"])
    assert torch.equal(merged["embeddings.position_ids"], states["base"]["embeddings.position_ids"])
    for name in SHAPES:
        layer = int(name.split(".")[2]) if ".layers." in name else None
        t = layer / 2 if layer is not None else 0.0  # 3 layers: positions 0, 0.5, 1
        w1 = 0.2 + 0.8 * t
        d1 = 0.9 if "mlp" in name else 0.3
        want = alg.ties(states["base"][name], [states[m][name] for m in ("m1", "m2", "m3")],
                        weight=[1.0, w1, 1.0], density=[0.5, d1, 0.5])
        assert torch.allclose(merged[name], want, atol=1e-6), name
    monkeypatch.setattr(
        tensors, "CHUNK_ELEMENTS", 200
    )  # big tensors read and written in several blocks
    alg.merge_checkpoints(cfg, root / "out2")
    again = read(root / "out2")
    assert all(torch.allclose(again[k].float(), merged[k].float(), atol=1e-6) for k in merged)


def test_dtype_and_out_dtype(ckpts):
    root, states = ckpts
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in states["m1"].items()}
    save_ckpt(root / "m1bf", bf)
    with pytest.raises(MergeError, match="mixed dtypes: .* set 'dtype: float32'"):
        alg.merge_checkpoints(config(root, models=("m1bf", "m2")), root / "o")
    assert not (root / "o").exists()
    alg.merge_checkpoints(
        config(root, models=("m1bf", "m2"), dtype="float32", out_dtype="bfloat16"), root / "o"
    )
    out = read(root / "o")
    assert (
        out["lm_head.weight"].dtype == torch.bfloat16
        and out["embeddings.position_ids"].dtype == torch.int64
    )
    assert json.loads((root / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _no_leftovers(root):
    return not [p for p in root.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("case,match", [
    ("shape", r"is \(40, 16\) in base_model but \(40, 8\) in .*different architectures"),
    ("missing", r"lacks tensor 'lm_head.weight'"),
    ("nan", r"holds NaN or inf values"),
    ("int", r"integer tensor embeddings.position_ids differs"),
    ("nobase", r"needs base_model"),
    ("pickle", r"never unpickles"),
    ("truncated", r"not a readable safetensors file"),
])
def test_bad_input_is_one_line_and_leaves_nothing(ckpts, case, match):
    root, states = ckpts
    bad = dict(states["m1"])
    if case == "shape":
        bad["lm_head.weight"] = torch.zeros(40, 8)
    elif case == "missing":
        del bad["lm_head.weight"]
    elif case == "nan":
        bad["model.layers.2.mlp.up_proj.weight"] = bad["model.layers.2.mlp.up_proj.weight"].clone()
        bad["model.layers.2.mlp.up_proj.weight"][3, 3] = float("nan")
    elif case == "int":
        bad["embeddings.position_ids"] = torch.arange(12).view(1, 12).flip(1)
    if case == "pickle":
        (root / "bad").mkdir()
        (root / "bad" / "pytorch_model.bin").write_bytes(b"not really")
    elif case == "truncated":
        save_ckpt(root / "bad", bad)
        data = (root / "bad" / "model.safetensors").read_bytes()
        (root / "bad" / "model.safetensors").write_bytes(data[:200])
    else:
        save_ckpt(root / "bad", bad)
    cfg = config(root, models=("bad", "m2"), base=None if case == "nobase" else "base")
    with pytest.raises(MergeError, match=match) as err:
        alg.merge_checkpoints(cfg, root / "out")
    assert "\n" not in str(err.value)
    assert not (root / "out").exists() and _no_leftovers(root)


def test_existing_output_needs_overwrite_and_only_deltatunes_files_are_replaced(ckpts):
    from deltatune.io.outdir import OutputError

    root, _ = ckpts
    out = root / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="exists; pass overwrite=True"):
        alg.merge_checkpoints(config(root), out)
    with pytest.raises(OutputError, match="holds files deltatune did not write"):
        alg.merge_checkpoints(config(root), out, overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    alg.merge_checkpoints(config(root), out)
    (out / "mine.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"stale")
    alg.merge_checkpoints(
        config(root), out, overwrite=True
    )  # the merge's files replaced, the user's kept
    assert (out / "mine.txt").read_text() == "mine" and (
        out / "model.safetensors"
    ).stat().st_size > 5
    assert _no_leftovers(root)


def test_config_errors(tmp_path, ckpts):
    root, _ = ckpts
    with pytest.raises(MergeConfigError, match="not found locally; deltatune never downloads"):
        alg.parse_merge_config({"merge_method": "ties", "models": [{"model": "org/some-model"}]})
    with pytest.raises(MergeConfigError, match="'slices'.*not supported"):
        alg.parse_merge_config({"merge_method": "ties", "slices": []})
    with pytest.raises(MergeConfigError, match="unknown merge method 'tiez'"):
        alg.merge_checkpoints(config(root, method="tiez"), root / "o")
    with pytest.raises(MergeConfigError, match="has no parameter 'gamma'"):
        cfg = config(root)
        cfg.parameters["gamma"] = 0.1
        alg.merge_checkpoints(cfg, root / "o")
    (tmp_path / "c.yaml").write_text("merge_method: [unclosed")
    with pytest.raises(MergeConfigError, match="not valid YAML"):
        alg.load_merge_config(tmp_path / "c.yaml")


def test_fisher_merge_from_stats_files(ckpts):
    root, states = ckpts
    stats = {}
    for m in ("m1", "m2"):
        f = {k: torch.rand(v.shape) for k, v in states[m].items() if v.is_floating_point()}
        save_file(f, str(root / f"{m}_fisher.safetensors"))
        stats[m] = f
    cfg = alg.parse_merge_config(
        {
            "merge_method": "fisher",
            "models": [
                {"model": str(root / m), "stats": str(root / f"{m}_fisher.safetensors")}
                for m in ("m1", "m2")
            ],
        }
    )
    alg.merge_checkpoints(cfg, root / "fisher")
    out = read(root / "fisher")
    k = "lm_head.weight"
    f1, f2 = stats["m1"][k] + 1e-6, stats["m2"][k] + 1e-6
    assert torch.allclose(
        out[k], (f1 * states["m1"][k] + f2 * states["m2"][k]) / (f1 + f2), atol=1e-5
    )
    cfg.models[1].stats = None
    with pytest.raises(MergeError, match="needs a fisher statistics file per model"):
        alg.merge_checkpoints(cfg, root / "fisher2")


@pytest.mark.slow
def test_peak_memory_stays_under_twice_the_largest_shard(tmp_path):
    """Checkpoints in 8 shards of 4 MB: the merge adds less than 2 × 4 MB of resident memory (after
    a tiny warm-up merge has paged in the interpreter's and torch's code)."""
    for i, name in enumerate(["tiny_base", "tiny"]):
        save_ckpt(
            tmp_path / name, {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))}
        )
    for i, name in enumerate(["base", "a", "b"]):
        g = torch.Generator().manual_seed(i)
        parts = {
            f"layers.{s}.w{j}": torch.randn(512, 1024, generator=g)
            for s in range(8)
            for j in range(2)
        }
        save_ckpt(tmp_path / name, parts, shards=8)
    script = textwrap.dedent(f"""
        import json, torch, safetensors.torch
        from pathlib import Path
        from deltatune import algebra as alg
        from deltatune.algebra import tensors
        torch.set_num_threads(1)
        # scaled down with the checkpoint (the default is 256K elements)
        tensors.CHUNK_ELEMENTS = 1 << 15
        root = Path({str(tmp_path)!r})
        def cfg(base, models):
            p = {{"weight": 1.0, "density": 0.3}}
            return alg.parse_merge_config({{"merge_method": "ties", "base_model": str(root / base),
                "models": [{{"model": str(root / m), "parameters": dict(p)}} for m in models]}})
        tensors.CHUNK_ELEMENTS = 1 << 10
        alg.merge_checkpoints(cfg("tiny_base", ["tiny", "tiny"]), root / "warm")
        tensors.CHUNK_ELEMENTS = 1 << 15
        def status(key):  # (ru_maxrss would include the parent's image at fork time)
            return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
        rss = status("VmRSS")
        alg.merge_checkpoints(cfg("base", ["a", "b"]), root / "out", max_shard_bytes=4 << 20)
        peak = status("VmHWM")
        out_shards = len(list((root / "out").glob("*.safetensors")))
        print(json.dumps({{"delta_mb": peak - rss, "out_shards": out_shards}}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shard_mb = max(p.stat().st_size for p in (tmp_path / "a").glob("*.safetensors")) / 2**20
    assert result["out_shards"] == 8 and 3.9 < shard_mb < 4.1
    assert result["delta_mb"] < 2 * shard_mb, result
