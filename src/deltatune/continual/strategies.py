"""Continual-learning strategies, each a small object that plugs into the trainer through callbacks.

Every strategy trains a parameter-efficient delta (any deltatune spec; ``None`` = full fine-tuning)
plus the model's classification head, task after task:

- ``sequential`` — fine-tune the same delta on each task (the lower bound);
- ``joint`` — one run on all tasks' data (the upper bound; see
  :func:`~deltatune.continual.run_stream`);
- ``replay`` — experience replay from a reservoir buffer (Chaudhry et al.,
  https://arxiv.org/abs/1902.10486);
- ``ewc`` — elastic weight consolidation, online Fisher (Kirkpatrick et al.,
  https://arxiv.org/abs/1612.00796);
- ``lwf`` — learning without forgetting: distil the previous model's outputs (Li & Hoiem,
  https://arxiv.org/abs/1606.09282);
- ``lae`` — online delta + offline EMA delta, ensembled at inference (Gao et al.,
  https://arxiv.org/abs/2303.10070);
- ``zscl`` — distil the previous model on a reference set (not the task's labelled data) and average
  the weights along each task's trajectory (ZSCL, Zheng et al., https://arxiv.org/abs/2303.06628);
- ``merge`` — one delta per task, merged (averaged task vectors) after each task (task arithmetic,
  Ilharco et al., https://arxiv.org/abs/2212.04089);
- ``olora`` — a new LoRA per task, kept orthogonal to the frozen earlier ones (O-LoRA, Wang et al.,
  https://arxiv.org/abs/2310.14152).
"""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.host import iter_hosts
from ..core.model import attach, set_active
from ..core.registry import Registry
from .base import Strategy, TaskMasked, _Penalty, _trainable, distillation_loss, head_rows
from .pertask import Merge, OLoRA
from .prompts import L2P, CODAPrompt, DualPrompt
from .prototypes import APER, EASE, RanPAC, SimpleCIL
from .streams import ContinualError
from .zscl import ZSCL


# -- replay ---------------------------------------------------------------------------------------
class Reservoir:
    """A fixed-size uniform sample of everything offered so far (reservoir sampling); ``balanced``
    keeps one reservoir per class with an equal share of the size (re-shared as classes arrive)."""

    def __init__(self, size: int, balanced: bool = False, seed: int = 0) -> None:
        if size < 1:
            raise ContinualError(f"replay buffer size must be positive, got {size}")
        self.size, self.balanced, self.offered = size, balanced, 0
        self.rng = random.Random(seed)
        self._pools: dict[Any, tuple[list, list[int]]] = {}  # key → (items, [offered])

    @property
    def items(self) -> list:
        return [ex for items, _ in self._pools.values() for ex in items]

    def add(self, examples) -> None:
        for ex in examples:
            self.offered += 1
            key = ex["label"] if self.balanced else None
            if key not in self._pools:
                self._pools[key] = ([], [0])
                cap = self.size // len(self._pools)
                for items, _ in self._pools.values():
                    del items[cap:]
            items, seen = self._pools[key]
            cap = self.size // len(self._pools)
            seen[0] += 1
            if len(items) < cap:
                items.append(ex)
            else:
                j = self.rng.randrange(seen[0])
                if j < cap:
                    items[j] = ex

    def sample(self, n: int) -> list:
        items = self.items
        return self.rng.sample(items, min(n, len(items)))


class _ReplayCallback:
    def __init__(self, buffer: Reservoir, collate: Callable, batch_size: int) -> None:
        self.buffer, self.collate, self.batch_size = buffer, collate, batch_size

    def extra_batch(self):
        return self.collate(self.buffer.sample(self.batch_size)) if self.buffer.items else None


class Replay(Strategy):
    name = "replay"

    @classmethod
    def options(cls):
        return {"buffer_size": 200, "balanced": True, "replay_batch": 16, "seed": 0}

    def setup(self, model, spec, head, collate) -> None:
        super().setup(model, spec, head, collate)
        self.buffer = Reservoir(self.buffer_size, self.balanced, self.seed)

    def callbacks(self, t, task):
        return [_ReplayCallback(self.buffer, self.collate, self.replay_batch)]

    def after_task(self, t, task) -> None:
        super().after_task(t, task)
        self.buffer.add(task.train.examples)


