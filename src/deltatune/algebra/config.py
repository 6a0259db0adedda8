"""Merge configurations: mergekit's YAML format (the shared subset) plus deltatune's extras.

Read with :func:`load_merge_config`. Supported keys: ``merge_method``, ``base_model``, ``models``
(each ``model`` with optional ``parameters`` and, for Fisher/RegMean, ``stats``), ``parameters``,
``dtype``, ``out_dtype``, and deltatune's ``random_seed``. Parameter values follow mergekit: a
scalar, a *gradient* (a list interpolated over the layer position, 0 at the first layer and 1 at the
last), or conditional entries ``{filter: substring, value: ...}`` applied to tensors whose names
contain the substring. ``slices``/``modules`` (layer surgery) and tokenizer merging are not
supported.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import MergeConfigError

Setting = Any
_KNOWN = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "random_seed",
    "name",
}
_IGNORED = {"tokenizer_source", "tokenizer", "chat_template"}
_UNSUPPORTED = {"slices": "layer slices", "modules": "per-module definitions"}
#: mergekit's parameter names that are not Python identifiers
_RENAME = {"lambda": "lambda_"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass
class ModelEntry:
    path: Path
    parameters: dict[str, Setting] = field(default_factory=dict)
    stats: Path | None = None
    label: str = ""


@dataclass
class MergeConfig:
    """A parsed merge request; paths already resolved."""

    method: str
    models: list[ModelEntry]
    base: Path | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None

    def non_base(self) -> list[ModelEntry]:
        """The models besides the base (a base listed among ``models`` is the base, as in
        mergekit)."""
        if self.base is None:
            return list(self.models)
        return [m for m in self.models if m.path.resolve() != self.base.resolve()]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "base_model": None if self.base is None else str(self.base),
            "models": [
                {
                    "model": str(m.path),
                    "parameters": m.parameters,
                    **({"stats": str(m.stats)} if m.stats else {}),
                }
                for m in self.models
            ],
            "parameters": self.parameters,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
        }


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a YAML merge config; relative model paths are taken from the current directory first,
    then from the config file's directory."""
    import yaml

    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise MergeConfigError(f"config {path} {what}; pass a YAML merge config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeConfigError(
            f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix the syntax"
        ) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise MergeConfigError(
            f"cannot read config {path} ({exc}); pass a UTF-8 YAML merge config"
        ) from None
    except RecursionError:  # the YAML parser recurses per nesting level ([[[[...]]]])
        raise MergeConfigError(
            f"{path} nests too deeply to be a merge config; fix the file"
        ) from None
    return parse_merge_config(data, root=path.parent, source=str(path))


