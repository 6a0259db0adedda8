"""Which parameters a test-time method updates: normalisation affine parameters, all, or one
delta."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..core import delta_names, iter_hosts
from .errors import DeployError
from .norm import norm_param_names

ParamChoice = Literal["norm", "all"]


def collect_params(
    model: nn.Module, params: ParamChoice = "norm", delta: str | None = None, *, method: str = "tta"
) -> list[str]:
    """Names of the parameters to adapt (Tent's ``collect_params``, returning names).

    ``delta="NAME"`` selects the parameters of the delta attached under that name (``dt.attach``),
    for example only a LoRA; otherwise ``params="norm"`` selects the affine parameters of the
    normalisation layers and ``params="all"`` every floating-point parameter.
    """
    if delta is not None:
        if params != "norm":
            raise DeployError(
                f"{method}: give either delta={delta!r} or params={params!r}, not both"
            )
        known = delta_names(model)
        if delta not in known:
            raise DeployError(
                f"{method}: no delta named {delta!r} is attached (attached: "
                f"{', '.join(known) or 'none'}); dt.attach(model, spec, name=...) first"
            )
        hosts = [host for _, host in iter_hosts(model) if delta in host.delta_names()]
        ids = {id(p) for host in hosts for p in host.part(delta).parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
        if not names:
            raise DeployError(f"{method}: delta {delta!r} has no parameters to adapt")
        return names
    if params == "norm":
        names = norm_param_names(model)
        if not names:
            raise DeployError(
                f"{method}: the model has no normalisation layer with affine parameters "
                "(BatchNorm, LayerNorm, GroupNorm, RMSNorm) to adapt; pass delta=NAME to adapt an "
                "attached delta, params='all', or use an output-only method ('lame', 'em')"
            )
        return names
    if params == "all":
        return [n for n, p in model.named_parameters() if p.is_floating_point()]
    raise DeployError(
        f"{method}: params must be 'norm' or 'all' (or pass delta=NAME), not {params!r}"
    )
