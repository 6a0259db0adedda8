"""Training objectives of causal LMs: ``sft`` (next-token cross-entropy on the labelled tokens)
and ``dpo`` (direct preference optimisation). Both go through the chunked loss of
:mod:`deltatune.lm.loss`, so the whole batch's logits are never built.

DPO's reference model is the network being trained with its trained adapter switched off
(:func:`deltatune.disabled`, under ``no_grad``): the frozen base is shared, never copied. When the
trained adapter started from another one (DPO after SFT), ``reference`` activates a frozen copy of
that starting adapter instead (:func:`active_only`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import Registry
from .loss import CHUNK_SIZE, Project, eval_sums, lm_loss, logits_of, sequence_logps


class ObjectiveError(ValueError):
    """A batch or option that an objective cannot use; the message names the fix."""


@dataclass
class StepLoss:
    """What an objective computed on one batch."""

    loss: torch.Tensor  # the scalar to minimise
    outputs: torch.Tensor  # the batch's last hidden states (or logits), for penalty callbacks
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars to record


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def states(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Project]:
    """The batch's last hidden states and the projection to logits; a model without a separate
    head (no ``project``) gives its logits and the identity (the whole-batch logits, as before)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inner = unwrap(model)
    if callable(getattr(inner, "project", None)):
        # through the (possibly DDP-wrapped) forward, so DDP sees the call
        return model(**inputs, return_hidden=True), inner.project
    return logits_of(model(**inputs)), _identity


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    if "labels" not in batch:
        raise ObjectiveError(
            f"the batch has no 'labels' (keys: {sorted(batch)}); make collate return them"
        )
    return batch["labels"]


def sft(model: nn.Module, batch: Mapping[str, Any], *, chunk_size: int = CHUNK_SIZE) -> StepLoss:
    """Mean cross-entropy of the labelled tokens (labels -100 ignored; position t predicts t+1)."""
    hidden, project = states(model, batch)
    return StepLoss(lm_loss(hidden, _labels(batch), project, chunk_size), hidden)


# -- DPO ---------------------------------------------------------------------------------------
#: per-pair losses of the policy's and reference's log-ratio scores, ``(chosen, rejected,
#: chosen_tokens, rejected_tokens, beta) -> (P,)``, named as trl's DPOConfig.loss_type
DPO_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("DPO loss", ObjectiveError)


