"""Write a merged causal LM as one GGUF file, or a LoRA as a llama.cpp LoRA GGUF.

GGUF is what llama.cpp, ollama and LM Studio run, so an adapted model leaves deltatune in it:

* :func:`write_gguf` takes a transformers Llama-family causal LM whose deltas are merged
  (``dt.merge(model, unload=True)``) and writes its weights as ``f16``, ``q8_0`` or ``q4_0``
  blocks (quantized from the float weights by the ``gguf`` package's reference quantizers), with
  the model's hyper-parameters and a tokenizer (copied key by key from a GGUF file such as the
  bundled SmolLM2 one, or built from a ``tokenizer.json`` folder) and its chat template;
* :func:`write_gguf_lora` writes the LoRA factors themselves in llama.cpp's adapter layout
  (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, tensors
  ``blk.N.attn_q.weight.lora_a`` / ``.lora_b``), which llama.cpp applies on the GGUF base at load
  (``--lora FILE``), so one base file serves many adapters.

Two layout facts of llama.cpp's converter are kept, or the file loads but computes something else:
the rows of the query and key projections are reordered per head (llama.cpp's rotary embedding
pairs neighbouring dimensions, transformers' pairs the two halves of each head), which for a LoRA
reorders the rows of ``B`` only; and llama.cpp scales a LoRA by ``alpha / rank`` with the rank read
from the tensor, so each layer's own scale is folded into ``B`` where it differs from that.

Rows whose length is not a whole number of 32-value blocks cannot be quantized: such a tensor is
written as f16 instead (llama.cpp's converter does the same) and listed in ``fallback``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.host import DeltaHost, Host
from .files import atomic_write
from .gguf_layout import (  # noqa: F401  (re-exported: the public GGUF API lives here)
    ARCHITECTURES,
    LORA_FILE,
    MODEL_FILE,
    QUANTS,
    GGUFContents,
    GGUFExportError,
    _gguf,
    _gguf_name,
    _hparams,
    _name_map,
    _permute_rows,
    _transformers_lm,
    _unpermute_rows,
    check_architecture,
    check_quant,
    read_gguf,
    read_gguf_weights,
)


@dataclass
class GGUFExport:
    """What was written: the file, its size, the tensor types used and the tensors that fell back
    to f16 because their rows are not whole quantization blocks."""

    path: Path
    kind: str  # "model" or "lora"
    quant: str
    bytes: int
    tensors: int
    types: dict[str, int] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"file": self.path.name, "kind": self.kind, "quant": self.quant,
                "bytes": self.bytes, "tensors": self.tensors, "types": self.types,
                "fallback_f16": self.fallback}


def _check_plain(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, Host):
            raise GGUFExportError(
                f"{path} still holds deltas; merge them first (dt.merge(model, unload=True)) or "
                "write the LoRA itself with write_gguf_lora"
            )


def _model_tensors(lm: nn.Module, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every weight of the merged model."""
    gguf = _gguf()
    config = lm.config
    hp = _hparams(config)
    tmap = _name_map(gguf, arch, config.num_hidden_layers)
    embed = lm.get_input_embeddings().weight
    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in lm.state_dict().items():
        if name.endswith("lm_head.weight"):
            tied = tensor.data_ptr() == embed.data_ptr() or torch.equal(tensor, embed)
            if tied:  # llama.cpp uses token_embd for the output when output.weight is absent
                continue
        t = tensor.detach().float().cpu()
        # a sum is NaN/inf when any value is (and costs a tenth of an element-wise check)
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise GGUFExportError(
                f"{name} holds NaN or infinite values; the merged model is broken: retrain or "
                "check the adapter"
            )
        gname = _gguf_name(tmap, name)
        if ".attn_q." in gname:
            t = _permute_rows(t, hp["heads"])
        elif ".attn_k." in gname:
            t = _permute_rows(t, hp["kv_heads"])
        out.append((gname, t))
    return out


def _tensor_type(gname: str, t: torch.Tensor, quant: str) -> str:
    """The GGML type a tensor is written in: vectors (norms, biases) stay f32, as in llama.cpp's
    files; with q4_0 the token embedding and the output head keep q8_0 (llama.cpp's quantizer
    gives the output a higher type than the rest, Q6_K, which gguf-py cannot write)."""
    if t.ndim < 2:
        return "F32"
    if quant == "q4_0" and gname.split(".")[0] in ("token_embd", "output"):
        return "Q8_0"
    return QUANTS[quant][0]


def _encode(gguf: Any, t: torch.Tensor, type_name: str) -> tuple[np.ndarray, Any]:
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    data = t.numpy()
    if type_name == "F32":
        return data.astype(np.float32), qtype
    if type_name == "F16":
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


def _block(gguf: Any, type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)][0]