# -- EWC ------------------------------------------------------------------------------------------
class EWC(Strategy):
    """λ/2 · Σ F (θ − θ*)² with the raw per-example empirical Fisher F (online: each task's Fisher
    added to the decayed sum, Schwarz et al., https://arxiv.org/abs/1805.06370). Unnormalised, the
    penalty is the Laplace estimate of how much the earlier tasks' mean loss rises, so λ = 1 weighs
    it like the task loss whatever the model's size. (The Fisher used to be divided by its mean,
    which multiplied λ by 1/mean(F) ≈ 10⁴-10⁶ and froze the delta after the first task.)"""

    name = "ewc"

    @classmethod
    def options(cls):
        return {"lam": 10.0, "fisher_batches": 8, "decay": 1.0}

    fisher: dict[str, torch.Tensor] | None = None

    def penalty_value(self, model=None, batch=None, outputs=None) -> torch.Tensor | None:
        """λ/2 · Σ F (θ − θ*)² over the trainable parameters (zero at the anchor)."""
        if not self.fisher:
            return None
        params = _trainable(self.model)
        total = sum(
            ((params[n] - self.anchor[n]).square() * f).sum()
            for n, f in self.fisher.items()
            if n in params
        )
        return 0.5 * self.lam * total

    def callbacks(self, t, task):
        return [_Penalty(self.penalty_value)]

    def after_task(self, t, task) -> None:
        super().after_task(t, task)
        from ..algebra import diagonal_fisher

        ex = task.train.examples[: 16 * self.fisher_batches]
        batches = [self.collate(ex[i:i + 16]) for i in range(0, len(ex), 16)]
        names = list(_trainable(self.model))
        new = diagonal_fisher(self.model, batches, params=names, labels=lambda b: b["labels"])
        old = self.fisher or {}
        self.fisher = {n: self.decay * old.get(n, 0) + f for n, f in new.items()}
        self.anchor = {n: p.detach().clone() for n, p in _trainable(self.model).items()}


# -- LwF ------------------------------------------------------------------------------------------
class LwF(Strategy):
    """The new task's cross-entropy over its own classes (LwF's new-task head) plus λ·T²·KL to the
    previous model's outputs over the old classes.

    λ = 0.1 was chosen on the mnist-corruptions validation stream (issue 22: λ = 1, 0.3, 0.1 gave
    31.3%, 39.1%, 40.0% average accuracy, sequential 38.5%): at the paper's λ = 1 with T² = 4 the
    distillation outweighs the task loss and the model barely learns a new domain (24% on zoom
    blur right after training on it, sequential 92%)."""

    name = "lwf"
    mask_old_classes = True

    @classmethod
    def options(cls):
        return {"lam": 0.1, "temperature": 2.0}

    teacher: nn.Module | None = None

    def before_task(self, t, task) -> None:
        self.teacher = copy.deepcopy(self.model).eval() if t > 0 else None
        self.old = list(self.seen)

    def _kd(self, model, batch, outputs):
        if self.teacher is None:
            return None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            target = self.teacher(**inputs)
        student = model.sink.raw if isinstance(model, TaskMasked) else outputs
        return distillation_loss(student, target, self.old, self.temperature, self.lam)

    def callbacks(self, t, task):
        return [_Penalty(self._kd)]


# -- LAE ------------------------------------------------------------------------------------------
class _EMA:
    def __init__(self, strategy: "LAE") -> None:
        self.s = strategy

    def on_step_end(self, model, step) -> None:
        self.s.ema_update()


class _Ensemble(nn.Module):
    """LAE's inference: the online and offline models' class probabilities, element-wise max (the
    offline model: the offline delta with the offline copy of the head)."""

    def __init__(self, model: nn.Module, strategy: "LAE") -> None:
        super().__init__()
        self.model, self.s = model, strategy

    def forward(self, **batch):
        probs = []
        for name in ("online", "offline"):
            set_active(self.model, [name])
            with self.s.offline_head(name == "offline"):
                probs.append(F.softmax(self.model(**batch), -1))
        set_active(self.model, ["online"])
        return torch.log(torch.maximum(*probs).clamp(min=1e-12))