@DPO_LOSSES.register("sigmoid")
def _sigmoid(chosen, rejected, n_chosen, n_rejected, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al., https://arxiv.org/abs/2305.18290): -log σ(β (r_w - r_l))."""
    return -F.logsigmoid(beta * (chosen - rejected))


@DPO_LOSSES.register("ipo")
def _ipo(chosen, rejected, n_chosen, n_rejected, beta: float) -> torch.Tensor:
    """IPO (Azar et al., https://arxiv.org/abs/2310.12036, eq. 17) on per-token mean log-ratios
    (the length normalisation trl uses): (h - 1 / (2β))²."""
    delta = chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


@DPO_LOSSES.register("hinge")
def _hinge(chosen, rejected, n_chosen, n_rejected, beta: float) -> torch.Tensor:
    """SLiC's hinge (Zhao et al., https://arxiv.org/abs/2305.10425): max(0, 1 - β (r_w - r_l))."""
    return torch.relu(1 - beta * (chosen - rejected))


def dpo_losses() -> list[str]:
    return list(DPO_LOSSES.names())


def check_rpo_alpha(rpo_alpha: Any) -> None:
    """Refuse an RPO weight that is not a finite number >= 0 (0: plain DPO)."""
    if (isinstance(rpo_alpha, bool) or not isinstance(rpo_alpha, (int, float))
            or not math.isfinite(rpo_alpha) or rpo_alpha < 0):
        raise ObjectiveError(
            f"rpo_alpha {rpo_alpha!r}: use a finite number >= 0 (0 = plain DPO, 1 = RPO's weight "
            "of the chosen answers' NLL)"
        )


@contextlib.contextmanager
def active_only(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block only the deltas ``names`` are active (e.g. the frozen starting adapter
    that is DPO's reference); the active set is restored afterwards."""
    from ..core import model as dt

    before = dt.active(model)
    dt.set_active(model, list(names))
    try:
        yield model
    finally:
        dt.set_active(model, before)


Reference = Callable[[nn.Module], ContextManager]


def frozen_reference(model: nn.Module, path: Any, name: str = "reference") -> Reference:
    """Load the adapter at ``path`` a second time as ``name``, frozen and inactive, and return the
    reference context that makes it the only active delta: DPO after SFT measures the policy
    against the SFT model it started from, as trl does with its ``ref`` adapter. Costs one more
    copy of the adapter's tensors, never of the base."""
    from ..core import model as dt
    from ..io.adapter import load_adapter, parts_of

    active = dt.active(model)
    load_adapter(model, path, name=name, activate=False)
    dt.set_active(model, active)
    deltas, copies = parts_of(model, name)
    for part in [*deltas.values(), *copies.values()]:
        for p in part.parameters():
            p.requires_grad_(False)
    return lambda m: active_only(m, [name])


def dpo(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reference: Reference | None = None,
    chunk_size: int = CHUNK_SIZE,
    rpo_alpha: float = 0.0,
) -> StepLoss:
    """The DPO loss of a preference batch: chosen rows ``[0, B)`` over rejected rows ``[B, 2B)``,
    labels -100 outside the answers. ``reference(model)`` is the context in which ``model``
    computes the reference policy (default :func:`deltatune.disabled`: the base model).

    ``rpo_alpha`` > 0 adds ``rpo_alpha`` times the chosen answers' negative log-likelihood (mean
    over their tokens): RPO (Pang et al., https://arxiv.org/abs/2404.19733), trl's
    ``loss_type=[..., "sft"]`` with ``loss_weights=[1, rpo_alpha]``. Why: the DPO loss only sees
    the margin, so it is as happy to lower both answers' likelihood as to raise the chosen one
    ("likelihood displacement", ``rewards_chosen`` < 0); with short answers that share their
    end-of-turn token, mass then leaves the right answer too. The NLL term holds chosen up.

    Metrics, as trl reports them: ``rewards_chosen``/``rewards_rejected`` (β times the log-ratio,
    batch means), ``reward_accuracy`` (chosen reward > rejected), ``reward_margin``, and
    ``nll_chosen`` (the chosen tokens' mean negative log-likelihood, the RPO term).
    """
    loss_fn = DPO_LOSSES.get(loss_type)
    check_rpo_alpha(rpo_alpha)
    labels = _labels(batch)
    if labels.shape[0] % 2:
        raise ObjectiveError(
            f"a preference batch stacks chosen over rejected rows; got {labels.shape[0]} rows "
            "(an odd number): use a preference collate (deltatune.lm.tokenize.preference_collate)"
        )
    hidden, project = states(model, batch)
    logps, counts = sequence_logps(hidden, labels, project, chunk_size)
    inner = unwrap(model)
    if reference is None:
        from ..core.model import disabled

        reference = disabled
    with torch.no_grad(), reference(inner):
        ref_hidden, ref_project = states(inner, batch)
        ref_logps, _ = sequence_logps(ref_hidden, labels, ref_project, chunk_size)
    ratios = logps - ref_logps  # (2B,) log π(y|x) - log π_ref(y|x)
    chosen, rejected = ratios.chunk(2)
    n_chosen, n_rejected = counts.to(ratios.dtype).chunk(2)
    loss = loss_fn(chosen, rejected, n_chosen, n_rejected, beta).mean()
    # RPO's term, as trl's "sft" loss type: the chosen rows' token-mean NLL over the whole batch
    nll = -logps.chunk(2)[0].sum() / n_chosen.sum().clamp(min=1)
    if rpo_alpha:
        loss = loss + rpo_alpha * nll
    r_chosen, r_rejected = beta * chosen.detach(), beta * rejected.detach()
    metrics = {
        "rewards_chosen": r_chosen.mean(),
        "rewards_rejected": r_rejected.mean(),
        "reward_accuracy": (r_chosen > r_rejected).float().mean(),
        "reward_margin": (r_chosen - r_rejected).mean(),
        "nll_chosen": nll.detach(),
    }
    return StepLoss(loss, hidden, metrics)


# -- the objectives as the trainer uses them: a step, evaluation sums and their metrics -----------
@dataclass(frozen=True)
class Objective:
    """One training objective: ``step(model, batch) -> StepLoss``; ``sums(model, batch)`` float64
    sums that add up over batches and processes; ``metrics(sums)`` the evaluation's numbers."""

    name: str
    step: Callable[[nn.Module, Mapping[str, Any]], StepLoss]
    sums: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
    metrics: Callable[[torch.Tensor], dict[str, float]]


def _sft_sums(model: nn.Module, batch: Mapping[str, Any], chunk_size: int) -> torch.Tensor:
    """float64 [loss sum, correct (argmax = label), tokens]."""
    hidden, project = states(model, batch)
    return eval_sums(hidden, _labels(batch), project, chunk_size)


def _sft_metrics(sums: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = (float(v) for v in sums.cpu())
    loss = loss_sum / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": correct / count if count else float("nan"), "tokens": int(count)}


_DPO_KEYS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
             "nll_chosen")


def _dpo_sums(model: nn.Module, batch: Mapping[str, Any], **options: Any) -> torch.Tensor:
    """float64 [loss sum, pairs, then the sum over pairs of each of _DPO_KEYS]."""
    out = dpo(model, batch, **options)
    pairs = _labels(batch).shape[0] // 2
    values = [out.loss.detach(), *(out.metrics[k] for k in _DPO_KEYS)]
    sums = torch.stack([v.double() * pairs for v in values])
    return torch.cat([sums[:1], sums.new_tensor([pairs]), sums[1:]])


def _dpo_metrics(sums: torch.Tensor) -> dict[str, float]:
    values = [float(v) for v in sums.cpu()]
    pairs = values[1]
    mean = (lambda v: v / pairs) if pairs else (lambda v: float("nan"))
    return {"loss": mean(values[0]), **{k: mean(v) for k, v in zip(_DPO_KEYS, values[2:])},
            "pairs": int(pairs)}


OBJECTIVES = ("sft", "dpo")


def make_objective(
    name: str,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reference: Reference | None = None,
    chunk_size: int = CHUNK_SIZE,
    rpo_alpha: float = 0.0,
) -> Objective:
    """``sft`` or ``dpo`` (with its β, loss type, RPO weight and reference context) as an
    :class:`Objective`."""
    if name == "sft":
        return Objective(
            "sft",
            lambda model, batch: sft(model, batch, chunk_size=chunk_size),
            lambda model, batch: _sft_sums(model, batch, chunk_size),
            _sft_metrics,
        )
    if name == "dpo":
        DPO_LOSSES.get(loss_type)  # a misspelt loss type fails here, not at the first step
        check_rpo_alpha(rpo_alpha)
        options = {"beta": beta, "loss_type": loss_type, "reference": reference,
                   "chunk_size": chunk_size, "rpo_alpha": rpo_alpha}
        return Objective(
            "dpo",
            lambda model, batch: dpo(model, batch, **options),
            lambda model, batch: _dpo_sums(model, batch, **options),
            _dpo_metrics,
        )
    raise ObjectiveError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
