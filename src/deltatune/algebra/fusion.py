"""Learned composition of adapters at inference: AdapterFusion and a top-k mixture-of-LoRA router.

Both sit on every host that holds all the named adapters: the host computes its base output ``h``,
each adapter's output ``o_k = delta_k(x, h)`` is computed, and a small trainable layer mixes them.
The adapters stay frozen; only the mixing layers train. Installed through forward hooks on the hosts
(the engine is not changed); :meth:`remove` restores the model and the previous active set.

- AdapterFusion — Pfeiffer et al., https://arxiv.org/abs/2005.00247 (attention over adapters'
  outputs, query from the layer output, value initialised to the identity)
- Mixture of LoRA experts with top-k gating — Zadouri et al., https://arxiv.org/abs/2309.05444;
  Shazeer et al., https://arxiv.org/abs/1701.06538 (top-k gate, load-balancing loss)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import StateError
from ..core.host import DeltaHost, iter_hosts
from ..core.model import active, delta_names, set_active
from .errors import MergeError


class _Mixer(nn.Module):
    """Shared machinery: find the hosts, freeze the adapters, install and remove the hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        names = list(names)
        known = set(delta_names(model))
        missing = [n for n in names if n not in known]
        if len(names) < 2 or missing:
            raise StateError(
                f"mixing needs at least two attached adapters; unknown: {missing or 'none'}, "
                f"attached: {sorted(known)}"
            )
        hosts = [
            (p, h)
            for p, h in iter_hosts(model)
            if isinstance(h, DeltaHost) and all(n in h.deltas for n in names)
        ]
        if not hosts:
            raise MergeError(
                f"no module holds all of {names}; attach the adapters to the same modules"
            )
        odd = [p for p, h in hosts if h.kind != "linear"]
        if odd:
            raise MergeError(
                f"mixing works on Linear hosts; {odd[0]!r} is a {hosts[0][1].kind} host: exclude "
                "it from the adapters"
            )
        self.names = names
        self.paths = [p for p, _ in hosts]
        self._model = (model,)  # a tuple: the model's parameters are not this module's
        self._hosts = [h for _, h in hosts]
        self.layers = nn.ModuleDict({_key(p): self.make_layer(h) for p, h in hosts})
        self._handles: list[Any] = []
        self._previous: list[str] | None = None
        self._grad_flags: dict[int, bool] = {}

    def make_layer(self, host: DeltaHost) -> nn.Module:
        raise NotImplementedError

    def mix(
        self, layer: nn.Module, x: torch.Tensor, h: torch.Tensor, outs: list[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def install(self) -> "_Mixer":
        """Start mixing: the named adapters leave the plain active set and feed the mixing
        layers."""
        if self._handles:
            return self
        model = self._model[0]
        if any(h.merged for h in self._hosts):
            raise StateError("cannot mix merged adapters; call dt.unmerge(model) first")
        self._previous = active(model)
        set_active(model, [n for n in self._previous if n not in self.names])
        for host in self._hosts:
            for n in self.names:
                for p in host.deltas[n].parameters():
                    self._grad_flags.setdefault(id(p), p.requires_grad)
                    p.requires_grad_(False)
        for path, host in zip(self.paths, self._hosts):
            self._handles.append(host.register_forward_hook(self._hook(self.layers[_key(path)])))
        return self

    def _hook(self, layer: nn.Module):
        def hook(host: DeltaHost, args: tuple, h: torch.Tensor) -> torch.Tensor:
            if host.disabled:
                return h
            x = args[0]
            outs = [host.deltas[n](x, h, host) for n in self.names]
            return self.mix(layer, x, h, outs).to(h.dtype)
        return hook

    def remove(self) -> None:
        """Stop mixing; the previous active set and the adapters' trainability come back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for host in self._hosts:
            for n in self.names:
                for p in host.deltas[n].parameters():
                    p.requires_grad_(self._grad_flags.get(id(p), p.requires_grad))
        if self._previous is not None:
            set_active(self._model[0], self._previous)
            self._previous = None

    def __enter__(self) -> "_Mixer":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def save(self, path: str | os.PathLike) -> None:
        from ..io.files import save_tensors

        save_tensors(
            path,
            self.state_dict(),
            metadata={"names": ",".join(self.names), "kind": type(self).__name__},
        )

    def load(self, path: str | os.PathLike) -> None:
        from ..io.files import load_tensors

        self.load_state_dict(load_tensors(path))


def _key(path: str) -> str:
    return path.replace(".", "__")


class FusionLayer(nn.Module):
    """Attention over the adapters' outputs: softmax_k(Q(h)·K(o_k) / T) weights V(o_k).

    Q starts at zero (uniform attention) and V at the identity, so an untrained fusion outputs the
    mean of the adapters' outputs."""

    def __init__(self, dim: int, key_dim: int, temperature: float) -> None:
        super().__init__()
        self.query = nn.Linear(dim, key_dim)
        self.key = nn.Linear(dim, key_dim)
        self.value = nn.Linear(dim, dim)
        self.temperature = temperature
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.key.weight, std=dim ** -0.5)
        nn.init.zeros_(self.key.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(dim))
            self.value.bias.zero_()
        self.last_attention: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        o = torch.stack(outs, dim=-2).to(self.query.weight.dtype)  # (..., K, d)
        q = self.query(h.to(o.dtype)).unsqueeze(-2)  # (..., 1, kd)
        scores = (q * self.key(o)).sum(-1) / self.temperature  # (..., K)
        att = scores.softmax(dim=-1)
        self.last_attention = att.detach()
        return (att.unsqueeze(-1) * self.value(o)).sum(dim=-2)


class AdapterFusion(_Mixer):
    """AdapterFusion over adapters ``names`` (train ``fusion.parameters()``; the adapters stay
    frozen)."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        key_dim: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.key_dim, self.temperature = key_dim, temperature
        super().__init__(model, names)

    def make_layer(self, host: DeltaHost) -> nn.Module:
        d = host.out_features
        return FusionLayer(d, self.key_dim or min(d, 64), self.temperature).to(host.weight.device)

    def mix(self, layer, x, h, outs):
        return layer(h, outs)

    def attention(self) -> dict[str, torch.Tensor]:
        """Last forward's attention weights per host, averaged over tokens: ``{path: (K,)}``."""
        return {p: self.layers[_key(p)].last_attention.reshape(-1, len(self.names)).mean(0)
                for p in self.paths if self.layers[_key(p)].last_attention is not None}


class RouterLayer(nn.Module):
    """Top-k gate over the adapters from the layer input: h + Σ_{k∈top} g_k·(o_k − h)."""

    def __init__(self, in_dim: int, n: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, n, bias=False)
        nn.init.normal_(self.gate.weight, std=in_dim ** -0.5)
        self.top_k = top_k
        self.last_gates: torch.Tensor | None = None
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        logits = self.gate(x.to(self.gate.weight.dtype))  # (..., K)
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(dim=-1))
        self.last_gates = gates.detach()
        # Switch-style balance: K · Σ_k (share of tokens whose top choice is k) · (mean probability
        # of k)
        k = logits.shape[-1]
        probs = logits.softmax(dim=-1).reshape(-1, k)
        share = F.one_hot(idx[..., 0].reshape(-1), k).float().mean(0)
        self.aux = k * (share * probs.mean(0)).sum()
        contrib = torch.stack([o - h for o in outs], dim=-2).to(gates.dtype)  # (..., K, d)
        return h + (gates.unsqueeze(-1) * contrib).sum(dim=-2)