class LAE(Strategy):
    """Online delta and head trained; the offline delta *and head* are their EMA. (The head used to
    be shared and trained on each task, so on a domain stream with label shift both ensemble
    members carried the last task's class prior and LAE equalled sequential to the last digit.)"""

    name = "lae"
    mask_old_classes = True

    @classmethod
    def options(cls):
        # None: 1 − 1/(tasks_per_constant · steps per task), clipped to [0.9, 0.9999]: the offline
        # model's time constant is ``tasks_per_constant`` tasks whatever the run length (the
        # paper's 0.999 assumes ~1000 steps per task).
        return {"momentum": None, "tasks_per_constant": 2.0}

    def validate(self, spec) -> None:
        if spec is None:
            raise ContinualError(
                "LAE needs a parameter-efficient method (--method lora, ...), not full fine-tuning"
            )
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ContinualError(f"LAE momentum must be in [0, 1), got {self.momentum}")

    @property
    def ema_momentum(self) -> float:
        if self.momentum is not None:
            return float(self.momentum)
        steps = getattr(self, "steps_per_task", None) or 1000
        return min(max(1.0 - 1.0 / (steps * float(self.tasks_per_constant)), 0.9), 0.9999)

    def setup(self, model, spec, head, collate) -> None:
        self.validate(spec)
        self.model, self.spec, self.head, self.collate = model, spec, head, collate
        attach(model, spec, "online")
        attach(model, spec, "offline", activate=False)
        self._pairs = [(host.part("online"), host.part("offline")) for _, host in iter_hosts(model)
                       if "online" in host.delta_names()]
        with torch.no_grad():
            for on, off in self._pairs:
                off.load_state_dict(on.state_dict())
                off.requires_grad_(False)
        set_active(model, ["online"])
        self._unfreeze_head()
        self._heads = [(p, p.detach().clone()) for m in head_rows(model, head)
                       for p in m.parameters()]

    @contextlib.contextmanager
    def offline_head(self, use: bool):
        """The head's parameters hold the offline copy inside the block (evaluation only)."""
        if not use:
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in self._heads]
            for p, off in self._heads:
                p.copy_(off)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), keep in zip(self._heads, saved):
                    p.copy_(keep)

    @torch.no_grad()
    def ema_update(self) -> None:
        m = self.ema_momentum
        for on, off in self._pairs:
            for p_off, p_on in zip(off.parameters(), on.parameters()):
                p_off.mul_(m).add_(p_on, alpha=1 - m)
        for p_on, p_off in self._heads:
            p_off.mul_(m).add_(p_on, alpha=1 - m)

    def callbacks(self, t, task):
        return [_EMA(self)]

    def predictor(self) -> nn.Module:
        return _Ensemble(self.model, self)


__all__ = [
    "Strategy",
    "Reservoir",
    "Replay",
    "EWC",
    "LwF",
    "LAE",
    "ZSCL",
    "Merge",
    "OLoRA",
    "SimpleCIL",
    "APER",
    "RanPAC",
    "EASE",
    "L2P",
    "DualPrompt",
    "CODAPrompt",
    "STRATEGIES",
    "make_strategy",
]

#: every strategy class by name
STRATEGIES: Registry[type[Strategy]] = Registry("strategy", ContinualError, key=lambda s: s.name)
for _strategy in (Strategy, Replay, EWC, LwF, LAE, ZSCL, Merge, OLoRA, SimpleCIL, APER, RanPAC,
                  EASE, L2P, DualPrompt, CODAPrompt):
    STRATEGIES.register(_strategy)
STRATEGIES.register("joint", Strategy)  # trained once on all tasks by run_stream


def make_strategy(name: str, **options: Any) -> Strategy:
    strategy = STRATEGIES.get(name)(**options)
    strategy.joint = name == "joint"
    return strategy
