"""`deltatune train | eval | export`: fit a delta on a model + data, evaluate it, ship it merged."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from . import train_settings
from .common import CLIError, output_job, prepare_out, write_results

TASK_FILE = "task.json"  # beside the adapter: which model/labels it was trained for
# beside the adapter (and in the run directory while training) when the base model is a random
# initialisation (small-cnn): the frozen base weights the delta was trained on, which no checkpoint
# holds
BASE_FILE = "base.safetensors"
CHECKPOINT = "checkpoint"  # train/checkpoint.py's directory name (and CHECKPOINT.old during a save)
ADAPTER_FORMATS = ("deltatune", "peft")  # dt.save_adapter's layouts


def _check_answers_fit(collate, data, sample: int = 64) -> None:
    """Refuse, before --out exists, a max length that truncates every answer away (the loss would
    have nothing to learn and the metrics would be NaN)."""
    encode = getattr(collate, "encode", None)
    if encode is None or not len(data):
        return
    before = dict(collate.stats)
    rows = []
    for i in range(min(sample, len(data))):
        out = encode(data[i])  # one Encoded (chat, text) or a (chosen, rejected) pair
        rows += [out] if hasattr(out, "labels") else list(out)
    collate.stats.update(before)  # a look, not a use: the run counts its own batches
    if rows and all(all(x == -100 for x in e.labels) for e in rows):
        raise CLIError(
            f"--max-length {collate.max_length} truncates away the answer of every one of the "
            f"first {min(sample, len(data))} training examples; raise --max-length"
        )


# -- the jobs as plain functions (used by the CLI, the demo and the tests) ------------------------
def resolve_targets(model, method: str, entry_targets) -> Optional[list[str]]:
    """The model entry's usual positions when the method's own defaults match nothing here."""
    from ..core.spec import registered_methods
    from ..core.targets import default_group

    cls = registered_methods().get(method)
    if cls is None or not cls.default_targets:
        # unknown (reported later) or a method that picks its own positions (BitFit, SSF, ...)
        return None
    if default_group(model, cls.default_targets) is not None:
        return None
    return list(entry_targets) or None


@output_job("train")
def run_train(cfg: dict[str, Any], *, console=None) -> dict[str, Any]:
    """Train a delta; ``cfg`` holds model, data, method, method options, train options and out."""
    import deltatune as dt

    from ..data import load_data
    from ..io.files import save_tensors, write_json
    from ..io.outdir import staging_dir, swap_in
    from ..models import load_model
    from ..train import TrainConfig, evaluate, fit
    from ..train.losses import class_weights, objective_of
    from ..train.memory import can_checkpoint, require_checkpointing
    from .spec_options import build_spec
    from .train_lm import (
        LM_BATCH_SIZE,
        LM_EVAL_BATCH_SIZE,
        LM_GRADIENT_CHECKPOINTING,
        lm_collate,
        resolve_objective,
        start_from,
    )

    fmt = cfg.get("format", "deltatune")
    if (
        fmt not in ADAPTER_FORMATS
    ):  # checked before the data loads and the training runs, not when saving
        raise CLIError(
            f"--format {fmt!r} is not an adapter layout; choose one of: "
            f"{', '.join(ADAPTER_FORMATS)}"
        )
    seed = int(cfg.get("seed", 0))
    fractions = _parse_fractions(cfg.get("split_fractions"))
    read = {
        "seed": seed,
        "limit": cfg.get("limit"),
        "fractions": fractions,
        "encoding": cfg.get("encoding"),
    }
    train_data = load_data(cfg["data"], "train", **read)
    val_data = load_data(cfg["data"], "val", **read)
    test_data = load_data(cfg["data"], "test", **read)
    # chat/preference sets name their answers (label_names) for evaluation; they size no head
    lm_data = getattr(train_data, "task", "") in ("chat", "preference", "text")
    labels = [] if lm_data else list(getattr(train_data, "label_names", []) or [])
    import torch

    # --seed fixes the initialisation too (a new head, a random base, the delta's own init): torch's
    # global generator starts from a random seed in every process
    torch.manual_seed(seed)
    length = {"max_length": cfg["max_length"]} if cfg.get("max_length") else {}
    quant = {"quantize": cfg["quantize"], "group_size": cfg.get("group_size"),
             # LoftQ starts from the float weights: kept until the LoRA is attached
             "keep_float": (cfg.get("method_options") or {}).get("init") == "loftq"
             } if cfg.get("quantize") else {}
    entry = load_model(cfg["model"], num_labels=len(labels) or None, **length, **quant)
    train_opts = {k: v for k, v in (cfg.get("train") or {}).items() if v is not None}
    data_task = getattr(train_data, "task", "")
    objective = resolve_objective(entry, data_task, train_opts.get("objective"), cfg["data"])
    if objective == "dpo":  # sft is what "auto" trains (checkpoints of earlier runs say "auto")
        train_opts["objective"] = objective
    # a causal LM: chat/preference batches, batch 8 x 256 tokens by default
    collate = lm_collate(entry, data_task, max_length=cfg.get("max_length"),
                         template_file=cfg.get("chat_template"), packing=bool(cfg.get("packing")))
    if entry.task == "causal-lm":
        train_opts.setdefault("batch_size", LM_BATCH_SIZE)
        train_opts.setdefault("eval_batch_size", LM_EVAL_BATCH_SIZE)
        if can_checkpoint(entry.model):
            train_opts.setdefault("gradient_checkpointing", LM_GRADIENT_CHECKPOINTING)
        _check_answers_fit(collate, train_data)
    options = dict(cfg.get("method_options") or {})
    if cfg.get("from_adapter"):
        spec = None  # the adapter's own, once loaded (below)
    else:
        if "targets" not in options and "target_regex" not in options:
            targets = resolve_targets(entry.model, cfg["method"], entry.default_targets)
            if targets:
                options["targets"] = targets
        spec = build_spec(cfg["method"], options, head=entry.head)
    if entry.from_scratch:
        # a random base never saw data: its BatchNorm statistics must follow the training data (they
        # go into the saved base weights below), or BN-based test-time adaptation starts from a
        # meaningless source model
        train_opts.setdefault("norm_stats", "update")
    tc = TrainConfig(**train_opts, seed=seed)
    # a list of class weights must match the data's classes: checked here, before --out is created
    class_weights(tc.class_weights if isinstance(tc.class_weights, list) else None, [], len(labels))
    if tc.gradient_checkpointing:
        require_checkpointing(entry.model)
    from .train_settings import check as check_settings
    from .train_settings import tracker

    check_settings(tc)  # device, precision, compile: before --out exists
    track = tracker(cfg.get("report_to"), Path(cfg["out"]),
                    config={"model": cfg["model"], "data": cfg["data"], "method": cfg["method"],
                            "train": tc.to_dict()}, run_name="train")
    base_file = Path(cfg["out"]) / BASE_FILE
    if entry.from_scratch and cfg.get("resume", False) and base_file.is_file():
        _load_base(entry, base_file)  # resume on the very base the interrupted run started from
    # a random base has no checkpoint: keep its weights (taken before the delta wraps its modules)
    base_state = (
        {k: v.detach().clone() for k, v in entry.model.state_dict().items()}
        if entry.from_scratch
        else None
    )
    reference = None  # DPO's: the deltas disabled, or the --from-adapter starting point
    if spec is None:
        reference = start_from(entry, cfg["from_adapter"], objective, bool(options))
        spec = dt.get_spec(entry.model, "default")
    else:
        dt.attach(entry.model, spec, name="default")
    if quant:
        from ..quant import drop_float_references

        drop_float_references(entry.model)  # LoftQ used them; the rest of the run never does
    # every name and option is checked before anything is written
    if len(train_data):
        # data the model cannot read (text for an image model, chat for a classifier): before --out
        collate([train_data[0]])
        if hasattr(collate, "stats"):
            collate.stats.update(dict.fromkeys(collate.stats, 0))  # count the run's batches only
    if cfg.get("resume", False):
        _check_resumable(Path(cfg["out"]))
    out = prepare_out(
        Path(cfg["out"]),
        cfg.get("overwrite", False),
        resume=cfg.get("resume", False),
        inputs=[cfg["data"], cfg["model"], cfg.get("from_adapter")],
        keep_on_error=(CHECKPOINT, f"{CHECKPOINT}.old", BASE_FILE),
    )  # what --resume continues from
    if base_state is not None and not base_file.is_file():
        save_tensors(base_file, base_state)
    summary = dt.trainable_summary(entry.model)
    _say(
        console,
        f"[bold]{spec.to_dict().get('method', cfg['method'])}[/] on {entry.name}: "
        f"{summary.trainable:,} trainable of "
        f"{summary.total:,} parameters ({summary.percent:.3f}%)",
    )
    t0 = time.time()
    try:
        result = fit(
            entry.model,
            train_data,
            collate,
            tc,
            eval_data=val_data,
            out_dir=out,
            resume=cfg.get("resume", False),
            task=entry.task,
            spec_callbacks=True,  # AdaLoRA / IncreLoRA schedules
            reference=reference,
            callbacks=[track] if track else [],
        )
        stats = dict(getattr(collate, "stats", None) or {})  # training + validation batches
        test = evaluate(
            entry.model, test_data, collate, task=entry.task, batch_size=tc.eval_batch_size,
            objective=(objective_of(tc, "causal-lm", reference) if entry.task == "causal-lm"
                       else None),
            progress=console is not None,
        )
        if track:
            track.log({f"test/{k}": v for k, v in test.items()}, step=result.steps)
    finally:
        if track:
            track.finish()
    adapter_dir = out / "adapter"
    # built whole under a temporary name, then swapped in: a kill leaves no adapter, the old one or
    # the new one, never delta files without their task.json and base weights
    staged = staging_dir(adapter_dir)
    dt.save_adapter(entry.model, staged, name="default", format=cfg.get("format", "deltatune"))

    # the split the delta was trained on: eval draws the same one by default, so its test split
    # never overlaps the training examples
    task_info = {
        "model": cfg["model"],
        "data": cfg["data"],
        "task": entry.task,
        "label_names": labels,
        "split": {
            "seed": seed,
            "limit": cfg.get("limit"),
            "fractions": list(fractions) if fractions else None,
        },
    }
    if entry.task == "causal-lm":
        task_info.update(objective=objective, chat_template=cfg.get("chat_template"),
                         max_length=getattr(collate, "max_length", None))
    if base_state is not None:
        live = entry.model.state_dict()  # the base's BatchNorm statistics as training left them
        save_tensors(staged / BASE_FILE, {k: live.get(k, v) for k, v in base_state.items()})
        task_info["base_weights"] = BASE_FILE
    write_json(staged / TASK_FILE, task_info)
    swap_in(staged, adapter_dir)
    results = {
        "job": "train",
        "model": cfg["model"],
        "data": cfg["data"],
        "method": spec.to_dict().get("method", cfg["method"]),
        "spec": spec.to_dict(),
        **({"objective": objective, "from_adapter": cfg.get("from_adapter")}
           if entry.task == "causal-lm" else {}),
        "seed": seed,
        **({"split_fractions": list(fractions)} if fractions else {}),
        **({"quantize": cfg["quantize"], "group_size": cfg.get("group_size")}
           if cfg.get("quantize") else {}),
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.percent,
        "train": _as_dict(result),
        **({"collate_stats": stats} if stats else {}),
        "test": test,
        "seconds": time.time() - t0,
        "adapter": str(adapter_dir),
    }
    write_results(out, results)
    return results


def _check_resumable(out: Path) -> None:
    """--resume continues a checkpoint; a finished run without one would be trained again from
    scratch and its adapter replaced, so it is refused."""
    from ..train.checkpoint import find

    if (
        find(out) is None
        and out.is_dir()
        and any((out / name).exists() for name in ("adapter", "results.json"))
    ):
        raise CLIError(
            f"--resume: {out} holds a finished run (adapter/, results.json) and no checkpoint to "
            "continue; pass --overwrite to train it again, or choose another --out"
        )


def _as_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


def read_task(adapter: Path) -> dict[str, Any]:
    """The adapter's task.json (which model, labels and data split it was trained with), or
    ``{}``."""
    task_file = Path(adapter) / TASK_FILE
    return json.loads(task_file.read_text()) if task_file.is_file() else {}


def load_trained(
    model_name: Optional[str],
    adapter: Path,
    *,
    num_labels: Optional[int] = None,
    verify: bool = True,
):
    """A model entry with the adapter at ``adapter`` loaded (labels from its task.json;
    ``num_labels`` sizes the head of an adapter without one, e.g. a peft adapter trained elsewhere;
    ``verify=False`` skips the adapter's sha256 check, for files edited on purpose)."""
    import deltatune as dt

    from ..models import load_model

    task = read_task(adapter)
    model_name = model_name or task.get("model")
    if not model_name:
        raise CLIError(
            f"{adapter} has no {TASK_FILE}; pass --model to say which base model it belongs to "
            "(and --num-labels for a classifier)"
        )
    labels = task.get("label_names") or []
    if num_labels is not None and labels and num_labels != len(labels):
        raise CLIError(
            f"--num-labels {num_labels} contradicts {adapter / TASK_FILE}, which lists "
            f"{len(labels)} labels ({', '.join(labels[:5])}); drop --num-labels"
        )
    entry = load_model(model_name, num_labels=len(labels) or num_labels)
    if entry.from_scratch:
        base_file = Path(adapter) / BASE_FILE
        if not base_file.is_file():
            raise CLIError(
                f"{adapter} was trained on a randomly initialised {model_name} but holds no "
                f"{BASE_FILE} with those base weights (adapters saved before deltatune kept them); "
                "train it again"
            )
        _load_base(entry, base_file)
    dt.load_adapter(entry.model, adapter, verify=verify)
    entry.model.eval()
    return entry, labels


def _load_base(entry, path: Path) -> None:
    from ..io.files import load_tensors

    state = load_tensors(path)
    try:
        entry.model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CLIError(
            f"{path} holds the weights of another model than {entry.name}; load the adapter on the "
            "model it was trained for"
        ) from None


def run_eval(
    model_name: Optional[str],
    adapter: Optional[Path],
    data: str,
    split: str = "test",
    seed: Optional[int] = None,
    limit=None,
    split_fractions: Any = None,
    *,
    num_labels: Optional[int] = None,
    encoding: Optional[str] = None,
    verify: bool = True,
    max_new_tokens: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the adapter (``None``: the untuned ``model_name``) on ``split`` of ``data``. On the
    data it was trained on, the split is drawn with the seed, limit and fractions recorded in its
    task.json unless given here. Chat and preference data are scored by what the model says
    (:func:`deltatune.cli.generate.evaluate_chat`); the results then hold ``predictions``."""
    from ..data import load_data
    from ..train import evaluate

    fractions = _parse_fractions(split_fractions)
    task = read_task(adapter) if adapter is not None else {}
    seed, limit, fractions = _training_split(task, data, seed, limit, fractions)
    if adapter is None:
        if not model_name:
            raise CLIError("pass --adapter DIR, or --model NAME to evaluate the untuned model")
        from ..models import load_model

        entry, labels = load_model(model_name, num_labels=num_labels), []
        entry.model.eval()
    else:
        entry, labels = load_trained(model_name, adapter, num_labels=num_labels, verify=verify)
    dataset = load_data(data, split, seed=seed, limit=limit, fractions=fractions, encoding=encoding)
    if dataset.task in ("chat", "preference"):
        from .generate import evaluate_chat

        metrics, predictions = evaluate_chat(entry, dataset, max_new_tokens=max_new_tokens,
                                             progress=progress,
                                             template=task.get("chat_template"))
        return {"job": "eval", "model": model_name or task.get("model"),
                "adapter": None if adapter is None else str(adapter), "data": data,
                "split": split, "seed": seed, "limit": limit,
                "split_fractions": list(fractions) if fractions else None, **metrics,
                "predictions": predictions}
    names = list(getattr(dataset, "label_names", []) or [])
    if labels and names and names != labels:
        unseen = [n for n in names if n not in labels]
        if unseen:
            raise CLIError(
                f"labels {unseen} of {data!r} were not seen in training (trained on {labels}); "
                "evaluate on data with the training labels"
            )
        dataset = _remap(dataset, names, labels)
    metrics = evaluate(entry.model, dataset, entry.collate, task=entry.task)
    return {
        "job": "eval",
        "model": model_name,
        "adapter": None if adapter is None else str(adapter),
        "data": data,
        "split": split,
        "seed": seed,
        "limit": limit,
        "split_fractions": list(fractions) if fractions else None,
        **metrics,
    }


def _training_split(
    task: dict[str, Any],
    data: str,
    seed: Optional[int],
    limit: Optional[int],
    fractions: Optional[list[float]],
) -> tuple[int, Optional[int], Optional[list[float]]]:
    """Seed, limit and fractions for evaluating on ``data``: those of the training run (task.json)
    when it is the training data and they were not given; a warning when a given seed or fractions
    differ (the evaluation split may then overlap the examples the delta was trained on)."""
    from ..data import check_fractions

    recorded = task.get("split") if task.get("data") == data else None
    if not isinstance(recorded, dict):
        return (0 if seed is None else seed), limit, fractions
    same = {
        "--seed": seed == recorded.get("seed", 0),
        "--split-fractions": fractions is None
        or check_fractions(fractions) == check_fractions(recorded.get("fractions")),
    }
    for flag, given, trained in (
        ("--seed", seed, recorded.get("seed", 0)),
        ("--split-fractions", fractions, recorded.get("fractions") or "default"),
    ):
        if given is not None and not same[flag]:
            print(
                f"warning: {flag} {given} differs from the training run's {trained}: the "
                "evaluation split may overlap the examples the delta was trained on",
                file=sys.stderr,
            )
    return (recorded.get("seed", 0) if seed is None else seed,
            recorded.get("limit") if limit is None else limit,
            recorded.get("fractions") if fractions is None else fractions)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory without ``overwrite``; creates
    nothing."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(
            f"--out {out} exists and is not empty; pass --overwrite to replace it or choose "
            "another directory"
        )


def _new_eval_dir(adapter: Path, data: str, split: str) -> Path:
    """``ADAPTER/../eval-DATA-SPLIT`` (``-2``, ``-3``, ... when taken): each evaluation keeps its
    own directory, so evaluating on another data set never replaces an earlier result."""
    name = (
        Path(data).stem if Path(data).exists() else data
    )  # a file path: its name, not its folders
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "data"
    base = adapter.resolve().parent / f"eval-{name}-{split}"
    out, n = base, 1
    while out.exists() and (not out.is_dir() or any(out.iterdir())):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


@output_job("eval")
def _save_eval(
    out: Optional[Path],
    overwrite: bool,
    results: dict[str, Any],
    adapter: Optional[Path],
    data: str,
    split: str,
) -> Path:
    """Write eval's results.json (and predictions.jsonl, for chat data) into ``out``, or into a new
    directory beside the adapter (``runs/`` for an untuned model)."""
    near = adapter if adapter is not None else Path("runs") / "untuned"
    out = prepare_out(out if out is not None else _new_eval_dir(near, data, split), overwrite,
                      inputs=[adapter, data])
    predictions = results.pop("predictions", None)
    if predictions is not None:
        from .generate import write_predictions

        write_predictions(out, predictions)
    write_results(out, results)
    return out


def _remap(dataset, names: list[str], labels: list[str]):
    """Relabel a dataset whose label order differs from the training order (same label set)."""
    order = [labels.index(n) for n in names]
    for ex in dataset.examples:  # a freshly loaded dataset: relabelling in place is safe
        if "label" in ex:
            ex["label"] = order[ex["label"]]
    dataset.label_names = labels
    return dataset


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


# -- CLI ------------------------------------------------------------------------------------------
def _load_yaml(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise CLIError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CLIError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a mapping of options")
    return data


def _parse_fractions(value: Any) -> list[float] | None:
    """``"0.7,0.1,0.2"`` (flag) or ``[0.7, 0.1, 0.2]`` (YAML) → three floats; ``None`` stays
    ``None``."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        return [float(x) for x in parts]
    except (TypeError, ValueError):
        raise CLIError(
            "--split-fractions takes three comma-separated numbers (train,val,test), e.g. "
            f"0.7,0.1,0.2; got {value!r}"
        ) from None


def _parse_class_weights(value: Optional[str]) -> str | list[float] | None:
    if value is None or value == "balanced":
        return value
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise CLIError(
            f"--class-weights {value!r}: give 'balanced' or comma-separated numbers, e.g. 1,2,1"
        ) from None


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        epilog=(
            "Examples:\n\n"
            "  deltatune train --model minilm --data bbc-news --method lora --rank 8 --epochs 3 "
            "--out runs/bbc\n\n"
            "  deltatune train --model minilm --data tweet-sentiment:apple --method lora "
            "--max-steps 200 --save-every 50 --out runs/apple\n\n"
            "  deltatune train --model minilm --data tweet-sentiment:cars --class-weights balanced "
            "--out runs/cars\n\n"
            "  deltatune train --config run.yaml --resume\n\n"
            "  deltatune train --model efficientnet-lite0 --data mnist --method lora --targets "
            "conv_stem --out runs/mnist\n\n"
            "  deltatune train --model smollm2 --data bbc-news-chat --max-steps 100 --packing "
            "--out runs/sft\n\n"
            "  deltatune train --model smollm2 --data tweet-sentiment-chat --quantize gguf "
            "--max-steps 100 --out runs/qlora   (base kept in its Q4_1 blocks)\n\n"
            "  deltatune train --model smollm2 --data tweet-sentiment-chat --quantize nf4 "
            "--opt init=loftq --rank 16 --out runs/loftq\n\n"
            "  deltatune train --model smollm2 --data bbc-news-pref --from-adapter "
            "runs/sft/adapter --beta 0.1 --max-steps 100 --out runs/dpo\n\n"
            "  deltatune train --model minilm --data tweet-sentiment --precision bf16 "
            "--report-to tensorboard,csv --out runs/bf16   (logs in runs/bf16/tracking/)"
        ),
    )
    def train(
        model: Optional[str] = typer.Option(
            None,
            help="model name (minilm, smollm2, efficientnet-lite0, small-cnn) or a transformers "
            "directory",
        ),
        data: Optional[str] = typer.Option(
            None,
            help="dataset name (bbc-news, tweet-sentiment[:domain], mnist, ...) or a "
            "CSV/JSONL/folder path",
        ),
        method: Optional[str] = typer.Option(
            None, help="delta method (lora, ia3, bottleneck, ...)"
        ),
        rank: Optional[int] = typer.Option(None, "--rank", "-r", help="rank (LoRA family)"),
        alpha: Optional[float] = typer.Option(None, help="LoRA alpha (scaling = alpha / rank)"),
        dropout: Optional[float] = typer.Option(None, help="dropout on the delta's input"),
        targets: Optional[str] = typer.Option(
            None, help="comma-separated module names/suffixes (default: the model's usual ones)"
        ),
        opt: list[str] = typer.Option(
            [],
            "--opt",
            help="any other method option as KEY=VALUE (repeatable), e.g. --opt dora=true",
        ),
        epochs: Optional[int] = typer.Option(None, help="training epochs (default 3)"),
        max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
        batch_size: Optional[int] = typer.Option(
            None, help="training batch size (default 16; 8 for causal LMs)"
        ),
        lr: Optional[float] = typer.Option(None, help="learning rate (default 5e-4)"),
        grad_accum: Optional[int] = typer.Option(None, help="gradient accumulation steps"),
        schedule: Optional[str] = typer.Option(None, help="linear | cosine | constant"),
        seed: Optional[int] = typer.Option(None, help="random seed (data split, init, order)"),
        save_every: Optional[int] = typer.Option(
            None, help="write a resumable checkpoint every N steps"
        ),
        class_weights: Optional[str] = typer.Option(
            None,
            help="loss weight per class: 'balanced' (N / (C * n_c), for "
            "skewed labels) or comma-separated weights, one per class",
        ),
        objective: Optional[str] = typer.Option(
            None,
            help="causal LMs: sft (chat/text data) | dpo (preference data); default: dpo on "
            "preference data, sft otherwise",
        ),
        beta: Optional[float] = typer.Option(None, help="DPO's beta (default 0.1)"),
        dpo_loss: Optional[str] = typer.Option(
            None, help="DPO loss: sigmoid (default) | ipo | hinge"
        ),
        rpo_alpha: Optional[float] = typer.Option(
            None,
            help="DPO: weight of the chosen answers' NLL added to the loss (RPO; 0 = plain DPO; "
            "default 0)",
        ),
        from_adapter: Optional[Path] = typer.Option(
            None,
            help="start from this adapter (it is the delta that trains; e.g. DPO after SFT, "
            "whose reference is then this adapter)",
        ),
        chat_template: Optional[Path] = typer.Option(
            None, help="Jinja chat template file (default: the model's own)"
        ),
        packing: Optional[bool] = typer.Option(
            None,
            "--packing/--no-packing",
            help="causal LMs on chat/text data: pack several examples into each row of "
            "--max-length tokens (default: off)",
        ),
        max_length: Optional[int] = typer.Option(
            None,
            help="tokens per example (per row when packing), longer ones truncated (default "
            "256 for causal LMs, the model's own otherwise)",
        ),
        gradient_checkpointing: Optional[bool] = typer.Option(
            None,
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="recompute each transformer block's activations in backward instead of keeping "
            "them: less memory, slower steps, the same gradients (transformers and timm models; "
            "default: on for causal LMs, as trl's, off otherwise)",
            # its own panel: this long flag pair in the main table would narrow every option's help
            rich_help_panel="Memory",
        ),
        quantize: Optional[str] = typer.Option(
            None,
            help="keep the frozen Linear weights quantized: int8 (torchao), int4, nf4, q8_0, "
            "q4_0, q4_1, or gguf (smollm2: the file's own Q4_1 blocks, no float copy); "
            "see docs/quantization.md",
            rich_help_panel="Memory",
        ),
        group_size: Optional[int] = typer.Option(
            None, help="inputs per quantization group (int4/nf4: 64; int8: per row)",
            rich_help_panel="Memory",
        ),
        precision: Optional[str] = train_settings.precision_option(),
        compile_: Optional[bool] = train_settings.compile_option(),
        device: Optional[str] = train_settings.device_option(),
        report_to: Optional[str] = train_settings.report_to_option(),
        resume: bool = typer.Option(False, help="continue from --out's checkpoint"),
        limit: Optional[int] = typer.Option(
            None, help="use at most N examples per split (quick runs)"
        ),
        split_fractions: Optional[str] = typer.Option(
            None,
            help="train,val,test fractions of the data split "
            "deltatune draws (default 0.8,0.1,0.1), e.g. 0.7,0.1,0.2",
        ),
        encoding: Optional[str] = typer.Option(
            None,
            help="text encoding of a CSV/JSONL --data file (default "
            "utf-8, read strictly), e.g. latin-1",
        ),
        fmt: str = typer.Option(
            "deltatune", "--format", help="adapter file layout: deltatune | peft"
        ),
        config: Optional[Path] = typer.Option(
            None, help="YAML file with these options; flags override it"
        ),
        out: Optional[Path] = typer.Option(
            None, help="output directory (adapter/, metrics.json, results.json)"
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    ) -> None:
        """Train a delta on a frozen model; save the adapter, metrics, curve and results.json."""
        from rich.console import Console

        cfg = _load_yaml(config)
        from .spec_options import parse_options

        method_options = {**(cfg.pop("method_options", {}) or {}), **parse_options(opt)}
        for key, value in {
            "r": rank,
            "alpha": alpha,
            "dropout": dropout,
            "targets": targets,
        }.items():
            if value is not None:
                method_options[key] = value
        train_opts = dict(cfg.pop("train", {}) or {})
        for key, value in {
            "epochs": epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "lr": lr,
            "grad_accum": grad_accum,
            "schedule": schedule,
            "save_every": save_every,
            "class_weights": _parse_class_weights(class_weights),
            "objective": objective,
            "dpo_beta": beta,
            "dpo_loss": dpo_loss,
            "rpo_alpha": rpo_alpha,
            "gradient_checkpointing": gradient_checkpointing,
            "precision": precision,
            "compile": compile_,
            "device": device,
        }.items():
            if value is not None:
                train_opts[key] = value
        for key, value in {
            "model": model,
            "data": data,
            "method": method,
            "seed": seed,
            "out": out,
            "limit": limit,
            "split_fractions": split_fractions,
            "encoding": encoding,
            "from_adapter": None if from_adapter is None else str(from_adapter),
            "chat_template": None if chat_template is None else str(chat_template),
            "packing": packing,
            "max_length": max_length,
            "report_to": report_to,
            "quantize": quantize,
            "group_size": group_size,
        }.items():
            if value is not None:
                cfg[key] = value
        cfg.setdefault("method", "lora")
        for required in ("model", "data", "out"):
            if not cfg.get(required):
                raise CLIError(f"--{required} is required (or set `{required}:` in --config)")
        cfg.update(
            method_options=method_options,
            train=train_opts,
            resume=resume,
            overwrite=overwrite,
            format=fmt,
        )
        console = Console()
        results = run_train(cfg, console=console)
        test = results["test"]
        shown = ", ".join(f"{k}={v:.4f}" for k, v in test.items() if isinstance(v, float))
        console.print(f"[green]done[/]: test {shown}; adapter in {results['adapter']}")

    @app.command(
        "eval",
        epilog="Examples:\n\n"
        "  deltatune eval --adapter runs/bbc/adapter --data bbc-news\n\n"
        "  deltatune eval --model minilm --adapter runs/apple/adapter --data tweet-sentiment:cars "
        "--split test\n\n"
        "  deltatune eval --adapter runs/sft/adapter --data tweet-sentiment-chat --split test   "
        "(chat data: exact match of the generated answers, completion loss; writes "
        "predictions.jsonl)\n\n"
        "  deltatune eval --model smollm2 --data bbc-news-pref   (the untuned model; preference "
        "data: reward accuracy)",
    )
    def eval_(
        adapter: Optional[Path] = typer.Option(
            None, help="adapter directory written by `deltatune train` (or any delta dir); "
            "without it, --model is evaluated untuned"
        ),
        data: str = typer.Option(..., help="dataset name or path"),
        model: Optional[str] = typer.Option(
            None, help="base model (default: the one recorded beside the adapter)"
        ),
        split: str = typer.Option("test", help="train | val | test"),
        seed: Optional[int] = typer.Option(
            None,
            help="seed of the data split (default: the training run's, "
            "recorded in the adapter's task.json, else 0)",
        ),
        limit: Optional[int] = typer.Option(
            None, help="use at most N examples (default: the training run's)"
        ),
        split_fractions: Optional[str] = typer.Option(
            None, help="train,val,test fractions (default: the training run's, else 0.8,0.1,0.1)"
        ),
        num_labels: Optional[int] = typer.Option(
            None,
            help="classes of the adapter's head, for an adapter without "
            "task.json (e.g. a peft adapter; with --model)",
        ),
        encoding: Optional[str] = typer.Option(
            None,
            help="text encoding of a CSV/JSONL --data file (default "
            "utf-8, read strictly), e.g. latin-1",
        ),
        out: Optional[Path] = typer.Option(
            None,
            help="where to write results.json (default: a new "
            "ADAPTER/../eval-DATA-SPLIT directory)",
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
        max_new_tokens: int = typer.Option(
            64, help="chat data: at most this many tokens per generated answer"
        ),
    ) -> None:
        """Evaluate a trained delta: accuracy and loss (perplexity for language models); on chat
        data the exact match of generated answers and the completion loss, on preference data the
        reward accuracy."""
        if adapter is None and model is None:
            raise CLIError("pass --adapter DIR, or --model NAME to evaluate the untuned model")
        if max_new_tokens < 1:
            raise CLIError(f"--max-new-tokens must be positive, got {max_new_tokens}")
        if out is not None:  # checked before the evaluation, which can take long
            _check_out(out, overwrite)
        results = run_eval(
            model,
            adapter,
            data,
            split,
            seed,
            limit,
            split_fractions,
            num_labels=num_labels,
            encoding=encoding,
            verify=not no_verify,
            max_new_tokens=max_new_tokens,
            progress=sys.stderr.isatty(),
        )
        out = _save_eval(out, overwrite, results, adapter, data, split)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float))
        print(f"{data} [{split}]: {shown}  (results: {out / 'results.json'})")

    @app.command(
        "export",
        epilog="Examples:\n\n  deltatune export --adapter runs/bbc/adapter --out runs/bbc/merged"
        "\n\n  deltatune export --adapter runs/chat/adapter --format gguf --quant q4_0 "
        "--out runs/chat/gguf\n\n  deltatune export --adapter runs/chat/adapter --format gguf-lora "
        "--out runs/chat/lora-gguf",
    )
    def export(
        adapter: Path = typer.Option(..., help="adapter directory"),
        out: Path = typer.Option(..., help="directory for the merged model or the GGUF file"),
        fmt: str = typer.Option(
            "safetensors", "--format",
            help="safetensors (merged, transformers layout), gguf (merged causal LM as one GGUF "
            "file for llama.cpp) or gguf-lora (the LoRA itself as a llama.cpp adapter GGUF)",
        ),
        quant: Optional[str] = typer.Option(
            None, help="--format gguf: f16, q8_0 (default) or q4_0 weight blocks"
        ),
        model: Optional[str] = typer.Option(
            None, help="base model (default: the one recorded beside the adapter)"
        ),
        overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapter's sha256 check (files edited on purpose)"
        ),
    ) -> None:
        """Merge a delta into its base model and save the full model as safetensors, or as one
        GGUF file (--format gguf); or write a LoRA as a llama.cpp adapter GGUF (--format
        gguf-lora)."""
        results = run_export(model, adapter, out, overwrite, verify=not no_verify, fmt=fmt,
                             quant=quant)
        if fmt != "safetensors":
            print(f"{fmt} written to {out / results['file']} ({results['bytes'] / 2**20:.1f} MiB)")
            return
        print(
            f"merged model written to {out} ({results['num_tensors']} tensors, "
            f"{results['bytes'] / 2**20:.1f} MiB)"
        )


