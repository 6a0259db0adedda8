"""Parity with the real mergekit 0.1.5: the same YAML through both gives the same tensors.

Tiny Llama checkpoints (mergekit's planner needs a known architecture; its 0.1.5 CLI fails on
BERT-family checkpoints, which deltatune must merge — checked at the end).
"""

import json
import os

import pytest
import torch
import yaml

from deltatune import algebra as alg

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["a", "b", "c"]):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + 0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
    return root


CONFIGS = {
    "linear": """
        merge_method: linear
        models:
          - {model: a, parameters: {weight: 1.0}}
          - {model: b, parameters: {weight: 2.0}}
          - {model: c, parameters: {weight: 0.5}}
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: 0.7}}
        parameters: {lambda: 1.3}
    """,
    "ties": """
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.5, density: 0.3}}
          - model: b
            parameters:
              weight: [0.2, 0.8]
              density:
                - {filter: mlp, value: 0.8}
                - {filter: self_attn, value: [0.2, 0.6]}
                - {value: 0.5}
          - {model: c, parameters: {weight: 1.0, density: 0.5}}
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
    """,
    "ties_rescaled": """
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 0.4}}
          - {model: b, parameters: {weight: 1.0, density: 0.7}}
        parameters: {normalize: false, rescale: true}
    """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 0.6, gamma: 0.05}}
          - {model: b, parameters: {weight: 0.5, density: 0.8, gamma: 0.1}}
    """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 0.6}}
          - {model: b, parameters: {weight: 0.5, density: 0.8}}
          - {model: c, parameters: {weight: 0.7, density: 0.7}}
    """,
    "dare_ties_dense": """
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1.0, density: 1.0}}
          - {model: b, parameters: {weight: 0.6, density: 1.0}}
        parameters: {normalize: true}
    """,
    "slerp": """
        merge_method: slerp
        base_model: base
        models:
          - model: base
          - model: a
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 1]}
            - {filter: mlp, value: [1, 0.5, 0]}
            - {value: 0.3}
    """,
    "model_stock": """
        merge_method: model_stock
        base_model: base
        models: [{model: a}, {model: b}, {model: c}]
    """,
    "model_stock_filter_wise": """
        merge_method: model_stock
        base_model: base
        models: [{model: a}, {model: b}, {model: c}]
        parameters: {filter_wise: true}
    """,
}


def _write(root, name, text):
    data = yaml.safe_load(text)
    for m in data["models"]:
        m["model"] = str(root / m["model"])
    if "base_model" in data:
        data["base_model"] = str(root / data["base_model"])
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def _run_mergekit(data, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(data), out_path=str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_yaml_same_tensors(llamas, name):
    path, data = _write(llamas, name, CONFIGS[name])
    _run_mergekit(data, llamas / f"mk_{name}")
    alg.merge_checkpoints(
        alg.load_merge_config(path), llamas / f"dt_{name}", max_shard_bytes=20_000
    )
    ours = alg.Checkpoint(llamas / f"dt_{name}")
    theirs = alg.Checkpoint(llamas / f"mk_{name}")
    assert set(ours.names()) == set(theirs.names())
    assert len(ours.files) > 1  # streamed into several shards
    for key in theirs.names():
        a, b = ours.load(key), theirs.load(key)
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=2e-6, rtol=1e-5), (
            f"{name}: {key} differs by {(a - b).abs().max()}"
        )


def test_bfloat16_ties_matches_to_bf16_precision(llamas):
    text = CONFIGS["ties"].replace("dtype: float32", "dtype: bfloat16")
    path, data = _write(llamas, "ties_bf16", text)
    _run_mergekit(data, llamas / "mk_bf16")
    alg.merge_checkpoints(alg.load_merge_config(path), llamas / "dt_bf16")
    ours, theirs = alg.Checkpoint(llamas / "dt_bf16"), alg.Checkpoint(llamas / "mk_bf16")
    off = total = 0
    for key in theirs.names():
        a, b = ours.load(key).float(), theirs.load(key).float()
        assert ours.dtype(key) == theirs.dtype(key) == torch.bfloat16
        # mergekit trims and elects signs on bfloat16 task vectors (many exact ties at the top-k
        # boundary), deltatune on float32 ones: all but a few boundary entries agree to
        # bfloat16 rounding
        off += int(((a - b).abs() > 0.01 * b.abs() + 1e-3).sum())
        total += b.numel()
    assert off / total < 0.01, f"{off / total:.3%} of entries differ"


def test_merged_llama_loads_and_runs_in_transformers(llamas):
    path, _ = _write(llamas, "load", CONFIGS["ties"])
    alg.merge_checkpoints(alg.load_merge_config(path), llamas / "dt_load", max_shard_bytes=30_000)
    assert json.loads((llamas / "dt_load" / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(llamas / "dt_load")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_bert_family_checkpoint_merges_where_mergekit_fails(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg)
    for i, name in enumerate(["base", "a", "b"]):
        with torch.no_grad():
            for p in bert.parameters():
                p.add_(0.01 * torch.randn(p.shape)) if i else None
        bert.save_pretrained(tmp_path / name)
        state = load_file(str(tmp_path / name / "model.safetensors"))
        state["embeddings.position_ids"] = torch.arange(24).view(
            1, 24
        )  # as sentence-transformers' files hold
        save_file(state, str(tmp_path / name / "model.safetensors"))
    data = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / m), "parameters": {"weight": 1.0, "density": 0.5}}
            for m in ("a", "b")
        ],
    }
    with pytest.raises(TypeError, match="can only concatenate list"):
        _run_mergekit(data, tmp_path / "mk")
    alg.merge_checkpoints(alg.parse_merge_config(data), tmp_path / "dt")
    merged = transformers.BertModel.from_pretrained(tmp_path / "dt")
    out = merged(input_ids=torch.tensor([[2, 7, 11]])).last_hidden_state
    assert torch.isfinite(out).all()
    assert torch.equal(
        alg.Checkpoint(tmp_path / "dt").load("embeddings.position_ids"),
        torch.arange(24).view(1, 24),
    )
