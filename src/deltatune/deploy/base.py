"""The test-time adaptation wrapper contract, the one shared optimizer step, and ``adapt()``.

Every method is a small wrapper in the style of Tent (Wang et al., ICLR 2021,
https://arxiv.org/abs/2006.10726): ``configure`` (eval mode, what is trainable, how BatchNorm
normalises), ``collect_params`` (names), ``check`` (clear messages), ``forward_and_adapt`` (under
``torch.enable_grad()`` for gradient methods) and ``reset()`` back to the source model. The wrapper
is called exactly like the model and returns what the model returns.

Modes: ``episodic=True`` resets to the source model before every batch (each batch adapted on its
own); ``episodic=False`` (continual) keeps adapting across batches until ``reset()``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from ..core.registry import Registry
from .batch import LogitsFn, check_batch, get_logits
from .errors import BatchError, DeployError
from .norm import BatchNormStats, StatsMode, batchnorm_layers
from .params import ParamChoice, collect_params

#: every test-time method by name (``@register_method`` on each wrapper class)
METHODS: Registry[type["TTAWrapper"]] = Registry(
    "test-time method", DeployError, quote=False, key=lambda cls: cls.method)
# The wrapper currently around each model (by id; the wrapper holds the model, so the entry lives as
# long as both). Two wrappers on one model would stack hooks and requires_grad choices, so a second
# one is refused. A wrapper with BatchNorm hooks is kept alive by them, so unwrap() can still find
# it.
_WRAPPED: "weakref.WeakValueDictionary[int, TTAWrapper]" = weakref.WeakValueDictionary()
_BAD_OPTIMIZER = (
    "optimizer must be 'sgd', 'adam' or a callable params -> torch.optim.Optimizer, not {!r}"
)
OptimizerChoice = Literal["sgd", "adam"] | Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def register_method(cls: type["TTAWrapper"]) -> type["TTAWrapper"]:
    return METHODS.register(cls)


class TTAWrapper(nn.Module):
    """Base of every test-time wrapper: batch checks, BatchNorm statistics, modes, reset.

    Batches smaller than ``min_batch`` (default 2 when BatchNorm layers normalise with batch
    statistics, else 1) raise a :class:`BatchError` with ``small_batch="error"``; with
    ``small_batch="source"`` they are predicted by the current model with the source BatchNorm
    statistics and nothing is adapted.
    """

    method: ClassVar[str] = ""
    bn_mode: ClassVar[StatsMode | None] = None  # how BatchNorm layers normalise while adapting
    uses_grad: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        min_batch: int | None = None,
        small_batch: Literal["error", "source"] = "error",
        logits_fn: LogitsFn | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise DeployError(
                f"{self.method}: model must be a torch.nn.Module, not {type(model).__name__}"
            )
        previous = wrapper_of(model)
        if previous is not None:
            raise DeployError(
                f"{self.method}: the model is already wrapped by {previous.method!r}; call "
                ".remove() on that wrapper or dd.unwrap(model) first"
            )
        if small_batch not in ("error", "source"):
            raise DeployError(
                f"{self.method}: small_batch must be 'error' or 'source', not {small_batch!r}"
            )
        if min_batch is not None and min_batch < 1:
            raise DeployError(f"{self.method}: min_batch must be at least 1, not {min_batch}")
        self.model = model
        self.episodic = bool(episodic)
        self.small_batch = small_batch
        self.logits_fn = logits_fn
        self.bn_stats: BatchNormStats | None = None
        self._removed = False
        self._was_training = model.training
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.param_names: list[str] = []
        try:
            self.configure()
            self.check()
        except Exception:
            self._undo()
            raise
        _WRAPPED[id(model)] = self
        if self.bn_stats is not None:
            self.bn_stats.owner = (
                self  # the model's hooks keep the wrapper (and its undo) reachable
            )
        batch_stats = self.bn_stats is not None and self.bn_stats.mode == "batch"
        self.min_batch = int(min_batch) if min_batch is not None else (2 if batch_stats else 1)

    # --- the contract -------------------------------------------------------------------------
    def configure(self) -> None:
        """Eval mode (no dropout) and BatchNorm hooks; gradient methods also choose trainable
        params."""
        self.model.eval()
        if self.bn_mode is not None and batchnorm_layers(self.model):
            self.bn_stats = self.make_bn_stats()

    def make_bn_stats(self) -> BatchNormStats:
        return BatchNormStats(self.model, self.bn_mode or "batch")

    def check(self) -> None:
        """Raise a clear error when the model does not fit the method."""

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reset_state(self) -> None:
        """Method-specific state back to its start (running estimates, teachers, ...)."""

    # --- shared machinery -----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._removed:
            raise DeployError(
                f"{self.method}: this wrapper was removed from its model; make a new one with "
                "dd.adapt()"
            )
        n = check_batch(args, kwargs, self.method)
        if n < self.min_batch:
            if self.small_batch == "error":
                raise BatchError(
                    f"{self.method}: batch of {n} is smaller than min_batch={self.min_batch} "
                    "(BatchNorm layers normalise with batch statistics); use larger batches, "
                    "small_batch='source' to predict such batches unadapted, or method 'alpha_bn'"
                )
            return self.source_forward(*args, **kwargs)
        if self.episodic:
            self.reset()
        with torch.enable_grad() if self.uses_grad else torch.no_grad():
            return self.forward_and_adapt(*args, **kwargs)

    def source_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The current model with the source BatchNorm statistics, no adaptation."""
        if self.bn_stats is not None:
            self.bn_stats.enabled = False
        try:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        finally:
            if self.bn_stats is not None:
                self.bn_stats.enabled = True

    def logits(self, output: Any) -> torch.Tensor:
        return get_logits(output, self.logits_fn)

    def reset(self) -> None:
        """Back to the source model: parameters, BatchNorm statistics, optimizer and method
        state."""
        if self.bn_stats is not None:
            self.bn_stats.reset()
        self.reset_state()

    def remove(self, *, reset: bool = True) -> nn.Module:
        """Take the wrapper off: hooks removed, ``requires_grad`` and train/eval mode restored.

        With ``reset`` (default) the source weights come back first; ``reset=False`` keeps the
        adapted ones.
        """
        if reset:
            self.reset()
        self._undo()
        self._removed = True
        if _WRAPPED.get(id(self.model)) is self:
            del _WRAPPED[id(self.model)]
        return self.model

    def _undo(self) -> None:
        """Hooks off, ``requires_grad`` and train/eval mode as they were before the wrapper."""
        if self.bn_stats is not None:
            self.bn_stats.remove()
            self.bn_stats = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        self.model.train(self._was_training)

    def train(self, mode: bool = True) -> "TTAWrapper":
        # The wrapped model stays in eval mode: dropout off and BatchNorm handled by the hooks.
        self.training = mode
        return self

    def extra_repr(self) -> str:
        mode = "episodic" if self.episodic else "continual"
        return f"method={self.method}, mode={mode}, adapted_params={len(self.param_names)}"


