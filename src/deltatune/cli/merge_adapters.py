"""``deltatune merge CONFIG --out DIR`` when the config lists adapters (``- adapter: DIR``) instead
of checkpoints: the adapters, all of one base model, merge into one new adapter written to
``--out``, which ``deltatune eval/generate/export --adapter DIR`` then use as any trained adapter.

```yaml
merge_method: task_arithmetic      # exact for LoRAs: the factors stacked (rank = the sum of ranks)
models:
  - adapter: runs/tweets/adapter
    parameters: {weight: 0.5}
  - adapter: runs/news/adapter
    parameters: {weight: 1.0}
# parameters: {rank: 16, density: 0.5}   # ties / dare_* / breadcrumbs* / della*: the weight changes
#                                        # are merged densely and stored as a LoRA of this rank
```

Everything is checked before the base model is loaded and before anything is written (methods,
parameters, paths, one base model for all the adapters); the output is built in a staging
directory and published with one rename, so a failure leaves nothing behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ..algebra.config import yaml_number
from ..algebra.registry import FINITE
from ..io.outdir import output_job
from .common import CLIError, write_results

#: merge_method -> what :func:`deltatune.algebra.merge_adapters` runs. Task arithmetic on LoRAs is
#: exact as stacked factors; the sparsifying methods merge the dense weight changes (base = 0, every
#: model's tensor is its delta) and store the result as a LoRA of ``rank``.
METHODS = {
    "task_arithmetic": "lora_concat",
    **{m: m for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                      "della", "della_linear")},
}
_MODEL_KEYS = {"adapter", "parameters"}
_TOP_KEYS = {"merge_method", "models", "parameters", "base_model", "random_seed"}


def is_adapter_config(raw: Any) -> bool:
    """Whether a loaded merge YAML lists adapters (any ``- adapter: ...`` entry)."""
    models = raw.get("models") if isinstance(raw, dict) else None
    return isinstance(models, list) and any(isinstance(m, dict) and "adapter" in m for m in models)


def _path(ref: Any, root: Path, source: str) -> Path:
    if not isinstance(ref, str) or not ref:
        raise CLIError(f"{source}: 'adapter' must be a directory path, got {ref!r}")
    for candidate in (Path(ref), root / ref):
        if candidate.is_dir():
            return candidate
    raise CLIError(f"{source}: adapter directory {ref!r} not found (paths are taken from the "
                   "current directory, then from the config's)")


def _number(value: Any, what: str, source: str) -> float:
    number = yaml_number(value)  # read as checkpoint merge configs read their numbers
    if number is None or number not in FINITE:
        raise CLIError(f"{source}: {what} must be a finite number, got {value!r}")
    return number


def plan(config: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The checked merge: method, adapter paths, weights, other parameters and the base model."""
    from .train import read_task

    source = str(config)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise CLIError(f"{source}: unknown key {unknown[0]!r} in an adapter merge; it takes "
                       f"{', '.join(sorted(_TOP_KEYS))}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise CLIError(f"{source}: merge_method {method!r} does not merge adapters; use one of "
                       f"{', '.join(METHODS)}")
    models = raw["models"]
    if not all(isinstance(m, dict) and "adapter" in m for m in models):
        raise CLIError(f"{source}: 'models' mixes adapters and checkpoints; merge either adapters "
                       "(- adapter: DIR) or checkpoints (- model: DIR), not both")
    root = Path(config).resolve().parent
    paths, weights, per_model = [], [], []
    for i, m in enumerate(models):
        where = f"{source}: models[{i}]"
        extra = sorted(set(m) - _MODEL_KEYS)
        if extra:
            raise CLIError(f"{where}: unknown key {extra[0]!r}; an adapter entry takes adapter "
                           "and parameters")
        paths.append(_path(m["adapter"], root, where))
        if not isinstance(m.get("parameters") or {}, dict):
            raise CLIError(f"{where}: 'parameters' must be a mapping such as {{weight: 0.5}}")
        params = dict(m.get("parameters") or {})
        weights.append(_number(params.pop("weight", 1.0), "weight", where))
        per_model.append(params)
    shared = dict(raw.get("parameters") or {})
    rank = shared.pop("rank", None)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CLIError(f"{source}: parameters.rank must be a whole number >= 1, got {rank!r}")
    if method == "task_arithmetic" and (rank is not None or shared or any(per_model)):
        given = "rank" if rank is not None else sorted({*shared, *(k for p in per_model
                                                                       for k in p)})[0]
        raise CLIError(f"{source}: task_arithmetic on adapters is exact and takes only a weight "
                       f"per adapter; drop {given!r}")
    for key in sorted({k for p in per_model for k in p}):
        shared[key] = [_number(p.get(key, shared.get(key)), key, f"{source}: {key}")
                       for p in per_model]
    tasks = [read_task(p) for p in paths]
    named = {t.get("model") for t in tasks if t.get("model")}
    base = raw.get("base_model")
    if base is not None and named and named != {str(base)}:
        raise CLIError(f"{source}: base_model {base!r} is not the model the adapters were trained "
                       f"on ({', '.join(sorted(named))}); drop base_model or fix it")
    if len(named) > 1:
        raise CLIError(f"{source}: the adapters belong to different base models "
                       f"({', '.join(sorted(named))}); merge adapters of one base model only")
    model = base or next(iter(named), None)
    if not model:
        raise CLIError(f"{source}: the adapters hold no task.json naming their base model; add "
                       "base_model: NAME_OR_DIR to the config")
    if any(t.get("label_names") for t in tasks):
        raise CLIError(f"{source}: classifier adapters carry one head per task, which a merged "
                       "adapter cannot hold; merge them in Python (deltatune.algebra."
                       "merge_adapters) and keep each task's head")
    # what task.json says of the merged adapter: the settings every input agrees on (the split seed
    # that evaluation reuses, the template, the length), never one input's data file
    task = {k: tasks[0][k] for k in ("task", "split", "chat_template", "max_length")
            if k in tasks[0] and all(t.get(k) == tasks[0][k] for t in tasks)}
    return {"method": method, "paths": paths, "weights": weights, "params": shared,
            "rank": rank, "model": str(model), "task": task, "seed": raw.get("random_seed")}


