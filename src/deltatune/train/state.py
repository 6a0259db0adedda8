"""The trainer's resumable state, and its conversion to and from checkpoint files.

Optimizer state is stored by parameter *name* (not torch's positional index), so a checkpoint is
readable on its own and a model whose trainable set changed is refused with a clear message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import rng
from .config import TRAJECTORY_FIELDS, CheckpointError, TrainConfig, TrainError


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    micro: int = 0  # micro-batches of that epoch's permutation already trained on
    samples: int = 0  # examples trained on, all processes together
    steps: list[dict[str, Any]] = field(default_factory=list)  # per-step loss, lr, grad norm
    evals: list[dict[str, Any]] = field(default_factory=list)  # per-evaluation metrics
    best: dict[str, Any] | None = None  # the best evaluation so far (with its epoch and step)


def _optimizer_order(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    # torch numbers the parameters in the order they appear across param_groups.
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def optimizer_to_files(opt: torch.optim.Optimizer,
                       names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    order = _optimizer_order(opt, names)
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{order[idx]}/{key}"] = value
            else:
                scalars[f"{order[idx]}/{key}"] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    return tensors, {"groups": groups, "scalars": scalars}


def optimizer_from_files(
    opt: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    order = _optimizer_order(opt, names)
    index = {n: i for i, n in enumerate(order)}
    saved = [list(g["params"]) for g in meta["groups"]]
    current = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    if saved != current:
        raise CheckpointError(
            "the checkpoint's optimizer groups do not match this model's trainable "
            "parameters; resume with the same model and delta, or start over"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        name, _, sub = key.rpartition("/")
        state.setdefault(index[name], {})[sub] = value
    groups = []
    for g in meta["groups"]:
        group = {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        group["params"] = [index[n] for n in g["params"]]
        groups.append(group)
    opt.load_state_dict({"state": state, "param_groups": groups})


def snapshot(named: list[tuple[str, nn.Parameter]], buffers: list[tuple[str, torch.Tensor]],
             opt: torch.optim.Optimizer, state: TrainState, best: dict[str, torch.Tensor],
             rng_states: list[dict[str, torch.Tensor]], info: dict[str, Any]) -> tuple[dict, dict]:
    """(files, meta) for :func:`checkpoint.save`; ``info`` holds config, task, sizes."""
    opt_tensors, opt_meta = optimizer_to_files(opt, {id(p): n for n, p in named})
    rng_tensors, rng_meta = rng.to_files(rng_states)
    files = {
        "model": {**dict(named), **dict(buffers)},
        "optimizer": opt_tensors,
        "rng": rng_tensors,
    }
    if best:
        files["best"] = best
    meta = {**info, "state": asdict(state), "optimizer": opt_meta, "rng": rng_meta,
            "param_names": [n for n, _ in named], "buffer_names": [n for n, _ in buffers]}
    return files, meta


def check_compatible(meta: dict[str, Any], cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Refuse to resume into a run that would train differently from the interrupted one."""
    if meta.get("world_size") != info["world_size"]:
        raise CheckpointError(
            f"the checkpoint was written by {meta.get('world_size')} process(es), this run has "
            f"{info['world_size']}; relaunch with the same number of processes"
        )
    if meta.get("n_train") != info["n_train"]:
        raise CheckpointError(
            f"the checkpoint was made on {meta.get('n_train')} training examples, this data has "
            f"{info['n_train']}; resume with the same training data"
        )
    if meta.get("task_kind") != info["task_kind"]:
        raise CheckpointError(
            f"the checkpoint is for task kind {meta.get('task_kind')!r}, not {info['task_kind']!r}"
        )
    saved = meta.get("config") or {}
    defaults = TrainConfig().to_dict()
    for name in TRAJECTORY_FIELDS:
        if saved.get(name, defaults[name]) != getattr(
            cfg, name
        ):  # a field newer than the checkpoint: its default
            raise TrainError(
                f"TrainConfig.{name}={getattr(cfg, name)!r} differs from the checkpoint's "
                f"{saved.get(name)!r}; resume with the original value or start a new run"
            )


def restore(files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
            named: list[tuple[str, nn.Parameter]], buffers: list[tuple[str, torch.Tensor]],
            opt: torch.optim.Optimizer) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Load tensors and optimizer state into the live objects; the restored state and best
    tensors."""
    expected = [n for n, _ in named]
    if meta.get("param_names") != expected:
        missing = sorted(set(expected) - set(meta.get("param_names") or []))
        extra = sorted(set(meta.get("param_names") or []) - set(expected))
        raise CheckpointError(
            "the checkpoint's trainable parameters differ from the model's (missing "
            f"{missing[:3]}, unexpected {extra[:3]}); resume with the same model and delta, or "
            "start over"
        )
    model_tensors = files.get("model", {})
    try:
        with torch.no_grad():
            for name, tensor in [*named, *buffers]:
                saved = model_tensors[name]
                if saved.shape != tensor.shape:
                    raise CheckpointError(
                        f"{name} has shape {tuple(saved.shape)} in the checkpoint, "
                        f"{tuple(tensor.shape)} in the model; resume with the same model"
                    )
                tensor.copy_(saved)
        optimizer_from_files(
            opt, {id(p): n for n, p in named}, files.get("optimizer", {}), meta["optimizer"]
        )
        state = TrainState(**meta["state"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"the checkpoint is incomplete or malformed ({type(exc).__name__}: {exc}); "
            "delete it to start over, or train without resume"
        ) from None
    return state, files.get("best", {})