class GradientTTA(TTAWrapper):
    """A wrapper that updates parameters by gradient steps on an unsupervised loss.

    ``params``/``delta`` choose what is updated (see :func:`collect_params`); ``optimizer`` is
    ``"sgd"`` (with ``momentum``), ``"adam"`` or a factory ``params -> torch.optim.Optimizer``;
    ``steps`` forward/update rounds per batch.
    """

    bn_mode: ClassVar[StatsMode | None] = "batch"
    uses_grad: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamChoice = "norm",
        delta: str | None = None,
        optimizer: OptimizerChoice = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        steps: int = 1,
        **common: Any,
    ) -> None:
        self._choice = (params, delta)
        self._opt_choice, self.lr, self.momentum, self.weight_decay = (
            optimizer,
            lr,
            momentum,
            weight_decay,
        )
        if not (isinstance(steps, int) and steps >= 1):
            raise DeployError(f"steps must be a positive integer, not {steps!r}")
        if not lr > 0:
            raise DeployError(f"lr must be positive, not {lr}")
        if not (callable(optimizer) or optimizer in ("sgd", "adam")):
            raise DeployError(_BAD_OPTIMIZER.format(optimizer))
        self.steps = steps
        super().__init__(model, **common)
        self._source = {n: p.detach().clone() for n, p in self.named_adapted()}
        try:
            self.optimizer = self.make_optimizer()
        except Exception:  # a user factory failed: leave the model as it was
            self.remove(reset=False)
            raise

    def configure(self) -> None:
        super().configure()
        self.param_names = collect_params(self.model, *self._choice, method=self.method)
        chosen = set(self.param_names)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in chosen)

    def named_adapted(self) -> list[tuple[str, nn.Parameter]]:
        chosen = set(self.param_names)
        return [(n, p) for n, p in self.model.named_parameters() if n in chosen]

    def adapted(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_adapted()]

    def make_optimizer(self) -> torch.optim.Optimizer:
        params, choice = self.adapted(), self._opt_choice
        if callable(choice):
            return choice(params)
        if choice == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if choice == "adam":
            return torch.optim.Adam(
                params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay
            )
        raise DeployError(_BAD_OPTIMIZER.format(choice))

    def reset(self) -> None:
        with torch.no_grad():
            for n, p in self.named_adapted():
                p.copy_(self._source[n])
        self.optimizer = self.make_optimizer()  # fresh moments: the source optimizer state
        super().reset()

    def forward_and_adapt(self, *args: Any, **kwargs: Any) -> Any:
        for _ in range(self.steps):
            output = self.adapt_step(args, kwargs)
        return output

    def adapt_step(self, args: tuple, kwargs: dict) -> Any:
        """One forward + update; returns the model output of that forward (before the update)."""
        raise NotImplementedError

    def update(
        self, loss_fn: Callable[[], torch.Tensor | None], *, rho: float = 0.0
    ) -> torch.Tensor | None:
        """The one optimizer step every gradient method uses: ``loss_fn()``, backward, step.

        ``loss_fn`` returns ``None`` when no sample is fit to learn from; then nothing changes. With
        ``rho > 0`` the step is sharpness-aware (SAM, Foret et al. 2021,
        https://arxiv.org/abs/2010.01412): the gradient is taken at ``w + rho * g / ||g||`` and
        applied at ``w``; ``loss_fn`` is called twice.
        """
        loss = loss_fn()
        if loss is None:
            return None
        self._backward(loss)
        if rho > 0:
            grads = [(p, p.grad) for p in self.adapted() if p.grad is not None]
            norm = (
                torch.norm(torch.stack([g.norm(2) for _, g in grads]), 2)
                if grads
                else torch.tensor(0.0)
            )
            shifts = [(p, rho * g / (norm + 1e-12)) for p, g in grads]
            with torch.no_grad():
                for p, e in shifts:
                    p.add_(e)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                loss = loss_fn()
                if loss is not None:
                    self._backward(loss)
            finally:
                with torch.no_grad():
                    for p, e in shifts:
                        p.sub_(e)
            if loss is None:
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise DeployError(
                f"{self.method}: the adaptation loss is {loss.item()}; the model was not updated. "
                "Lower lr, or reset() if earlier updates diverged"
            )
        loss.backward()