def _save_transformers(entry, out: Path, labels: list[str]) -> Optional[dict[str, Any]]:
    """Save a merged transformers model so that ``transformers`` loads ``out`` by itself:
    config.json, model.safetensors (save_pretrained) and the tokenizer. A sequence classifier or
    causal LM is the whole model (``AutoModelForSequenceClassification`` /
    ``AutoModelForCausalLM``); MiniLM's encoder loads with ``AutoModel``, and its mean-pooling head
    is in ``classifier.safetensors`` (logits = classifier(masked mean of last_hidden_state)).
    ``None`` for a model that is not built on transformers."""
    from ..io.files import save_tensors
    from ..models.text import LogitsOnly, MeanPoolClassifier

    model = entry.model
    if isinstance(model, MeanPoolClassifier):
        inner, layout = (
            model.encoder,
            {"transformers": "AutoModel", "head": "classifier.safetensors", "pooling": "mean"},
        )
    elif isinstance(model, LogitsOnly):
        inner = getattr(model, model._attr)
        layout = {"transformers": "AutoModelForCausalLM" if entry.task == "causal-lm"
                  else "AutoModelForSequenceClassification"}
    else:
        return None
    if labels and entry.task == "text-classification" and isinstance(model, LogitsOnly):
        inner.config.id2label = dict(enumerate(labels))  # pipelines and users see the class names
        inner.config.label2id = {name: i for i, name in enumerate(labels)}
    config = inner.config
    quant = getattr(config, "quantization_config", None)
    try:
        if (
            quant is not None
        ):  # a GGUF-loaded model is plain float32 by now; save_pretrained refuses the marker
            del config.quantization_config
        inner.save_pretrained(str(out), safe_serialization=True)
    finally:
        if quant is not None:
            config.quantization_config = quant
    tokenizer = getattr(entry.collate, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if isinstance(model, MeanPoolClassifier):
        save_tensors(out / "classifier.safetensors", model.classifier.state_dict())
    return layout


@output_job("export")
def run_export(model_name: Optional[str], adapter: Path, out: Path, overwrite: bool = False, *,
               verify: bool = True, fmt: str = "safetensors",
               quant: Optional[str] = None) -> dict[str, Any]:
    import deltatune as dt

    from ..io.files import save_tensors, write_json
    from ..io.outdir import publish, stage

    if fmt != "safetensors":
        return _export_gguf(model_name, adapter, Path(out), overwrite, verify, fmt, quant)
    if quant is not None:
        raise CLIError("--quant applies to --format gguf; drop it or add --format gguf")
    entry, labels = load_trained(model_name, adapter, verify=verify)
    final = Path(out)
    # written whole into a staging directory beside --out and published with one rename: a kill or a
    # full disk leaves no half export (model.safetensors without its config files)
    out = stage(final, overwrite=overwrite, inputs=[adapter, model_name])
    dt.merge(entry.model, unload=True)
    state = {k: v for k, v in entry.model.state_dict().items()}
    info = {
        "model": model_name or entry.name,
        "adapter": str(adapter),
        "label_names": labels,
        "task": entry.task,
    }
    layout = _save_transformers(entry, out, labels)
    if (
        layout is None
    ):  # not a transformers model (small-cnn, efficientnet): the state dict as it is
        save_tensors(
            out / "model.safetensors", state, metadata={"format": "pt", "source": entry.source}
        )
    else:
        info.update(layout)
    write_json(out / "deltatune_export.json", info)
    results = {"job": "export", "adapter": str(adapter), "num_tensors": len(state),
               "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")), **(layout or {})}
    write_results(out, results)
    publish(out, final, job="export", overwrite=overwrite)
    return results


