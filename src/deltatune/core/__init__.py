"""The delta engine: hosts, named deltas, activation, routing, merging, target selection, specs."""

from .delta import Delta
from .errors import DeltaError, DeltaFileError, SpecError, StateError, TargetError
from .host import DeltaHost, Host, ModuleCopy, iter_hosts, module_kind
from .model import (
    TrainableSummary,
    active,
    attach,
    delta_names,
    detach,
    disabled,
    freeze_base,
    get_spec,
    host_paths,
    merge,
    route,
    set_active,
    trainable_summary,
    unmerge,
)
from .quantized import QuantizedBase, requantization_errors
from .spec import DeltaSpec, register, registered_methods, spec_from_dict
from .targets import select_targets

__all__ = [
    "Delta", "DeltaError", "DeltaFileError", "DeltaHost", "DeltaSpec", "Host", "ModuleCopy",
    "QuantizedBase", "SpecError", "StateError", "TargetError", "TrainableSummary", "active",
    "attach", "delta_names",
    "detach", "disabled", "freeze_base", "get_spec", "host_paths", "iter_hosts", "merge",
    "module_kind", "register", "registered_methods", "route", "select_targets", "set_active",
    "spec_from_dict", "trainable_summary", "unmerge", "requantization_errors",
]