def wrapper_of(model: nn.Module) -> "TTAWrapper | None":
    """The test-time wrapper currently around ``model``, if any."""
    found = _WRAPPED.get(id(model))
    return found if found is not None and found.model is model else None


def unwrap(model: nn.Module, *, reset: bool = True) -> nn.Module:
    """Take whatever test-time wrapper is around ``model`` off (see :meth:`TTAWrapper.remove`)."""
    found = wrapper_of(model)
    return found.remove(reset=reset) if found is not None else model


def method_options(cls: type[TTAWrapper]) -> list[str]:
    """Keyword options a method accepts (its own and its base classes')."""
    names: dict[str, None] = {}
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, TTAWrapper) and "__init__" in vars(klass):
            for p in list(inspect.signature(klass.__init__).parameters.values())[2:]:
                if p.kind is p.KEYWORD_ONLY:
                    names.setdefault(p.name, None)
    return list(names)


def adapt(model: nn.Module, method: str = "safe", **options: Any) -> TTAWrapper:
    """Wrap ``model`` in the test-time method ``method`` (any registered name) with ``options``.

    ``deltatune.deploy.adapt(model, "tent", lr=1e-3)(x)`` predicts ``x`` and adapts on it.
    Methods: see :data:`METHODS` (``safe``, ``bn``, ``alpha_bn``, ``tent``, ``eata``, ``sar``,
    ``deyo``, ``roid``, ``shot``, ``cotta``, ``rmt``, ``rotta``, ``t3a``, ``lame``, ``em``). The
    default, ``safe``, corrects label shift and backs off when its updates drift (see
    :class:`deltatune.deploy.safe.Safe`; measured against the others in docs/deployment.md): on
    text, Tent and its relatives raised the error above the unadapted model's.
    """
    if not isinstance(model, nn.Module):
        raise DeployError(f"adapt() needs a torch.nn.Module, not {type(model).__name__}")
    cls = METHODS.get(method)
    accepted = method_options(cls)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise DeployError(
            f"method {method!r} has no option {unknown[0]!r}; its options: {', '.join(accepted)}"
        )
    return cls(model, **options)