class LoRAMixture(_Mixer):
    """A mixture of adapters with a trainable top-k router per host (adapters frozen)."""

    def __init__(self, model: nn.Module, names: Sequence[str], *, top_k: int = 1) -> None:
        if not 1 <= top_k <= len(names):
            raise MergeError(
                f"top_k must be between 1 and the number of adapters ({len(names)}), got {top_k}"
            )
        self.top_k = top_k
        super().__init__(model, names)

    def make_layer(self, host: DeltaHost) -> nn.Module:
        return RouterLayer(host.in_features, len(self.names), self.top_k).to(host.weight.device)

    def mix(self, layer, x, h, outs):
        return layer(x, h, outs)

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the last forward, averaged over hosts (add a small multiple to the
        loss)."""
        parts = [layer.aux for layer in self.layers.values() if layer.aux is not None]
        if not parts:
            raise StateError(
                "run a forward pass with the mixture installed before asking for its loss"
            )
        return torch.stack(parts).mean()

    def usage(self) -> dict[str, torch.Tensor]:
        """Last forward's mean gate per adapter, per host: ``{path: (K,)}``."""
        return {p: self.layers[_key(p)].last_gates.reshape(-1, len(self.names)).mean(0)
                for p in self.paths if self.layers[_key(p)].last_gates is not None}