def _export_gguf(model_name: Optional[str], adapter: Path, final: Path, overwrite: bool,
                 verify: bool, fmt: str, quant: Optional[str]) -> dict[str, Any]:
    """``export --format gguf | gguf-lora`` (inside run_export's output job): every option and
    the model are checked before anything is written, and the file is built in a staging directory
    published whole."""
    import deltatune as dt

    from ..io import gguf_export as gx
    from ..io.files import write_json
    from ..io.outdir import publish, stage

    if fmt not in ("gguf", "gguf-lora"):
        raise CLIError(f"unknown --format {fmt!r}; use safetensors, gguf or gguf-lora")
    if fmt == "gguf-lora" and quant is not None:
        raise CLIError("--quant applies to --format gguf; a gguf-lora file keeps f32 factors")
    quant = gx.check_quant(quant or "q8_0") if fmt == "gguf" else None
    entry, _ = load_trained(model_name, adapter, verify=verify)
    name = model_name or read_task(adapter).get("model") or entry.name
    if entry.task != "causal-lm":
        raise CLIError(
            f"--format {fmt} writes causal language models; {adapter} is a {entry.task} adapter "
            f"for {name}: export it with --format safetensors"
        )
    gx.check_architecture(entry.model)
    if fmt == "gguf":
        if name == "smollm2":
            from ..models.gguf import smollm2_gguf

            tokenizer = smollm2_gguf()  # tokenizer and descriptive keys as in the bundled file
        else:
            tokenizer = Path(name)  # a transformers directory: its tokenizer.json
    out = stage(final, overwrite=overwrite, inputs=[adapter, model_name])
    if fmt == "gguf":
        dt.merge(entry.model, unload=True)
        info = gx.write_gguf(entry.model, out / gx.MODEL_FILE.format(quant=quant), quant=quant,
                             tokenizer=tokenizer)
    else:
        info = gx.write_gguf_lora(entry.model, out / gx.LORA_FILE)
    write_json(out / "deltatune_export.json",
               {"model": name, "adapter": str(adapter), "task": entry.task, "format": fmt,
                **info.summary()})
    results = {"job": "export", "adapter": str(adapter), "format": fmt, **info.summary()}
    write_results(out, results)
    publish(out, final, job="export", overwrite=overwrite)
    return results
