"""peft's adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<suffix>``; the suffixes, the config and the tensor
conversions belong to each method, declared as its spec's ``peft`` layout
(:class:`~deltatune.core.peft_layout.PeftLayout`), which is all this module asks. It does the
common part: prefixes, trainable module copies (peft's ``modules_to_save``), aligning module paths
when peft wrapped a different root, and rollback on failure.

Integrity: ``adapter_config.json`` stays exactly what peft reads, so the sha256 of the tensor file
goes to a side file, ``adapter_checksums.json`` (peft ignores it), checked on loading. A directory
without it (written by peft itself) loads unverified; one whose tensors were rewritten by another
tool after deltatune saved it fails the check: delete the side file or load with ``verify=False``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import DeltaFileError, StateError
from ..core.host import get_module
from ..core.model import delta_names, detach, get_spec
from ..core.peft_layout import PeftLayout
from ..core.spec import DeltaSpec, registered_methods
from ..core.targets import iter_candidates
from .adapter import PEFT_JSON, PEFT_TENSORS, attach_from_file, load_module_states, parts_of
from .checks import (
    CHECKSUM_FORMAT,
    PEFT_CHECKSUMS,
    file_sha256,
    peft_checksums,
    validate_peft_config,
    verify_file,
)
from .files import load_tensors, read_json, save_tensors, write_json

PREFIX = "base_model.model."
ROOT_PREFIX = "base_model."  # trainable modules of prompt-learning adapters


def _hf_root(model: nn.Module, paths: list[str]) -> str:
    """The prefix of the transformers model inside a deltatune wrapper (a causal LM's ``lm.``) when
    everything saved lies inside it: peft names modules relative to the transformers model, so
    peft loads the file on that model directly. ``""`` when the model is itself one."""
    heads = {p.split(".", 1)[0] for p in paths}
    if hasattr(model, "config") or len(heads) != 1 or not all("." in p for p in paths):
        return ""
    head = next(iter(heads))
    return head + "." if hasattr(getattr(model, head, None), "config") else ""


def save_peft(model: nn.Module, path: Path, name: str) -> None:
    spec = get_spec(model, name)
    layout = spec.peft
    if layout is None:
        raise DeltaFileError(
            f"{type(spec).__name__} has no peft file layout; save it with format='deltatune'"
        )
    deltas, copies = parts_of(model, name)
    root = "" if layout.root_tensors else _hf_root(model, [*deltas, *copies])
    hosts = {hp[len(root):]: hp for hp in deltas}  # peft's module path → this model's
    config = layout.config(spec, {p: deltas[hp] for p, hp in hosts.items()})  # refuses first
    tensors: dict[str, torch.Tensor] = {}
    for p, hp in hosts.items():
        for suffix, value in layout.save(deltas[hp], get_module(model, hp)).items():
            tensors[suffix if layout.root_tensors else f"{PREFIX}{p}.{suffix}"] = value
    for mp, module in copies.items():
        for key, value in module.state_dict().items():
            prefix = ROOT_PREFIX if layout.root_tensors else PREFIX
            tensors[f"{prefix}{mp[len(root):]}.{key}"] = value
    tensors.update(layout.shared_tensors(spec, deltas))
    if copies:
        config["modules_to_save"] = sorted(mp[len(root):] for mp in copies)
    save_tensors(path / PEFT_TENSORS, tensors, metadata={"format": "pt"})
    write_json(
        path / PEFT_CHECKSUMS,
        {"format": CHECKSUM_FORMAT, "checksums": {PEFT_TENSORS: file_sha256(path / PEFT_TENSORS)}},
    )
    write_json(path / PEFT_JSON, config)


def _spec_class(config: dict) -> tuple[type[DeltaSpec], PeftLayout]:
    peft_type = config.get("peft_type")
    for cls in registered_methods().values():
        if cls.peft is not None and cls.peft.peft_type == peft_type:
            return cls, cls.peft
    known = sorted({c.peft.peft_type for c in registered_methods().values() if c.peft})
    raise DeltaFileError(
        f"peft_type {peft_type!r} is not supported; deltatune reads {', '.join(known)}"
    )


def _align(paths: list[str], model: nn.Module) -> dict[str, str]:
    """Map peft module paths onto this model's paths (peft may have wrapped a different root)."""
    names = {n for n, _ in iter_candidates(model)}
    if all(p in names for p in paths):
        return {p: p for p in paths}
    probe = paths[0]
    for candidate in names:  # try adding a prefix: "encoder.layer.0..." → "bert.encoder.layer.0..."
        if candidate.endswith("." + probe):
            pre = candidate[: -len(probe)]
            if all(pre + p in names for p in paths):
                return {p: pre + p for p in paths}
    parts = probe.split(".")
    for cut in range(1, len(parts)):  # or dropping one: "bert.encoder..." → "encoder..."
        pre = ".".join(parts[:cut]) + "."
        if all(p.startswith(pre) and p[len(pre):] in names for p in paths):
            return {p: p[len(pre):] for p in paths}
    missing = next(p for p in paths if p not in names)
    raise DeltaFileError(
        f"the peft adapter targets module {missing!r}, which this model lacks; load it on the base "
        "model it was made for"
    )


def _base_of(model: nn.Module, path: str) -> nn.Module | None:
    for name, module in iter_candidates(model):
        if name == path or name.endswith("." + path):
            return module
    return None


def _under(module: str, key: str) -> bool:
    """Whether tensor ``key`` belongs to module ``module`` (a path, or a name at any depth)."""
    return key.startswith(module + ".") or ("." + module + ".") in "." + key


def _saved_modules(config: dict, keys) -> list[str]:
    """``modules_to_save`` entries that have tensors among ``keys``: peft lists every candidate head
    of its task type (``["classifier", "score"]`` for ``SEQ_CLS``) whether or not the model has
    it."""
    keys = list(keys)
    return [
        m
        for m in dict.fromkeys(config.get("modules_to_save") or [])
        if any(_under(m, k) for k in keys)
    ]


def _from_config(cls: type[DeltaSpec], config: dict, targets: list[str], file: Path) -> DeltaSpec:
    """The layout's spec for ``config``, any failure on a malformed value as one line naming the
    file."""
    try:
        return cls.peft.spec(cls, config, targets)
    except DeltaFileError:
        raise
    except ValueError as exc:  # SpecError: names the option
        raise DeltaFileError(f"{file}: {exc}; fix the config or save the adapter again") from None
    except (KeyError, TypeError, AttributeError) as exc:
        what = (
            f"field {exc.args[0]!r} is missing"
            if isinstance(exc, KeyError)
            else f"a field has the wrong type ({exc})"
        )
        raise DeltaFileError(f"{file}: {what}; fix the config or save the adapter again") from None


def load_peft(
    model: nn.Module, path: Path, name: str, *, activate: bool = True, verify: bool = True
) -> str:
    config = read_json(path / PEFT_JSON)
    validate_peft_config(config, path / PEFT_JSON)
    cls, layout = _spec_class(config)
    if verify:
        verify_file(
            path / PEFT_TENSORS, peft_checksums(path).get(PEFT_TENSORS), path / PEFT_CHECKSUMS
        )
    raw = load_tensors(path / PEFT_TENSORS)
    shared = {k: raw.pop(k) for k in layout.shared_keys if k in raw}
    if name in delta_names(model):
        raise StateError(
            f"a delta named {name!r} is already attached; pass another name= or detach it first"
        )
    if layout.root_tensors:
        return _load_root(model, path, name, cls, config, raw, activate=activate)
    body = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise DeltaFileError(
                f"{path / PEFT_TENSORS}: key {key!r} lacks peft's {PREFIX!r} prefix; not a peft "
                "adapter file"
            )
        body[key[len(PREFIX):]] = value
    # Split keys into host tensors (known suffixes), module copies and plain bias tensors.
    per_host: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in body.items():
        suffix = next((s for s in layout.suffixes if key.endswith("." + s)), None)
        if suffix is not None and suffix != "base_layer.bias":
            per_host.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
        else:
            rest[key] = value
    for key in list(rest):
        if key.endswith(".base_layer.weight"):
            # peft stores whole embedding matrices beside embedding LoRA ("save_embedding_layers"):
            # a copy of the base weight carries no information; a changed one cannot be a delta
            # here.
            module = _base_of(model, key[: -len(".base_layer.weight")])
            if module is None or not torch.equal(
                module.weight.detach().cpu(), rest[key].to(module.weight.dtype)
            ):
                raise DeltaFileError(
                    f"{path / PEFT_TENSORS} carries a modified full weight {key!r} (resized or "
                    "trained embeddings); deltatune only loads deltas onto an unchanged base: "
                    "save the adapter without it"
                )
            del rest[key]
        elif key.endswith(".base_layer.bias"):
            per_host.setdefault(key[: -len(".base_layer.bias")], {})["base_layer.bias"] = rest.pop(
                key
            )
    if not per_host:
        raise DeltaFileError(
            f"{path / PEFT_TENSORS} holds no {config.get('peft_type')} tensors; the file is empty "
            "or for another method"
        )
    saved_modules = _saved_modules(config, rest)
    copy_keys = {k: v for k, v in rest.items() if any(_under(m, k) for m in saved_modules)}
    bias_keys = {
        k[: -len(".bias")]: v for k, v in rest.items() if k not in copy_keys and k.endswith(".bias")
    }
    unknown = sorted(set(rest) - set(copy_keys) - {k + ".bias" for k in bias_keys})
    if unknown:
        raise DeltaFileError(
            f"{path / PEFT_TENSORS}: unexpected tensors {unknown[:3]}; the file is not a "
            f"{config.get('peft_type')} adapter deltatune can read"
        )
    mapping = _align(sorted(per_host) + sorted(bias_keys), model)
    spec = _from_config(
        cls,
        {**config, "modules_to_save": saved_modules},
        [mapping[p] for p in sorted(per_host)],
        path / PEFT_JSON,
    )
    attach_from_file(model, spec, name, path / PEFT_JSON, activate=activate)
    try:
        deltas, copies = parts_of(model, name)
        states: dict[str, torch.Tensor] = {}
        for peft_path, tensors in per_host.items():
            hp = mapping[peft_path]
            host = get_module(model, hp)
            for k, v in layout.load(deltas[hp], host, {**tensors, **shared}).items():
                states[f"{hp}.{k}"] = v
        for peft_path, value in bias_keys.items():
            hp = mapping[peft_path]
            if hp not in deltas:
                raise DeltaFileError(
                    f"{path}: bias of {hp!r} has no place in this model's delta; the adapter is "
                    "for another model"
                )
            for k, v in layout.load(deltas[hp], get_module(model, hp), {"bias": value}).items():
                states[f"{hp}.{k}"] = v
        for cp, module in copies.items():
            for k in module.state_dict():
                hits = [key for key in copy_keys if key.endswith(f"{cp.rsplit('.', 1)[-1]}.{k}")]
                if not hits:
                    raise DeltaFileError(
                        f"{path}: trainable module {cp!r} tensor {k!r} is missing from the file"
                    )
                states[f"{cp}.{k}"] = copy_keys[hits[0]]
        # Hosts the spec created that the file does not fill (e.g. bias="all" on a bias-free
        # module).
        for hp, delta in deltas.items():
            for k, v in delta.state_dict().items():
                states.setdefault(f"{hp}.{k}", v)
        load_module_states(path, {**deltas, **copies}, states)
    except Exception:
        detach(model, name)
        raise
    return name


def _load_root(
    model: nn.Module,
    path: Path,
    name: str,
    cls: type[DeltaSpec],
    config: dict,
    raw: dict,
    *,
    activate: bool,
) -> str:
    """Prompt-learning layout: root tensors go to the spec's single host, ``base_model.<m>.*`` to
    copies."""
    own = {k: v for k, v in raw.items() if not k.startswith(ROOT_PREFIX)}
    kept = {k[len(ROOT_PREFIX):]: v for k, v in raw.items() if k.startswith(ROOT_PREFIX)}
    saved = _saved_modules(config, kept)
    spec = _from_config(cls, {**config, "modules_to_save": saved}, [], path / PEFT_JSON)
    attach_from_file(model, spec, name, path / PEFT_JSON, activate=activate)
    try:
        deltas, copies = parts_of(model, name)
        if len(deltas) != 1:
            raise DeltaFileError(
                f"{path}: a {config.get('peft_type')} adapter needs one host, this model gives "
                f"{sorted(deltas)}"
            )
        (hp, delta), = deltas.items()
        own_state = cls.peft.load(delta, get_module(model, hp), own)
        states = {f"{hp}.{k}": v for k, v in own_state.items()}
        for cp, module in copies.items():
            for k in module.state_dict():
                hits = [
                    key
                    for key in kept
                    if key == f"{cp}.{k}" or key.endswith(f".{cp.rsplit('.', 1)[-1]}.{k}")
                ]
                if not hits:
                    raise DeltaFileError(
                        f"{path}: trainable module {cp!r} tensor {k!r} is missing from the file"
                    )
                states[f"{cp}.{k}"] = kept[hits[0]]
        load_module_states(path, {**deltas, **copies}, states)
    except Exception:
        detach(model, name)
        raise
    return name
