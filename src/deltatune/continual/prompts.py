"""Prompt pools on a frozen transformer: L2P, DualPrompt, CODA-Prompt.

Each sample gets its own soft prompt, composed from a pool by matching a *query* — the frozen
model's own features of the sample (the input of its head, without any prompt) — against learned
keys. The prompts enter the model through deltatune's virtual-token host (the engine of prompt
tuning, ``--method prompt``): the strategy attaches one parameter-free *slot* delta per batch
position whose values are that sample's prompt, and routes sample i to slot i, so one forward
serves a batch of different prompts. The pool's tensors live in one more delta (``pool``), so the
trainer sees them as the model's trainable parameters. The backbone stays frozen; the head and the
pool train; on a class-incremental stream the loss covers the current task's classes only (the
papers' training protocol).

- ``l2p`` — a pool of ``pool_size`` prompts with keys; each sample takes the ``top_k`` keys most
  cosine-similar to its query, prompts concatenated; a surrogate loss pulls the chosen keys to the
  queries (Wang et al., https://arxiv.org/abs/2112.08654);
- ``dualprompt`` — a shared G-prompt plus one E-prompt per task with a task key: training uses
  the task's own E-prompt, inference the one whose key best matches the query (Wang et al.,
  https://arxiv.org/abs/2204.04799);
- ``coda-prompt`` — each sample's prompt is a weighted sum of prompt components, weights
  cos(q ⊙ Aₘ, Kₘ) from attention vectors and keys; each task adds ``components_per_task``
  components, the earlier ones frozen (Smith et al., https://arxiv.org/abs/2211.13218).

Where the papers prefix every attention layer (DualPrompt, CODA), these prompts are prepended to
the input embeddings; the prompt length is the ``--method prompt`` spec's ``num_virtual_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DeltaError
from ..core.model import route
from ..core.virtual import VirtualTokenHost, VirtualTokens, add_virtual_tokens
from .base import Strategy, _Penalty, mask_logits
from .features import FeatureReader, evaluating
from .streams import ContinualError


class _PoolTensors(VirtualTokens):
    """Holds a prompt pool's trainable tensors inside the model (never active itself)."""

    kind = "prompt"

    def __init__(self, spec, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(spec)
        self.num_tokens = spec.num_virtual_tokens
        for k, v in tensors.items():
            self.register_parameter(k, nn.Parameter(v))
        self.current: torch.Tensor | None = None  # (B, n, hidden): this batch's prompts

    def values(self) -> torch.Tensor:
        raise ContinualError("the prompt pool's tensors are not a prompt; route to its slots")


class _Slot(VirtualTokens):
    """Batch position ``index``: its values are that sample's prompt of the current batch."""

    kind = "prompt"

    def __init__(self, spec, pool: _PoolTensors, index: int, n: int) -> None:
        super().__init__(spec)
        self._pool = [pool]  # a list: the pool is registered once, under its own name
        self.index, self.num_tokens = index, n

    def values(self) -> torch.Tensor:
        return self._pool[0].current[self.index]


class _Prompted(nn.Module):
    """The model with each sample's pool prompt: used for training and as the predictor."""

    def __init__(self, strategy: "_PromptPool", classes: list[int] | None) -> None:
        super().__init__()
        self.s = strategy
        self.model = strategy.model
        self.classes = classes

    def forward(self, **batch):
        s = self.s
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        q = s.query(inputs)
        prompts, s.aux = s.compose(q, self.training)  # (B, n, hidden), surrogate loss
        s.pool.current = prompts
        with route(self.model, s.slots(q.shape[0])):
            logits = self.model(**inputs)
        s.pool.current = None
        if self.training and self.classes is not None:
            return mask_logits(logits, self.classes)
        return logits


class _PromptPool(Strategy):
    mask_old_classes = True

    def validate(self, spec) -> None:
        from ..methods.prompt import PromptTuning

        if not isinstance(spec, PromptTuning):
            raise ContinualError(
                f"strategy {self.name!r} trains a prompt pool on a frozen transformer; use "
                "--method prompt (its num_virtual_tokens is the prompt length)"
            )

    def setup(self, model, spec, head, collate) -> None:
        self.validate(spec)
        self.model, self.spec, self.head, self.collate = model, spec, head, collate
        self.reader = FeatureReader(model, head, self.name)
        model.requires_grad_(False)
        self.length = spec.num_virtual_tokens
        holder: dict[str, Any] = {}

        def build(host: VirtualTokenHost) -> _PoolTensors:
            hidden = host.base.weight.shape[1]
            scale = host.base.weight.float().std().item()
            holder["hidden"] = hidden
            return _PoolTensors(spec, self.init_tensors(hidden, scale))

        try:
            add_virtual_tokens(spec, model, "pool", build)
        except DeltaError as exc:
            raise ContinualError(
                f"strategy {self.name!r} prepends prompts to a transformer's input embeddings and "
                f"this model has none to prompt ({str(exc).splitlines()[0]}); use simplecil, "
                "ranpac or a delta strategy for it"
            ) from None
        self.hidden = holder["hidden"]
        self.pool = next(h for _, h in _hosts(model)).part("pool")
        self._slots: list[str] = []
        self.aux: torch.Tensor | None = None
        self.task = 0
        self._unfreeze_head()

    def init_tensors(self, hidden: int, scale: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def slots(self, batch: int) -> list[str]:
        while len(self._slots) < batch:
            i = len(self._slots)
            add_virtual_tokens(self.spec, self.model, f"slot{i}",
                               lambda host, i=i: _Slot(self.spec, self.pool, i, self.width))
            self._slots.append(f"slot{i}")
        return self._slots[:batch]

    def query(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The frozen model's features of the samples (no prompt), cached per example."""

        def compute() -> torch.Tensor:
            with evaluating(self.model):
                return self.reader(inputs)

        return self.reader.cached("query", inputs, compute)

    def compose(self, q: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def before_task(self, t, task) -> None:
        self.task = t

    def trainee(self, t, task) -> nn.Module:
        masked = self.mask_old_classes and self.scenario == "class"
        return _Prompted(self, task.classes if masked else None)

    def predictor(self) -> nn.Module:
        return _Prompted(self, None)

    def surrogate(self, model=None, batch=None, outputs=None) -> torch.Tensor | None:
        return None if self.aux is None else self.key_weight * self.aux

    def callbacks(self, t, task):
        return [_Penalty(self.surrogate)]


def _hosts(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VirtualTokenHost)]


class L2P(_PromptPool):
    name = "l2p"

    @classmethod
    def options(cls):
        return {"pool_size": 10, "top_k": 3, "key_weight": 0.1}

    @property
    def width(self) -> int:
        return self.top_k * self.length

    def init_tensors(self, hidden, scale):
        if not 1 <= self.top_k <= self.pool_size:
            raise ContinualError(f"l2p top_k must be in 1..pool_size ({self.pool_size}), "
                                 f"got {self.top_k}")
        d = self.reader.module.in_features
        return {"prompts": torch.randn(self.pool_size, self.length, hidden) * scale,
                "keys": torch.rand(self.pool_size, d) * 2 - 1}

    def compose(self, q, training):
        sim = F.normalize(q, dim=-1) @ F.normalize(self.pool.keys, dim=-1).t()  # (B, M)
        top = sim.detach().topk(self.top_k, dim=-1).indices  # (B, k)
        prompts = self.pool.prompts[top].flatten(1, 2)  # (B, k·L, hidden)
        return prompts, (1 - sim.gather(1, top)).mean()


class DualPrompt(_PromptPool):
    name = "dualprompt"

    @classmethod
    def options(cls):
        return {"g_length": 2, "key_weight": 0.1}

    @property
    def width(self) -> int:
        return self.g_length + self.length

    def init_tensors(self, hidden, scale):
        d, T = self.reader.module.in_features, self.num_tasks
        return {"g": torch.randn(self.g_length, hidden) * scale,
                "e": torch.randn(T, self.length, hidden) * scale,
                "keys": torch.rand(T, d) * 2 - 1}

    def compose(self, q, training):
        sim = F.normalize(q, dim=-1) @ F.normalize(self.pool.keys, dim=-1).t()  # (B, T)
        B = q.shape[0]
        if training:
            pick = torch.full((B,), self.task, dtype=torch.long)
            aux = (1 - sim[:, self.task]).mean()
        else:  # the best-matching key among the tasks seen so far
            pick = sim[:, : self.task + 1].argmax(-1)
            aux = None
        g = self.pool.g.unsqueeze(0).expand(B, -1, -1)
        return torch.cat([g, self.pool.e[pick]], 1), aux


class CODAPrompt(_PromptPool):
    name = "coda-prompt"

    @classmethod
    def options(cls):
        return {"components_per_task": 4, "key_weight": 0.0}

    @property
    def width(self) -> int:
        return self.length

    def init_tensors(self, hidden, scale):
        d, M = self.reader.module.in_features, self.components_per_task * self.num_tasks
        # orthogonal initial keys/attention (the paper's Gram-Schmidt), prompts at embedding scale
        keys = torch.linalg.qr(torch.randn(d, max(M, 1)))[0].t()[:M] if M <= d else \
            torch.randn(M, d)
        att = torch.linalg.qr(torch.randn(d, max(M, 1)))[0].t()[:M] if M <= d else \
            torch.randn(M, d)
        return {"prompts": torch.randn(M, self.length, hidden) * scale, "keys": keys.clone(),
                "attention": att.clone()}

    def compose(self, q, training):
        c = self.components_per_task
        upto = (self.task + 1) * c
        P, K, A = self.pool.prompts[:upto], self.pool.keys[:upto], self.pool.attention[:upto]
        if self.task > 0:  # earlier tasks' components stay as they were
            old = self.task * c
            P = torch.cat([P[:old].detach(), P[old:]])
            K = torch.cat([K[:old].detach(), K[old:]])
            A = torch.cat([A[:old].detach(), A[old:]])
        # α_bm = cos(q_b ⊙ A_m, K_m)
        alpha = F.cosine_similarity(q.unsqueeze(1) * A.unsqueeze(0), K.unsqueeze(0), dim=-1)
        return torch.einsum("bm,mlh->blh", alpha, P), None
