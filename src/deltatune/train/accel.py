"""Accelerator settings of a run: device, autocast precision, torch.compile, FSDP sharding.

Each setting changes how a step runs, never what it computes up to rounding, so the trainer's loop
stays one loop:

- **device**: ``auto`` keeps accelerate's choice (a GPU when one is visible, else the CPU);
  ``cpu``/``cuda``/``mps`` insist, and a device that is not there is a one-line error up front.
- **precision**: ``bf16``/``fp16`` run forward and loss under ``torch.autocast`` (matmuls in the
  half type, reductions and the loss in fp32); the trainable tensors and AdamW's state stay fp32.
  fp16's narrow exponent underflows small gradients, so it scales the loss (``GradScaler``), and
  only on CUDA: the CPU has no fp16 kernels worth using and no scaler (bf16 is the CPU's half type).
  The autocast is applied here, not through accelerate's ``mixed_precision``, because accelerate
  patches the model's ``forward`` for good, and the user's model must leave ``fit`` unchanged.
- **compile**: ``torch.compile`` of the training forward (evaluation runs the plain module). Where
  dynamo or the inductor backend cannot run (an unsupported Python, no C++ compiler for CPU
  kernels) that is said before training starts, not after minutes of tracing.
- **fsdp**: under ``accelerate launch`` with several processes, parameters, gradients and AdamW's
  state are sharded with accelerate's FSDP2 plugin (``fully_shard``). accelerate only enables FSDP
  on GPU launches; on CPU processes (gloo) it is set on the shared state here, which is how the
  sharded path is tested without a GPU. Checkpoints hold full (gathered) tensors, so a sharded run
  resumes sharded, and at the end the parameters are gathered back into ordinary tensors, so the
  saved delta is the whole delta (not one process's shard, nor empty).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, TrainError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def has_accelerator() -> bool:
    """Whether a GPU-like device is visible (CUDA, MPS or XPU): where accelerate trains by
    default."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or _mps_available() or bool(xpu and xpu.is_available())


def wants_cpu(cfg: TrainConfig) -> bool:
    """Whether the run must use the CPU (the ``cpu=`` argument of ``Accelerator``); a device that
    is asked for and not visible is a :class:`TrainError`."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            "TrainConfig.device='cuda' but torch sees no CUDA GPU here; use device 'auto' or 'cpu'"
        )
    if cfg.device == "mps" and not _mps_available():
        raise TrainError(
            "TrainConfig.device='mps' but torch sees no Apple MPS device here; use device 'auto' "
            "or 'cpu'"
        )
    if cfg.device == "auto":
        return not has_accelerator()
    return cfg.device == "cpu"


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a precision the resolved ``device`` cannot run."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainError(
            f"TrainConfig.precision='fp16' (with loss scaling) needs a CUDA GPU; this run is on "
            f"{device.type}: use precision 'bf16' or 'fp32'"
        )
    if (cfg.precision == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):  # pragma: no cover - pre-Ampere GPUs
        raise TrainError(
            "TrainConfig.precision='bf16' but this GPU has no bf16 support; use 'fp16' or 'fp32'"
        )


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a forward + loss at ``cfg.precision`` on ``device``."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(cfg: TrainConfig, device: torch.device) -> Any | None:
    """A ``GradScaler`` for fp16 on CUDA, else None (bf16 has fp32's exponent range: no
    scaling)."""
    if cfg.precision != "fp16" or device.type != "cuda":
        return None
    return torch.amp.GradScaler("cuda")  # pragma: no cover - needs a GPU


def compile_problem() -> str | None:
    """Why ``torch.compile`` cannot run here (one line), or None when it can."""
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:  # pragma: no cover - torch < 2.0
        return f"torch {torch.__version__} has no torch.compile (it needs torch >= 2.0)"
    try:
        import torch._dynamo as dynamo
    except ImportError as exc:  # pragma: no cover - a broken install
        return f"torch._dynamo cannot be imported ({exc})"
    supported = getattr(dynamo, "is_dynamo_supported", lambda: True)
    if not supported():  # pragma: no cover - depends on the Python version
        return (f"torch {torch.__version__} cannot compile on Python "
                f"{sys.version_info.major}.{sys.version_info.minor}")
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        return ("torch.compile's inductor backend needs a C++ compiler for CPU kernels and none "
                "is on PATH (install g++ or set CXX)")
    return None


def check_compile(cfg: TrainConfig) -> None:
    """A :class:`TrainError` up front when ``cfg.compile`` is set and torch cannot compile here."""
    if cfg.compile:
        problem = compile_problem()
        if problem:
            raise TrainError(f"TrainConfig.compile=True: {problem}; train without compile")


def check_settings(cfg: TrainConfig) -> None:
    """Every accelerator setting of ``cfg`` that cannot run here, as a :class:`TrainError`, before
    anything is loaded or written (the CLI calls it before ``--out`` is created)."""
    check_compile(cfg)
    if wants_cpu(cfg):
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif _mps_available():
        device = torch.device("mps")
    else:  # pragma: no cover - XPU
        return
    check_precision(cfg, device)


# -- FSDP ------------------------------------------------------------------------------------------
def enable_fsdp(acc: Any) -> None:
    """Switch accelerate's shared state to FSDP2 for this multi-process run (accelerate does it
    itself only on GPU launches; the sharding itself is device-agnostic and runs on gloo too)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2:
        return
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, cpu_ram_efficient_loading=False
    )
    state = AcceleratorState()
    _SET_BY_US[id(state)] = state.distributed_type  # what a later unsharded fit returns to
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    acc.state.fsdp_plugin = plugin


