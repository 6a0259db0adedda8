"""Class-incremental learning on a frozen pretrained model's features (the LAMDA-PILOT family).

- ``simplecil`` — no training: each class is the mean of its examples' features (the input of the
  classifier head), and a sample goes to the class of highest cosine similarity (Zhou et al.,
  https://arxiv.org/abs/2303.07338, "SimpleCIL");
- ``aper`` — adapt the model with any deltatune delta on the first task only, then prototypes on
  the concatenated frozen and adapted features (same paper, "APER");
- ``ranpac`` — features through a fixed random projection and a ReLU, and a ridge classifier
  solved from the accumulated Gram matrix, ridge λ chosen on a held-out fifth of each task's
  training data (McDonnell et al., https://arxiv.org/abs/2307.02251);
- ``ease`` — one light delta per task trained on that task's classes; features are the
  concatenation over every task's delta, and the prototypes an old class never had in a newer
  delta's subspace are synthesised from the new classes' by their similarity in the old subspaces
  (Zhou et al., https://arxiv.org/abs/2403.12030).

None of them replays data: what they keep is class means (and RanPAC's Gram matrix). On a domain
stream the class means simply accumulate over the domains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import attach, disabled, set_active
from .base import Strategy
from .features import FeatureReader, batches, evaluating
from .streams import ContinualError

_UNSEEN = -1e4  # the score of a class no task has shown yet


class _Scores(nn.Module):
    """The predictor of a prototype strategy: ``strategy.scores(batch)`` as logits."""

    def __init__(self, strategy: "_FeatureStrategy") -> None:
        super().__init__()
        self.strategy = strategy

    def forward(self, **batch):
        return self.strategy.scores(batch)


class _FeatureStrategy(Strategy):
    """Keeps per-class feature sums for one or more feature *views* and scores by cosine
    similarity to the class means; subclasses choose the views and what trains."""

    needs_delta = False

    def validate(self, spec) -> None:
        if self.needs_delta and spec is None:
            raise ContinualError(
                f"strategy {self.name!r} adapts a delta; give a delta method (--method lora, "
                "bottleneck, ...), not full fine-tuning"
            )

    def setup(self, model, spec, head, collate) -> None:
        self.validate(spec)
        self.model, self.spec, self.head, self.collate = model, spec, head, collate
        self.reader = FeatureReader(model, head, self.name)
        model.requires_grad_(False)
        self.sums: dict[str, torch.Tensor] = {}  # view → (C, D)
        self.counts: dict[str, torch.Tensor] = {}  # view → (C,)
        self.classes: int | None = None

    def trains(self, t: int) -> bool:
        return False

    # -- features of a view ---------------------------------------------------------------------
    def views(self) -> list[str]:
        return ["base"]

    def view_features(self, view: str, batch: dict[str, Any]) -> torch.Tensor:
        def compute() -> torch.Tensor:
            with evaluating(self.model):
                if view == "base" and self.spec is not None:
                    with disabled(self.model):
                        return self.reader(batch)
                if view != "base":
                    set_active(self.model, [view])
                return self.reader(batch)

        return self.reader.cached(view, batch, compute)

    def accumulate(self, view: str, examples: list) -> None:
        for batch in batches(examples, self.collate):
            f = self.view_features(view, batch)
            y = batch["labels"]
            if view not in self.sums:
                c = self._num_classes(batch)
                self.sums[view] = torch.zeros(c, f.shape[1], dtype=torch.float64)
                self.counts[view] = torch.zeros(c, dtype=torch.float64)
            self.sums[view].index_add_(0, y, f.double())
            self.counts[view].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def _num_classes(self, batch) -> int:
        if self.classes is None:
            with torch.no_grad(), evaluating(self.model):
                self.classes = int(self.model(**{k: v for k, v in batch.items()
                                                  if k != "labels"}).shape[-1])
        return self.classes

    def prototypes(self, view: str) -> torch.Tensor:
        return (self.sums[view] / self.counts[view].clamp(min=1).unsqueeze(1)).float()

    def seen_mask(self) -> torch.Tensor:
        view = next(iter(self.counts))
        return self.counts[view] > 0

    def after_task(self, t, task) -> None:
        super().after_task(t, task)
        for view in self.views():
            self.accumulate(view, task.train.examples)

    def scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cosine similarity to each class prototype, summed over the views (unseen classes
        never win)."""
        total = None
        for view in self.views():
            f = F.normalize(self.view_features(view, batch), dim=-1)
            s = f @ F.normalize(self.prototypes(view), dim=-1).t()
            total = s if total is None else total + s
        return total.masked_fill(~self.seen_mask(), _UNSEEN)

    def predictor(self) -> nn.Module:
        if not self.sums:  # before the first task: the model as it is
            return self.model
        return _Scores(self)