def parse_merge_config(data: Any, root: str | Path = ".", source: str = "config") -> MergeConfig:
    if not isinstance(data, dict):
        raise MergeConfigError(f"{source} must be a mapping with merge_method and models")
    for key, what in _UNSUPPORTED.items():
        if key in data:
            raise MergeConfigError(
                f"{source}: {key!r} ({what}) is not supported by deltatune merge; list whole "
                "models under 'models:'"
            )
    unknown = sorted(set(data) - _KNOWN - _IGNORED)
    if unknown:
        raise MergeConfigError(
            f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KNOWN))}"
        )
    for key in sorted(set(data) & _IGNORED):
        warnings.warn(
            f"{source}: {key!r} is ignored (deltatune merges weights only; copy tokenizers "
            "yourself)",
            stacklevel=2,
        )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise MergeConfigError(f"{source}: merge_method is missing; e.g. merge_method: ties")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError(
            f"{source}: 'models' must be a non-empty list of {{model: path}} entries"
        )
    root = Path(root)
    entries = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise MergeConfigError(f"{source}: models[{i}] needs a 'model' key with a path")
        extra = sorted(set(item) - {"model", "parameters", "stats"})
        if extra:
            raise MergeConfigError(
                f"{source}: models[{i}] has unknown key {extra[0]!r}; use model, parameters, stats"
            )
        stats = item.get("stats")
        entries.append(ModelEntry(
            path=_local(item["model"], root, source),
            parameters=_params(item.get("parameters"), f"{source}: models[{i}].parameters"),
            stats=None if stats is None else _local(stats, root, source),
            label=str(item["model"]),
        ))
    base = data.get("base_model")
    seed = data.get("random_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise MergeConfigError(f"{source}: random_seed must be an integer, got {seed!r}")
    config = MergeConfig(
        method=method,
        models=entries,
        base=None if base is None else _local(base, root, source),
        parameters=_params(data.get("parameters"), f"{source}: parameters"),
        dtype=_opt_str(data.get("dtype"), "dtype", source),
        out_dtype=_opt_str(data.get("out_dtype"), "out_dtype", source),
        seed=seed,
    )
    check_parameters(config, source)
    return config


def check_parameters(config: MergeConfig, source: str = "config") -> None:
    """Check every parameter value against the method's declared types and ranges now, before any
    tensor is read (one line naming the model, the parameter and the accepted values). Checks across
    parameters (weights that sum to 0 under normalize) run here when every value is a plain number,
    and for each tensor when the merge is planned otherwise (gradients, filters)."""
    from .registry import get_method, shown

    spec = get_method(config.method)
    known = set(spec.model_params) | set(spec.shared_params)
    scopes = [(f"{source}: parameters: ", config.parameters)]
    scopes += [
        (f"{source}: models[{i}] ({e.label}): ", e.parameters) for i, e in enumerate(config.models)
    ]
    for where, params in scopes:
        for key, setting in params.items():
            if key not in known:
                raise MergeConfigError(
                    f"{where}merge method {spec.name!r} has no parameter {shown(key)!r}; "
                    f"it takes: {', '.join(sorted(map(shown, known))) or 'none'}"
                )
            try:
                values = setting_values(setting)
            except MergeConfigError as exc:
                raise MergeConfigError(f"{where}{shown(key)}: {exc}") from None
            for value in values:
                spec.value(key, value, where)
    entries = config.non_base() if spec.needs_base else config.models
    if entries and all(_plain(v) for _, params in scopes for v in params.values()):
        def given(params: dict[str, Setting]) -> dict[str, Setting]:
            return {
                k: v for k, v in params.items() if v is not None
            }  # null: the default, as per tensor

        spec.resolve(
            [given(e.parameters) for e in entries], given(config.parameters), f"{source}: "
        )


def _opt_str(value: Any, key: str, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MergeConfigError(f"{source}: {key} must be a dtype name such as float32 or bfloat16")


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping of parameter names to values")
    return {_RENAME.get(str(k), str(k)): v for k, v in value.items()}


def _local(ref: Any, root: Path, source: str) -> Path:
    if not isinstance(ref, str) or not ref:
        raise MergeConfigError(f"{source}: model references must be paths, got {ref!r}")
    for candidate in (Path(ref), root / ref):
        if candidate.exists():
            return candidate
    if "+" in ref:
        raise MergeConfigError(
            f"{source}: {ref!r} not found; 'model+lora' references are not supported: merge the "
            "LoRA first (dt.merge)"
        )
    raise MergeConfigError(
        f"{source}: model {ref!r} not found locally; deltatune never downloads: pass a local "
        "directory or .safetensors file"
    )


# -- per-tensor parameter values ------------------------------------------------------------------
def layer_count(names: list[str]) -> int:
    """Number of numbered layers (``layers.N.`` and similar) among tensor names; 0 if none."""
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 0


def layer_position(name: str, n_layers: int) -> float:
    """Where a tensor sits for gradients, as in mergekit: i/(n−1) for layer i, 0 outside the
    layers."""
    m = _LAYER.search(name)
    if m is None or n_layers == 0:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def resolve_setting(setting: Setting, tensor: str, t: float) -> Any:
    """A parameter's value for ``tensor`` at layer position ``t`` (None: not set for this
    tensor)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if not isinstance(setting, list):
        raise MergeConfigError(
            f"parameter value {setting!r} must be a number, a list (gradient) or filter entries"
        )
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        numbers = [yaml_number(v) for v in setting]
        if any(n is None for n in numbers):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(numbers) - 1)
        i0 = int(scaled)
        i1 = min(len(numbers) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * numbers[i0] + frac * numbers[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise MergeConfigError(
                "conditional parameter entries need a 'value' (and optional 'filter'); got "
                f"{cond!r}"
            )
        flt = cond.get("filter")
        if flt is None or flt == "*" or str(flt) in tensor:
            return resolve_setting(cond["value"], tensor, t)
    return None


def setting_values(setting: Setting) -> list[Any]:
    """Every plain value a setting can take: the scalar, a gradient's points (values between them
    are interpolated, so they lie inside any interval holding the points) or the filter entries'
    values."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return [setting]
    if not isinstance(setting, list):
        raise MergeConfigError(
            f"parameter value {setting!r} must be a number, a list (gradient) or filter entries"
        )
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        return list(setting)
    values = []
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise MergeConfigError(
                f"conditional parameter entries need a 'value' (and optional 'filter'); "
                f"got {cond!r}"
            )
        values += setting_values(cond["value"])
    return values


def _plain(setting: Setting) -> bool:
    return isinstance(setting, (bool, int, float, str)) or setting is None


def yaml_number(value: Any) -> float | None:
    """A merge config's value as a number (YAML may give "1e-3" as a string), or None where it is
    none (a bool, a word, a list)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def resolve_all(settings: Mapping[str, Setting], tensor: str, t: float) -> dict[str, Any]:
    out = {}
    for key, setting in settings.items():
        value = resolve_setting(setting, tensor, t)
        if value is not None:
            out[key] = value
    return out