def disable_fsdp(acc: Any) -> None:
    """Undo :func:`enable_fsdp` for an unsharded run after a sharded one in the same processes
    (accelerate's state is process-wide); FSDP that accelerate set up itself is left alone."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    previous = _SET_BY_US.pop(id(state), None)
    if previous is not None:
        state.distributed_type = previous
        state.fsdp_plugin = None


_SET_BY_US: dict[int, Any] = {}


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_full(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with every sharded (DTensor) value gathered whole: a collective, so every
    process calls it with the same keys in the same order."""
    return {k: (v.full_tensor() if torch.is_tensor(v) and is_sharded(v) else v)
            for k, v in tensors.items()}


def shard_like(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Full tensors ``saved`` cut like their sharded ``live`` namesakes (a collective; keys
    without a sharded namesake are returned unchanged)."""
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, Any] = {}
    for key, value in saved.items():
        ref = live.get(key)
        if ref is not None and is_sharded(ref) and torch.is_tensor(value):
            value = distribute_tensor(value.to(ref.dtype), ref.device_mesh, ref.placements)
        out[key] = value
    return out


def unshard(model: nn.Module) -> None:
    """Gather every sharded parameter of ``model`` into an ordinary tensor in place and drop the
    FSDP wrapping, so that what follows ``fit`` (evaluation, saving the delta) sees the whole model
    and needs no collectives. Every process calls it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    for module in model.modules():  # the sharded parameters registered (the root keeps its
        if isinstance(module, FSDPModule):  # gathered ones after a forward)
            module.reshard()
    params = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()
              if p is not None and is_sharded(p)]
    full = [p.full_tensor() for _, _, p in params]  # collectives, the same order everywhere
    for (module, name, param), tensor in zip(params, full):
        module._parameters[name] = nn.Parameter(tensor.detach().clone(),
                                                requires_grad=param.requires_grad)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = _get_module_fsdp_state(module)
            for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
                handle = getattr(state, attr, None) if state is not None else None
                if handle is not None:
                    handle.remove()
            plain = [c for c in type(module).__mro__[1:]
                     if not issubclass(c, FSDPModule) and issubclass(c, nn.Module)][0]
            module.__class__ = plain
