"""peft's file layout of one method, declared once on its spec: ``peft = PeftLayout(...)``.

peft saves an adapter as ``adapter_config.json`` (``peft_type`` and the tuner's options) and
``adapter_model.safetensors`` (keys ``base_model.model.<module path>.<suffix>``). What differs from
method to method is small and declarative: the ``peft_type``, which of the delta's tensors go to
which suffix (renamed or reshaped on the way), which config options carry which spec field, the
constants peft expects beside them, and the peft options deltatune cannot express (refused with one
line naming the option). A :class:`PeftLayout` holds exactly that; :mod:`deltatune.io.peft` asks
it, and nothing else, for the files. Layouts that genuinely need code subclass it: tensors shared
by every host (VeRA, RandLoRA, VB-LoRA) or converted together (AdaLoRA's kept triplets) override
:meth:`PeftLayout.save`, :meth:`PeftLayout.load` or :meth:`PeftLayout.shared_tensors`; LoRA (one
rank with per-module patterns, PiSSA, DoRA, biases) and prompt learning (a root tensor) also write
their own :meth:`PeftLayout.config` and :meth:`PeftLayout.spec`. Config-level quirks are small
functions passed as ``check``/``write``/``read``.

A spec without a layout (``peft = None``, the default) saves in deltatune's format only.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from .errors import DeltaFileError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .delta import Delta
    from .host import Host
    from .spec import DeltaSpec

#: what most tuners' configs write for the options deltatune does not model (their "off" values)
OFF: Mapping[str, Any] = {
    "exclude_modules": None, "bias": "none", "layers_to_transform": None, "layers_pattern": None,
}
#: peft options a file may not set, with the value that means "unset": most tuners can take neither
#: a layer subset nor peft's own bias training
REFUSED: Mapping[str, Any] = {"layers_to_transform": None, "bias": "none"}


@dataclass(frozen=True)
class Option:
    """One peft config option and the spec field it carries.

    ``default`` is peft's value when a file lacks the key; ``choices`` pairs spec values with peft
    values where they differ (the first pair wins in each direction); ``required`` refuses a file
    without the key, saying why and how to fix it. ``write=False``/``read=False``: one direction
    only (a value peft records but deltatune derives, or the reverse)."""

    key: str
    field: str = ""
    default: Any = None
    choices: tuple[tuple[Any, Any], ...] = ()
    required: str = ""
    write: bool = True
    read: bool = True

    @property
    def name(self) -> str:
        """The spec field (the peft key unless named)."""
        return self.field or self.key

    def to_peft(self, spec: "DeltaSpec") -> Any:
        value = getattr(spec, self.name)
        if self.choices:
            return next(theirs for ours, theirs in self.choices if ours == value)
        if isinstance(value, tuple):
            return list(value)
        return dict(value) if isinstance(value, dict) else value

    def from_peft(self, owner: str, config: Mapping[str, Any], hint: Any) -> Any:
        value = config.get(self.key, self.default)
        if value is None and self.required:
            raise DeltaFileError(f"peft {owner} config has no {self.key}: {self.required}")
        if not self.choices:
            return _coerce(value, hint)
        for ours, theirs in self.choices:
            if type(theirs) is type(value) and theirs == value:
                return ours
        peft_values = list(dict.fromkeys(theirs for _, theirs in self.choices))
        if all(isinstance(v, bool) for v in peft_values):  # a flag: read as peft reads it
            return next(ours for ours, theirs in self.choices if theirs is bool(value))
        allowed = ", ".join(str(v).lower() if isinstance(v, bool) else repr(v) for v in peft_values)
        raise DeltaFileError(f"peft {owner} option {self.key}={value!r} is not one of {allowed}")


def init_flag(on: str, off: str, default: bool = True, **kw: Any) -> Option:
    """peft's boolean ``init_weights`` as the spec's ``init``: ``on`` for true (the usual start at
    the base model), ``off`` for false (peft's random start, for tests)."""
    return Option("init_weights", "init", default, choices=((on, True), (off, False)), **kw)


@dataclass(frozen=True)
class PeftTensor:
    """One tensor of a delta in peft's file: ``name`` in the delta's ``state_dict``, ``suffix``
    after the module path in peft's keys (default: the same), and ``save``/``load`` functions
    ``(delta, host, tensor) -> tensor`` where peft stores it in another shape or form."""

    name: str
    suffix: str = ""
    save: Callable[["Delta", "Host", "torch.Tensor"], "torch.Tensor"] | None = None
    load: Callable[["Delta", "Host", "torch.Tensor"], "torch.Tensor"] | None = None

    def __post_init__(self) -> None:
        if not self.suffix:
            object.__setattr__(self, "suffix", self.name)


@dataclass(frozen=True)
class PeftLayout:
    """A method's peft layout (see the module docstring).

    - ``peft_type``: peft's name of the tuner (``"LORA"``, ``"HRA"``, ...).
    - ``tensors``: the delta's tensors peft stores per module (:class:`PeftTensor`, or a name when
      peft uses the same one); a tensor the delta does not have (an optional factor) is skipped.
    - ``options``: the config options carrying spec fields (:class:`Option`).
    - ``fixed``: constants written into the config as they are (peft's values for what deltatune
      does not model); ``refuse``: options a file may not set, with their "unset" value.
    - ``fan_in_fan_out``: write peft's flag (set when any host is a GPT-2 ``Conv1D``);
      ``modules_to_save``: the config has peft's option of that name (every tuner but one).
    - ``extra_suffixes``: more suffixes a file may hold (read by an overridden :meth:`load`);
      ``shared_keys``: full keys of tensors shared by all hosts (VeRA's ``base_model.vera_A``),
      passed to every host's :meth:`load`; ``root_tensors``: prompt learning's layout (the delta's
      tensors at the file's root, trainable modules under ``base_model.``).
    - ``check(spec, deltas)``: why peft could not hold these deltas ("" when it can); ``write(spec,
      deltas)``: config keys computed by code; ``read(config, kwargs)``: spec keywords computed by
      code, given those read so far.
    """

    peft_type: str
    tensors: tuple[PeftTensor, ...] = ()
    options: tuple[Option, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=lambda: dict(OFF))
    refuse: Mapping[str, Any] = field(default_factory=lambda: dict(REFUSED))
    fan_in_fan_out: bool = False
    modules_to_save: bool = True
    extra_suffixes: tuple[str, ...] = ()
    shared_keys: tuple[str, ...] = ()
    root_tensors: bool = False
    check: Callable[["DeltaSpec", dict[str, "Delta"]], str] | None = None
    write: Callable[["DeltaSpec", dict[str, "Delta"]], dict[str, Any]] | None = None
    read: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:  # a plain name stands for PeftTensor(name)
        named = tuple(PeftTensor(t) if isinstance(t, str) else t for t in self.tensors)
        object.__setattr__(self, "tensors", named)

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every suffix after a module path that belongs to this layout."""
        return tuple(t.suffix for t in self.tensors) + self.extra_suffixes

    # -- adapter_config.json --------------------------------------------------------------------
    def check_saving(self, spec: "DeltaSpec", deltas: dict[str, "Delta"]) -> None:
        """Refuse, in one line, deltas peft's tuner could not hold (``check`` says why)."""
        why = self.check(spec, deltas) if self.check is not None else ""
        if why:
            raise DeltaFileError(f"{why}; save this adapter with format='deltatune'")

    def config(self, spec: "DeltaSpec", deltas: dict[str, "Delta"]) -> dict[str, Any]:
        """peft's ``adapter_config.json`` for ``spec``, given the built deltas by host path."""
        self.check_saving(spec, deltas)
        config: dict[str, Any] = {"peft_type": self.peft_type, "task_type": None}
        config.update((o.key, o.to_peft(spec)) for o in self.options if o.write)
        if self.write is not None:
            config.update(self.write(spec, deltas))
        if self.fan_in_fan_out:
            config["fan_in_fan_out"] = any(
                bool(getattr(d, "fan_in_fan_out", False)) for d in deltas.values()
            )
        config["target_modules"] = sorted(deltas)
        config.update(self.fixed)
        if self.modules_to_save:
            config["modules_to_save"] = list(spec.trainable_modules) or None
        config.update(inference_mode=True, base_model_name_or_path=None)
        return config

    def spec(
        self, cls: type["DeltaSpec"], config: Mapping[str, Any], targets: list[str]
    ) -> "DeltaSpec":
        """The spec for a peft ``config`` whose tensors sit on the modules ``targets``."""
        self.refuse_options(config)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # pragma: no cover - an unresolvable annotation: no coercion
            hints = {}
        kwargs: dict[str, Any] = {
            "targets": tuple(targets),
            "trainable_modules": tuple(config.get("modules_to_save") or ()),
        }
        owner = cls.__name__
        kwargs.update((o.name, o.from_peft(owner, config, hints.get(o.name)))
                      for o in self.options if o.read)
        if self.read is not None:
            kwargs.update(self.read(config, kwargs))
        return cls(**kwargs)

    def refuse_options(self, config: Mapping[str, Any]) -> None:
        """One line naming the first option the file sets that deltatune cannot express."""
        for key, off in self.refuse.items():
            value = config.get(key)
            if value is not None and value != off and value != [] and value != {}:
                fix = "without it" if off is None else f"with {key}={off!r}"
                raise DeltaFileError(f"peft option {key}={value!r} is not supported by "
                                     f"deltatune; save the adapter {fix}")

    # -- adapter_model.safetensors --------------------------------------------------------------
    def save(self, delta: "Delta", host: "Host") -> dict[str, "torch.Tensor"]:
        """One host's tensors as peft stores them, keyed by the suffix after its module path."""
        state = delta.state_dict()
        out = {}
        for t in self.tensors:
            if t.name in state:
                value = state[t.name]
                out[t.suffix] = t.save(delta, host, value) if t.save else value
        return out

    def load(
        self, delta: "Delta", host: "Host", tensors: dict[str, "torch.Tensor"]
    ) -> dict[str, "torch.Tensor"]:
        """The delta's ``state_dict`` entries from one host's peft tensors (and the shared ones)."""
        state = delta.state_dict()
        out = {}
        for t in self.tensors:
            if t.name not in state:
                continue
            if t.suffix not in tensors:
                have = sorted(k for k in tensors if k not in self.shared_keys)
                raise DeltaFileError(
                    f"peft {self.peft_type} file lacks {t.suffix!r} for a module (it has "
                    f"{have}); the file is incomplete or its config does not match it"
                )
            value = tensors[t.suffix]
            out[t.name] = t.load(delta, host, value) if t.load else value
        return out

    def shared_tensors(
        self, spec: "DeltaSpec", deltas: dict[str, "Delta"]
    ) -> dict[str, "torch.Tensor"]:
        """Tensors shared by all hosts, by full key (none unless a layout overrides it)."""
        return {}


def linear_only(spec: "DeltaSpec", deltas: dict[str, "Delta"]) -> str:
    """A ``check`` for tuners whose peft layers take ``nn.Linear`` only (no GPT-2 ``Conv1D``)."""
    if any(getattr(d, "fan_in_fan_out", False) for d in deltas.values()):
        return f"peft's {type(spec).__name__} hosts nn.Linear only, not GPT-2 Conv1D"
    return ""


def _coerce(value: Any, hint: Any) -> Any:
    """A JSON value as the spec field annotated ``hint`` takes it (``int("3")``, a dict's values);
    anything else (``Literal``s, unknown hints) is left for the spec's own validation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0]) if len(rest) == 1 else value
    if hint in (int, float, bool, str):
        return hint(value)
    if origin is dict:
        return {str(k): _coerce(v, args[1] if args else Any) for k, v in (value or {}).items()}
    if origin is tuple:
        return tuple(value)
    return value
