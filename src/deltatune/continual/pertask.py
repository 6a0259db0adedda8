"""Per-task deltas: one LoRA per task, merged after each task (task arithmetic) or kept orthogonal
(O-LoRA)."""

from __future__ import annotations

import torch

from ..core.host import iter_hosts
from ..core.model import attach, detach, set_active
from .base import KeepRows, Strategy, _Penalty, head_rows
from .streams import ContinualError


class _PerTask(Strategy):
    def validate(self, spec) -> None:
        from ..methods.lora import LoRA

        if not isinstance(spec, LoRA):
            raise ContinualError(
                f"strategy {self.name!r} keeps one LoRA per task; use --method lora"
            )

    def setup(self, model, spec, head, collate) -> None:
        self.validate(spec)
        self.model, self.spec, self.head, self.collate = model, spec, head, collate
        model.requires_grad_(False)
        self._unfreeze_head()
        self.names: list[str] = []

    def before_task(self, t, task) -> None:
        name = f"task{t}"
        attach(self.model, self.spec, name)
        self.names.append(name)
        # attach freezes every non-delta parameter; the shared head keeps training
        self._unfreeze_head()


class Merge(_PerTask):
    name = "merge"

    def before_task(self, t, task) -> None:
        if "merged" in self._attached():
            detach(self.model, "merged")
        super().before_task(t, task)
        set_active(self.model, [self.names[-1]])

    def _attached(self) -> set[str]:
        return {n for _, h in iter_hosts(self.model) for n in h.delta_names()}

    def after_task(self, t, task) -> None:
        """The merged delta: one LoRA holding exactly the average of the task deltas' weight changes
        (rank n·r, capped at each layer's own rank, where the average is still exact; conv LoRA
        too)."""
        super().after_task(t, task)
        import dataclasses

        from ..core.host import DeltaHost

        n, spec = len(self.names), self.spec
        hosts = [
            (p, h)
            for p, h in iter_hosts(self.model)
            if isinstance(h, DeltaHost) and self.names[-1] in h.delta_names()
        ]
        ranks = {p: min(n * spec.rank_for(p), h.max_rank or n * spec.rank_for(p)) for p, h in hosts}
        attach(
            self.model,
            dataclasses.replace(spec, r=max(ranks.values()), rank_pattern=ranks),
            "merged",
        )
        self._unfreeze_head()
        with torch.no_grad():
            for _, host in iter_hosts(self.model):
                if "merged" not in host.delta_names() or not isinstance(host, DeltaHost):
                    continue
                parts = [host.part(name) for name in self.names]
                average = sum(p.delta_weight(host)["weight"].double() for p in parts) / n
                host.part("merged").set_weight_change(average)
                for p in parts:
                    p.requires_grad_(False)
                host.part("merged").requires_grad_(False)
        set_active(self.model, ["merged"])


class OLoRA(_PerTask):
    """A new LoRA per task, the earlier ones frozen, orthogonality penalty on the LoRA A's. The head
    rows of the classes earlier tasks taught are frozen too (restored after every step): O-LoRA's
    language model keeps its output layer fixed, and a shared head trained on every task carried
    the last task's class prior (O-LoRA equalled sequential on tweet-domains to the last digit)."""

    name = "olora"
    mask_old_classes = True

    @classmethod
    def options(cls):
        return {"lam": 0.5}

    def before_task(self, t, task) -> None:
        for name in self.names:  # earlier LoRAs stay active and frozen
            for _, host in iter_hosts(self.model):
                if name in host.delta_names():
                    host.part(name).requires_grad_(False)
        super().before_task(t, task)
        set_active(self.model, list(self.names))

    def orthogonality(self, model=None, batch=None, outputs=None) -> torch.Tensor | None:
        """λ · Σ_hosts Σ_old ‖A_old A_newᵀ‖₁ (O-LoRA's subspace penalty); None on the first task."""
        if len(self.names) < 2:
            return None
        new = self.names[-1]
        total = 0.0
        for _, host in iter_hosts(self.model):
            if new not in host.delta_names():
                continue
            a_new = host.part(new).lora_A.flatten(1)
            for old in self.names[:-1]:
                total = total + (host.part(old).lora_A.flatten(1) @ a_new.t()).abs().sum()
        return self.lam * total

    def callbacks(self, t, task):
        keep = [KeepRows(head_rows(self.model, self.head), self.seen)] if self.seen else []
        return [_Penalty(self.orthogonality), *keep]