@output_job("merge")
def run_adapter_merge(config: Path, raw: dict[str, Any], out: Path, *, overwrite: bool = False,
                      seed: Optional[int] = None) -> dict[str, Any]:
    """Merge the adapters a merge config lists into one adapter at ``out`` (see the module)."""
    import torch

    import deltatune as dt

    from ..algebra import merge_adapters
    from ..algebra.errors import MergeError
    from ..io.files import write_json
    from ..io.outdir import publish, stage
    from ..models import load_model
    from .train import TASK_FILE

    tick = time.perf_counter()
    job = plan(config, raw)
    final = Path(out)
    tmp = stage(final, overwrite=overwrite, inputs=[config, *job["paths"]])
    entry = load_model(job["model"])
    names = [f"merge-input-{i}" for i in range(len(job["paths"]))]
    for name, path in zip(names, job["paths"]):
        dt.load_adapter(entry.model, path, name=name, activate=False)
    rank = job["rank"]
    if job["method"] != "task_arithmetic" and rank is None:  # what stacking the factors would hold
        rank = sum(int(getattr(dt.get_spec(entry.model, n), "r", 0) or 0) for n in names) or None
        if rank is None:
            raise CLIError(f"{config}: {job['method']} stores its result as a LoRA; give "
                           "parameters.rank (the inputs are not LoRAs)")
    seed = seed if seed is not None else job["seed"]
    if seed is not None:
        torch.manual_seed(int(seed))
    try:
        merge_adapters(entry.model, names, METHODS[job["method"]], weights=job["weights"],
                       rank=None if job["method"] == "task_arithmetic" else rank,
                       name="merged", activate=False, **job["params"])
    except MergeError as exc:
        raise CLIError(f"{config}: {exc}") from None
    for name in names:
        dt.detach(entry.model, name)
    dt.save_adapter(entry.model, tmp, name="merged")
    task = {"model": job["model"], **job["task"], "label_names": [], "objective": "merge",
            "merged_from": [str(p) for p in job["paths"]], "merge_method": job["method"],
            "weights": job["weights"]}
    write_json(tmp / TASK_FILE, task)
    spec = dt.get_spec(entry.model, "merged")
    summary = {"job": "merge", "kind": "adapters", "config": str(config), "out": str(final),
               "method": job["method"], "adapters": [str(p) for p in job["paths"]],
               "weights": job["weights"], "params": job["params"], "model": job["model"],
               "rank": getattr(spec, "r", None), "seed": seed,
               "bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()),
               "seconds": time.perf_counter() - tick}
    write_results(tmp, summary)
    publish(tmp, final, job="merge", overwrite=overwrite)
    return summary