class SimpleCIL(_FeatureStrategy):
    name = "simplecil"


class APER(_FeatureStrategy):
    """Adapt on the first task (the trainer fits the delta and the head), then prototypes on the
    frozen and the adapted features side by side."""

    name = "aper"
    needs_delta = True

    def setup(self, model, spec, head, collate) -> None:
        super().setup(model, spec, head, collate)
        attach(model, spec, "adapted")
        self._unfreeze_head()

    def trains(self, t: int) -> bool:
        return t == 0

    def views(self) -> list[str]:
        return ["base", "adapted"]

    def after_task(self, t, task) -> None:
        if t == 0:
            self.model.requires_grad_(False)
        super().after_task(t, task)


class RanPAC(_FeatureStrategy):
    """Random projection (``dim`` outputs, ReLU) of the features and a ridge classifier from the
    accumulated Gram matrix G = Σ hhᵀ and class sums Q = Σ h yᵀ: W = (G + λI)⁻¹Q. ``ridge``: λ, or
    None to pick it from 10⁻⁸ … 10¹³ by accuracy on a held-out fifth of each task's training data
    (as the paper does). ``adapt``: first fit a delta on the first task, as APER."""

    name = "ranpac"

    @classmethod
    def options(cls):
        return {"dim": 2000, "ridge": None, "adapt": False, "seed": 0}

    def validate(self, spec) -> None:
        if self.adapt and spec is None:
            raise ContinualError("ranpac adapt=True fits a delta on the first task; give a delta "
                                 "method (--method lora, ...), or adapt=False")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ContinualError(f"ranpac dim must be a positive integer, got {self.dim!r}")
        if self.ridge is not None and not float(self.ridge) > 0:
            raise ContinualError(f"ranpac ridge must be positive, got {self.ridge!r}")

    def setup(self, model, spec, head, collate) -> None:
        super().setup(model, spec, head, collate)
        self.view = "base"
        if self.adapt:
            attach(model, spec, "adapted")
            self._unfreeze_head()
            self.view = "adapted"
        self.W: torch.Tensor | None = None  # (D, dim) projection
        self.G = self.Q = self.out = None
        self.lam = None if self.ridge is None else float(self.ridge)

    def trains(self, t: int) -> bool:
        return self.adapt and t == 0

    def views(self) -> list[str]:
        return [self.view]

    def _project(self, f: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.W = torch.randn(f.shape[1], self.dim, generator=gen, dtype=torch.float64)
        return torch.relu(f.double() @ self.W)

    def after_task(self, t, task) -> None:
        if t == 0:
            self.model.requires_grad_(False)
        Strategy.after_task(self, t, task)
        self.accumulate(self.view, task.train.examples)  # class counts: which classes are seen
        H, Y = [], []
        for batch in batches(task.train.examples, self.collate):
            H.append(self._project(self.view_features(self.view, batch)))
            Y.append(batch["labels"])
        h, y = torch.cat(H), torch.cat(Y)
        onehot = F.one_hot(y, self.classes).double()
        if self.G is None:
            self.G = torch.zeros(self.dim, self.dim, dtype=torch.float64)
            self.Q = torch.zeros(self.dim, self.classes, dtype=torch.float64)
        if self.ridge is None:
            self.lam = self._choose_ridge(h, y, onehot)
        self.G += h.t() @ h
        self.Q += h.t() @ onehot
        eye = torch.eye(self.dim, dtype=torch.float64)
        self.out = torch.linalg.solve(self.G + self.lam * eye, self.Q).float()

    def _choose_ridge(self, h, y, onehot) -> float:
        """λ of best accuracy on a seeded fifth of this task's examples, G and Q holding the
        earlier tasks and the other four fifths."""
        n = h.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + n))
        cut = max(1, n // 5)
        held, fit = perm[:cut], perm[cut:]
        G = self.G + h[fit].t() @ h[fit]
        Q = self.Q + h[fit].t() @ onehot[fit]
        evals, vecs = torch.linalg.eigh(G)  # (G + λI)⁻¹ = V diag(1/(e+λ)) Vᵀ for every λ at once
        VtQ = vecs.t() @ Q
        hv = h[held] @ vecs
        best, best_acc = 1.0, -1.0
        for lam in (10.0 ** k for k in range(-8, 14)):
            pred = (hv / (evals + lam)) @ VtQ
            acc = float((pred.argmax(1) == y[held]).double().mean())
            if acc > best_acc:
                best, best_acc = lam, acc
        return best

    def scores(self, batch):
        h = self._project(self.view_features(self.view, batch)).float()
        return (h @ self.out).masked_fill(~self.seen_mask(), _UNSEEN)


class EASE(_FeatureStrategy):
    """One delta per task (``task0``, ``task1``, ...), trained with a freshly initialised head on
    that task's classes, then frozen. Class prototypes are kept per delta; an old class has no data
    in a newer delta's subspace, so its prototype there is the similarity-weighted mean of the new
    classes' prototypes, the weights a softmax (``temperature``) of cosine similarities in the
    older subspaces. Scores: the mean over subspaces of the cosine similarity."""

    name = "ease"
    needs_delta = True
    mask_old_classes = True

    @classmethod
    def options(cls):
        return {"temperature": 0.1}

    def setup(self, model, spec, head, collate) -> None:
        super().setup(model, spec, head, collate)
        self.names: list[str] = []
        self.synth: dict[str, torch.Tensor] = {}  # view → (C, D) synthesised prototypes
        self._head_init = {k: v.clone() for k, v in self._head_state().items()}

    def _head_state(self) -> dict[str, torch.Tensor]:
        from ..core.host import get_module

        return {f"{h}.{k}": v for h in self.head
                for k, v in get_module(self.model, h).state_dict().items()}

    def trains(self, t: int) -> bool:
        return True

    def views(self) -> list[str]:
        return list(self.names)

    def before_task(self, t, task) -> None:
        from ..core.host import get_module

        name = f"task{t}"
        attach(self.model, self.spec, name)
        self.names.append(name)
        set_active(self.model, [name])
        with torch.no_grad():  # a fresh head for each task: the adapter learns this task only
            for h in self.head:
                module = get_module(self.model, h)
                state = {k[len(h) + 1:]: v for k, v in self._head_init.items()
                         if k.startswith(h + ".")}
                module.load_state_dict(state)
        self._unfreeze_head()

    def after_task(self, t, task) -> None:
        self.model.requires_grad_(False)
        Strategy.after_task(self, t, task)
        for view in self.names:
            self.accumulate(view, task.train.examples)
        new = self.names[-1]
        old = self.names[:-1]
        have = self.counts[new] > 0
        missing = (self.counts[self.names[0]] > 0) & ~have
        if old and bool(missing.any()):
            # similarity of every class to the new ones, in the older subspaces
            sim = sum(F.normalize(self.prototypes(v), dim=-1)
                      @ F.normalize(self.prototypes(v), dim=-1).t() for v in old) / len(old)
            w = torch.softmax(sim[missing][:, have] / self.temperature, dim=-1)
            synth = torch.zeros_like(self.sums[new]).float()
            synth[missing] = w @ self.prototypes(new)[have]
            self.synth[new] = synth

    def prototypes(self, view: str) -> torch.Tensor:
        p = super().prototypes(view)
        if view in self.synth:
            fill = self.counts[view] == 0
            p = torch.where(fill.unsqueeze(1), self.synth[view], p)
        return p

    def scores(self, batch):
        return super().scores(batch) / max(1, len(self.names))

    def predictor(self) -> nn.Module:
        if not self.sums:
            return self.model
        return _Scores(self)