def _add_hparams(writer: Any, arch: str, config: Any) -> None:
    hp = _hparams(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(hp["heads"]))
    writer.add_head_count_kv(int(hp["kv_heads"]))
    writer.add_rope_freq_base(hp["theta"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(hp["head_dim"]))
    if hp["head_dim"] != config.hidden_size // hp["heads"]:
        writer.add_key_length(int(hp["head_dim"]))
        writer.add_value_length(int(hp["head_dim"]))


def _copy_fields(writer: Any, source: GGUFContents, prefixes: tuple[str, ...],
                 skip: set[str]) -> int:
    """Copy the key/values of ``source`` whose key starts with one of ``prefixes``, typed as in the
    source file."""
    gguf = _gguf()
    n = 0
    for key, (kind, item, val) in source.fields.items():
        if not key.startswith(prefixes) or key in skip:
            continue
        sub = gguf.GGUFValueType(item) if item is not None else None
        writer.add_key_value(key, val, gguf.GGUFValueType(kind), sub_type=sub)
        n += 1
    return n


def _add_tokenizer(writer: Any, source: Path, vocab_size: int) -> None:
    """The tokenizer and chat template: every ``tokenizer.*`` key of a GGUF file (exactly as
    there), or a BPE ``tokenizer.json`` folder converted with gguf-py's vocab readers."""
    gguf = _gguf()
    source = Path(source)
    if source.is_file():
        contents = read_gguf(source)
        tokens = contents.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFExportError(f"{source} holds no tokenizer (tokenizer.ggml.tokens)")
        if len(tokens[2]) != vocab_size:
            raise GGUFExportError(
                f"{source} has {len(tokens[2])} tokens but the model's vocabulary has "
                f"{vocab_size}; pass the GGUF or tokenizer folder of the model's own tokenizer"
            )
        _copy_fields(writer, contents, ("tokenizer.",), set())
        return
    if not (source / "tokenizer.json").is_file():
        raise GGUFExportError(
            f"{source} is neither a GGUF file nor a folder with tokenizer.json; pass the "
            "tokenizer the model was trained with"
        )
    try:
        vocab = gguf.vocab.BpeVocab(source)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise GGUFExportError(
            f"{source}/tokenizer.json is not a BPE tokenizer GGUF export can write ({exc}); "
            "convert the model with llama.cpp's convert_hf_to_gguf.py"
        ) from None
    texts, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        texts.append(text)
        types.append(ttype)
    if len(texts) > vocab_size:
        raise GGUFExportError(
            f"{source} has {len(texts)} tokens but the model's vocabulary has {vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    for i in range(len(texts), vocab_size):  # embedding rows no token uses (padded vocabularies)
        texts.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    # merges, special token ids and the chat template (chat_template.jinja or tokenizer_config)
    gguf.vocab.SpecialVocab(source, load_merges=True, n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )


def _write(path: Path, build: Any) -> int:
    """Write the file atomically (temp file beside ``path``, then a rename): ``build(writer_path)``
    fills it. Returns its size."""
    atomic_write(path, build)
    return path.stat().st_size


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    quant: str = "q8_0",
    tokenizer: str | os.PathLike,
    metadata_from: str | os.PathLike | None = None,
    name: str | None = None,
) -> GGUFExport:
    """Write a merged Llama-family causal LM as one GGUF file.

    ``model``: a transformers ``*ForCausalLM`` (or deltatune's wrapper of one) with no deltas left
    unmerged (``dt.merge(model, unload=True)`` first). ``quant``: ``f16``, ``q8_0`` or ``q4_0``.
    ``tokenizer``: a GGUF file whose ``tokenizer.*`` keys (vocabulary, merges, special ids, chat
    template) are copied as they are, or a folder with a BPE ``tokenizer.json``.
    ``metadata_from``: a GGUF file whose ``general.*`` descriptive keys (name, license, ...) are
    carried over (default: ``tokenizer`` when it is a GGUF file).
    """
    gguf = _gguf()
    check_quant(quant)
    arch = check_architecture(model)
    lm = _transformers_lm(model)
    _check_plain(lm)
    config = lm.config
    tensors = _model_tensors(lm, arch)
    encoded, types, fallback = [], {}, []
    for gname, t in tensors:
        tname = _tensor_type(gname, t, quant)
        if tname not in ("F32", "F16") and t.shape[-1] % _block(gguf, tname):
            tname = "F16"  # rows not whole blocks: llama.cpp's converter falls back to f16 too
            fallback.append(gname)
        data, qtype = _encode(gguf, t, tname)
        encoded.append((gname, data, qtype))
        types[tname] = types.get(tname, 0) + 1
    meta = metadata_from
    if meta is None and Path(tokenizer).is_file():
        meta = tokenizer

    def build(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        if meta is not None:
            skip = {"general.architecture", "general.type", "general.file_type",
                    "general.quantization_version", "general.alignment"}
            _copy_fields(writer, read_gguf(meta), ("general.",), skip)
        if name:
            writer.add_key_value("general.name", name, gguf.GGUFValueType.STRING)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_hparams(writer, arch, config)
        writer.add_file_type(QUANTS[quant][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, Path(tokenizer), int(config.vocab_size))
        for gname, data, qtype in encoded:
            writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    size = _write(path, build)
    return GGUFExport(path, "model", quant, size, len(encoded), types, fallback)


def lora_factors(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The active LoRA deltas of a Llama-family model as llama.cpp LoRA tensors: ``{GGUF base
    tensor name: (A (r, in), B (out, r))}`` in llama.cpp's row order, and the ``alpha`` that makes
    llama.cpp's ``alpha / r`` equal to each layer's scale (a layer whose own scale differs has it
    folded into its ``B``). Refuses a delta that is not exactly a low-rank weight change."""
    gguf = _gguf()
    arch = check_architecture(model)
    lm = _transformers_lm(model)
    config = lm.config
    hp = _hparams(config)
    tmap = _name_map(gguf, arch, config.num_hidden_layers)
    terms: dict[str, list] = {}
    for path, host in lm.named_modules():
        if not isinstance(host, Host):
            continue
        if not isinstance(host, DeltaHost):
            raise GGUFExportError(
                f"{path} holds a copied module, not a low-rank change; write it merged with "
                "--format gguf"
            )
        for n in host.active:
            if n in host.merged:
                raise GGUFExportError(
                    f"delta {n!r} is merged into {path}; unmerge it (dt.unmerge) to write the "
                    "LoRA itself"
                )
            factors = host.part(n).factors(host)
            method = host.part(n).spec.method
            if factors is None or any(f.transposed for f in factors):
                raise GGUFExportError(
                    f"delta {n!r} ({method}) at {path} is not a plain LoRA on a Linear layer; "
                    "llama.cpp LoRA files hold only those: write the merged model with "
                    "--format gguf"
                )
            terms.setdefault(path, []).extend(factors)
    if not terms:
        raise GGUFExportError(
            "the model has no active LoRA delta to write; load an adapter first"
        )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    alpha = None
    for path, factors in terms.items():
        gname = _gguf_name(tmap, f"{path}.weight")
        if gname.startswith(("output.", "token_embd.")) and config.tie_word_embeddings:
            raise GGUFExportError(
                f"a LoRA on {path} changes the tied embedding/output matrix, which llama.cpp LoRA "
                "files cannot express; write the merged model with --format gguf"
            )
        a = torch.cat([f.A.detach().float().cpu() for f in factors], 0)  # (R, in)
        rank = a.shape[0]
        if alpha is None:
            alpha = factors[0].scale * factors[0].A.shape[0]
        # llama.cpp applies (alpha / R) · B·A with R the rank of the stored tensors
        b = torch.cat([f.B.detach().float().cpu() * (f.scale * rank / alpha) for f in factors], 1)
        if gname.startswith("blk.") and ".attn_q." in gname:
            b = _permute_rows(b, hp["heads"])
        elif ".attn_k." in gname:
            b = _permute_rows(b, hp["kv_heads"])
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise GGUFExportError(f"the LoRA at {path} holds NaN or infinite values; retrain it")
        out[gname] = (a.contiguous(), b.contiguous())
    return out, float(alpha)


def write_gguf_lora(
    model: nn.Module, path: str | os.PathLike, *, name: str | None = None
) -> GGUFExport:
    """Write the active LoRA deltas of ``model`` (attached, not merged) as a llama.cpp LoRA GGUF
    (f32 factors, ``adapter.lora.alpha``), to be applied on the GGUF of the same base model."""
    gguf = _gguf()
    arch = check_architecture(model)
    factors, alpha = lora_factors(model)

    def build(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_key_value("general.name", name, gguf.GGUFValueType.STRING)
        for gname, (a, b) in factors.items():
            writer.add_tensor(f"{gname}.lora_a", a.numpy())
            writer.add_tensor(f"{gname}.lora_b", b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    size = _write(path, build)
    return GGUFExport(path, "lora", "f32", size, 2 * len(factors), {"F32": 2 * len(factors)})


@torch.no_grad()
def load_gguf_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a GGUF file written by :func:`write_gguf` back into ``model`` (a transformers
    Llama-family causal LM of the same shape), dequantized and in transformers' row order: the
    weights the GGUF runtime computes with, to evaluate the exported model inside deltatune.
    Returns the names of the parameters loaded."""
    gguf = _gguf()
    arch = check_architecture(model)
    lm = _transformers_lm(model)
    hp = _hparams(lm.config)
    tmap = _name_map(gguf, arch, lm.config.num_hidden_layers)
    weights = read_gguf_weights(path)
    loaded = []
    for name, param in lm.state_dict(keep_vars=True).items():
        gname = _gguf_name(tmap, name)
        if gname not in weights and gname.startswith("output."):
            gname = "token_embd.weight"  # tied output head: llama.cpp reads the embedding
        if gname not in weights:
            raise GGUFExportError(f"{path} has no tensor {gname} for {name}; it is another model")
        w = weights[gname]
        if ".attn_q." in gname:
            w = _unpermute_rows(w, hp["heads"])
        elif ".attn_k." in gname:
            w = _unpermute_rows(w, hp["kv_heads"])
        if w.shape != param.shape:
            raise GGUFExportError(
                f"{path}: {gname} has shape {tuple(w.shape)}, the model's {name} "
                f"{tuple(param.shape)}; it is another model"
            )
        param.copy_(w.to(param.dtype))
        loaded.append(name)
    return loaded
