"""Task vectors: τ = θ_finetuned − θ_base as a ``{parameter name: tensor or LowRank}`` map.

Made from full checkpoints or state dicts, from a model's current weights, or from attached/saved
adapters through the engine (``delta.delta_weight(host)``, the single source of every delta's ΔW);
plain LoRAs can stay factored. Task vectors add, subtract, negate (forgetting), scale, merge with
any registered method, and apply to a base model or state dict.

Task arithmetic — Ilharco et al., Editing Models with Task Arithmetic,
https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

from .errors import MergeError
from .lowrank import LowRank, concat_lora, svd_lora

Entry = Union[torch.Tensor, LowRank]
FORMAT = "deltatune-task-vector"


class TaskVector(Mapping):
    """An immutable map from parameter names (as in the base model's ``state_dict``) to changes."""

    def __init__(self, entries: Mapping[str, Entry] | None = None) -> None:
        self._entries: dict[str, Entry] = dict(entries or {})
        for name, value in self._entries.items():
            if not isinstance(value, (torch.Tensor, LowRank)):
                raise MergeError(
                    f"task vector entry {name!r} must be a tensor or LowRank, got "
                    f"{type(value).__name__}"
                )

    # -- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        factored = sum(isinstance(v, LowRank) for v in self._entries.values())
        return (
            f"TaskVector({len(self)} tensors, {factored} factored, {self.numel():,} stored numbers)"
        )

    def numel(self) -> int:
        return sum(v.numel() for v in self._entries.values())

    @property
    def factored(self) -> bool:
        return any(isinstance(v, LowRank) for v in self._entries.values())

    def dense(self) -> "TaskVector":
        """Every factored entry expanded to its dense ΔW."""
        return TaskVector(
            {k: v.dense() if isinstance(v, LowRank) else v for k, v in self._entries.items()}
        )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]
    ) -> "TaskVector":
        """θ_ft − θ_base for every floating tensor both hold (shapes must agree)."""
        out = {}
        for name, t in finetuned.items():
            if name not in base or not t.is_floating_point():
                continue
            b = base[name]
            if b.shape != t.shape:
                raise MergeError(
                    f"{name} is {tuple(b.shape)} in the base but {tuple(t.shape)} in the "
                    "fine-tuned model; use the model it was fine-tuned from"
                )
            diff = t.detach().float() - b.detach().float()
            if not bool(torch.isfinite(diff).all()):
                raise MergeError(f"{name} holds NaN or inf values; the checkpoint is corrupt")
            out[name] = diff
        if not out:
            raise MergeError(
                "the base and fine-tuned weights share no floating tensor name; pass matching "
                "state dicts"
            )
        return cls(out)

    @classmethod
    def from_checkpoints(
        cls, base: str | os.PathLike, finetuned: str | os.PathLike
    ) -> "TaskVector":
        """From two safetensors checkpoints (a file, or a directory of shards), read one tensor at a
        time."""
        from .checkpoint import Checkpoint

        b, f = Checkpoint(base), Checkpoint(finetuned)
        missing = sorted(set(b.names()) ^ set(f.names()))
        if missing:
            raise MergeError(
                f"{missing[0]!r} is in only one of {base} and {finetuned}; they are not the same "
                "architecture"
            )
        out = {}
        for name in b.names():
            if b.dtype(name).is_floating_point:
                out.update(
                    cls.from_state_dicts({name: b.load(name)}, {name: f.load(name)})._entries
                )
        return cls(out)

    @classmethod
    def from_model(cls, model: nn.Module, base: Mapping[str, torch.Tensor]) -> "TaskVector":
        """The change of ``model``'s current parameters relative to ``base`` (a state dict)."""
        return cls.from_state_dicts(base, {n: p for n, p in model.named_parameters()})

    @classmethod
    def from_adapter(
        cls, model: nn.Module, name: str, *, factored: bool = False, copies: bool = True
    ) -> "TaskVector":
        """ΔW of attached delta ``name`` for every module it changes, plus (``copies``) the change
        of its trainable module copies (e.g. a new head) relative to the originals.

        ``factored=True`` keeps plain LoRA deltas on Linear/Conv1D/Embedding as :class:`LowRank`.
        """
        from ..core.host import DeltaHost, ModuleCopy, iter_hosts

        out: dict[str, Entry] = {}
        with torch.no_grad():
            for path, host in iter_hosts(model):
                if name not in host.delta_names():
                    continue
                prefix = f"{path}." if path else ""
                if isinstance(host, ModuleCopy):
                    if not copies:
                        continue
                    base = dict(host.base.named_parameters())
                    for pname, p in host.part(name).named_parameters():
                        out[prefix + pname] = p.detach().float() - base[pname].detach().float()
                    continue
                assert isinstance(host, DeltaHost)
                delta = host.part(name)
                low = _lowrank_of(delta, host) if factored else None
                changes = delta.delta_weight(host)
                for pname, change in changes.items():
                    out[prefix + pname] = (
                        low
                        if (pname == "weight" and low is not None)
                        else change.detach().float().clone()
                    )
        if not out:
            raise MergeError(
                f"no delta named {name!r} is attached to this model; attach or load it first"
            )
        return cls(out)

    @classmethod
    def from_adapter_dir(
        cls, model: nn.Module, path: str | os.PathLike, *, factored: bool = False
    ) -> "TaskVector":
        """Load a saved adapter (deltatune or peft layout) onto ``model`` briefly and take its ΔW;
        the model is left as it was."""
        from ..core.model import detach
        from ..io.adapter import load_adapter

        tmp = "_taskvector_tmp"
        load_adapter(model, path, name=tmp, activate=False)
        try:
            return cls.from_adapter(model, tmp, factored=factored)
        finally:
            detach(model, tmp)

    # -- arithmetic -----------------------------------------------------------------------------
    def __add__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        out = dict(self._entries)
        for k, v in other.items():
            out[k] = _add(out[k], v) if k in out else v
        return TaskVector(out)

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, factor: float) -> "TaskVector":
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            return NotImplemented
        return TaskVector(
            {
                k: v.scaled(factor) if isinstance(v, LowRank) else v * factor
                for k, v in self._entries.items()
            }
        )

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> "TaskVector":
        return self * (1.0 / factor)

    def norm(self) -> float:
        """Frobenius norm over all entries."""
        return math.sqrt(
            sum(
                float((v.dense() if isinstance(v, LowRank) else v).double().pow(2).sum())
                for v in self._entries.values()
            )
        )

    def cosine(self, other: "TaskVector") -> float:
        """Cosine similarity with another task vector (entries missing on one side count as
        zero)."""
        dot = sum(
            float((_dense(v).double() * _dense(other[k]).double()).sum())
            for k, v in self.items()
            if k in other
        )
        denom = self.norm() * other.norm()
        return dot / denom if denom > 0 else 0.0

    def to_rank(self, rank: int) -> "TaskVector":
        """Factor every 2-D entry to at most ``rank`` (truncated SVD); other entries stay dense."""
        out: dict[str, Entry] = {}
        for k, v in self._entries.items():
            if isinstance(v, LowRank):
                out[k] = v.to_rank(rank)
            elif v.dim() == 2:
                u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
                r = min(rank, s.numel())
                root = s[:r].sqrt()
                out[k] = LowRank(
                    (root[:, None] * vh[:r]).to(v.dtype), (u[:, :r] * root).to(v.dtype)
                )
            else:
                out[k] = v
        return TaskVector(out)

    # -- applying ---------------------------------------------------------------------------------
    def apply_to(self, target: nn.Module | Mapping[str, torch.Tensor], scale: float = 1.0) -> Any:
        """θ + scale·τ. A module is changed in place (its base weights, when hosts wrap them) and
        returned; a state dict gives a new state dict."""
        if isinstance(target, nn.Module):
            with torch.no_grad():
                for name, v in self._entries.items():
                    p = _base_param(target, name)
                    p.add_((_dense(v) * scale).to(p.dtype).view(p.shape))
            return target
        out = dict(target)
        for name, v in self._entries.items():
            if name not in out:
                raise MergeError(
                    f"the state dict has no {name!r}; apply the task vector to the model it came "
                    "from"
                )
            t = out[name]
            out[name] = (t.float() + _dense(v).view(t.shape) * scale).to(t.dtype)
        return out

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (atomic); factored entries as ``<name>::A`` / ``<name>::B``."""
        from ..io.files import save_tensors

        tensors: dict[str, torch.Tensor] = {}
        factors: dict[str, dict[str, Any]] = {}
        for k, v in self._entries.items():
            if isinstance(v, LowRank):
                tensors[f"{k}::A"], tensors[f"{k}::B"] = v.A, v.B
                factors[k] = {"scale": v.scale, "transposed": v.transposed}
            else:
                tensors[k] = v
        save_tensors(
            path,
            tensors,
            metadata={"format": FORMAT, "version": "1", "factored": json.dumps(factors)},
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TaskVector":
        from safetensors import safe_open

        from ..io.files import load_tensors

        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise MergeError(
                f"{path} is not a deltatune task vector file (format={meta.get('format')!r}); save "
                "one with TaskVector.save"
            )
        factors = json.loads(meta.get("factored", "{}"))
        out: dict[str, Entry] = {}
        for k, info in factors.items():
            out[k] = LowRank(
                tensors.pop(f"{k}::A"),
                tensors.pop(f"{k}::B"),
                float(info["scale"]),
                bool(info["transposed"]),
            )
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise MergeError(f"{path}: entry {k} holds NaN or inf values; the file is corrupt")
            out[k] = v
        return cls(out)


def _dense(v: Entry) -> torch.Tensor:
    return v.dense() if isinstance(v, LowRank) else v


def _add(a: Entry, b: Entry) -> Entry:
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        return concat_lora([a, b])
    return _dense(a) + _dense(b)


def _lowrank_of(delta: Any, host: Any) -> LowRank | None:
    """The delta's weight change kept factored when the delta contract gives it as low-rank terms
    (``Delta.factors``), else None (the dense ΔW is used); several terms are one LowRank of the
    summed rank, exactly."""
    terms = delta.factors(host)
    if not terms:
        return None
    lows = [
        LowRank(t.A.float().clone(), t.B.float().clone(), float(t.scale), t.transposed)
        for t in terms
    ]
    return lows[0] if len(lows) == 1 else concat_lora(lows)


def _base_param(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.host import Host

    module = model
    *path, pname = name.split(".")
    for part in path:
        if isinstance(module, Host):
            module = module.base
        module = getattr(module, part, None)
        if module is None:
            raise MergeError(
                f"the model has no parameter {name!r}; apply the task vector to the model it came "
                "from"
            )
    if isinstance(module, Host):
        module = module.base
    p = getattr(module, pname, None)
    if not isinstance(p, torch.Tensor):
        raise MergeError(
            f"the model has no parameter {name!r}; apply the task vector to the model it came from"
        )
    return p


def merge_task_vectors(
    vectors: Sequence[TaskVector],
    method: str = "task_arithmetic",
    *,
    rank: int | None = None,
    **params: Any,
) -> TaskVector:
    """Merge task vectors with a registered method (the base is zero: every method sees θ_k = τ_k),
    or with ``"lora_concat"`` (exact, rank adds up) / ``"lora_svd"`` (re-factored to ``rank``) on
    factored entries. Per-model parameters may be lists (one per vector) or scalars; an entry
    missing from a vector counts as no change."""
    if not vectors:
        raise MergeError("no task vectors to merge")
    keys = list(dict.fromkeys(k for v in vectors for k in v))
    k = len(vectors)
    if method in ("lora_concat", "lora_svd"):
        weights = _per_model(params.pop("weight", 1.0), k, "weight")
        if params:
            raise MergeError(
                f"{method} takes weight (and rank for lora_svd); unexpected {sorted(params)[0]!r}"
            )
        if method == "lora_svd" and rank is None:
            raise MergeError("lora_svd needs rank=...: the rank of the merged LoRA")
        out: dict[str, Entry] = {}
        for key in keys:
            items = [(v[key], w) for v, w in zip(vectors, weights) if key in v]
            if not all(isinstance(e, LowRank) for e, _ in items):
                raise MergeError(
                    f"{key} is not factored in every task vector; build them with factored=True or "
                    "use a dense method"
                )
            facs, ws = [e for e, _ in items], [w for _, w in items]
            out[key] = (
                concat_lora(facs, ws) if method == "lora_concat" else svd_lora(facs, rank, ws)
            )
        return TaskVector(out)
    from .registry import get_method

    spec = get_method(method)
    per_model = [
        {p: _per_model(params[p], k, p)[i] for p in spec.model_params if p in params}
        for i in range(k)
    ]
    shared = {p: v for p, v in params.items() if p not in spec.model_params}
    kwargs = spec.resolve(per_model, shared)
    out = {}
    for key in keys:
        shape = next(_dense(v[key]).shape for v in vectors if key in v)
        taus = [_dense(v[key]).float() if key in v else torch.zeros(shape) for v in vectors]
        base = torch.zeros(shape)
        merged = spec(base if spec.needs_base else None, taus, **kwargs)
        out[key] = merged
    merged_tv = TaskVector(out)
    return merged_tv.to_rank(rank) if rank is not None else merged_tv


def _per_model(value: Any, k: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise MergeError(
                f"{name} has {len(value)} values for {k} task vectors; give one per vector or a "
                "single value"
            )
        return list(value)
    return [value] * k
