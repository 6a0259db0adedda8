"""Quantized frozen bases (issue 21) on SmolLM2-135M-Instruct: float32, int8, int4, GGUF blocks.

    .venv/bin/python bench/bench_quant.py                 # every part; the table into RESULTS.md
    .venv/bin/python bench/bench_quant.py --only train    # some parts (load train loftq merge)
    .venv/bin/python bench/bench_quant.py --cached-only   # re-render from the cache

Each configuration runs in its own processes under ``nice -n 5`` (peak RSS = that process's
``ru_maxrss``, through bench_llm's measuring wrapper):

* ``load``: ``load_model("smollm2", quantize=Q)`` alone: the loading peak;
* ``train``: ``deltatune train --model smollm2 --quantize Q`` (SFT, LoRA r=8 alpha 16 on
  q_proj/v_proj, the same STEPS x BATCH, lr, seed and training examples for every Q; gradient
  checkpointing on, the causal-LM default): the training process's peak RSS and its training
  throughput (step time = batch / examples per second), then exact match of the adapter *on its
  own quantized base* on EVAL test prompts of tweet-sentiment-chat (greedy, 8 new tokens);
* ``loftq``: LoftQ (``--opt init=loftq``) against the default init on int4: the relative error of
  the q/v layers' weights (base + starting LoRA vs the float weight; the layer-output error for
  isotropic inputs) at r=8 and r=16, and exact match after the same training;
* ``merge``: the int4 adapter merged with ``dt.merge(model, requantize=True)``: the per-layer
  re-quantization error and exact match after merging vs before;
* ``qalora``: the same for QA-LoRA (``--method qalora``), whose change merges into the int4
  groups' minima without re-rounding a code.

Sized for a 2-core CPU: STEPS=40 at batch 8 (320 training examples), EVAL=200 test prompts, one
seed (one prompt is 0.5 points). The table in bench/RESULTS.md is from runs one at a time on an
otherwise idle machine (``--rerun`` measures a configuration again, replacing its cached row); an
earlier session's runs at 4 steps under heavy load stay in the cache under their own keys.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_llm import (  # noqa: E402
    DT,
    PY,
    data_file,
    load_rows,
    measured,
    read_json,
    save_row,
)

CACHE = ROOT / ".cache" / "bench_quant"
ROWS = CACHE / "rows.jsonl"
RUNS = CACHE / "runs"
TASK = "tweet-sentiment-chat"
STEPS, BATCH, LIMIT, EVAL, LR = 40, 8, 320, 200, 1e-3
CONFIGS = ("float32", "int8", "int4", "gguf")  # table order
RUN_ORDER = ("gguf", "int4", "float32", "int8")  # the 4-bit rows first: the aims
LORA = ["--rank", "8", "--alpha", "16", "--targets", "q_proj,v_proj"]
HEADING = "Quantized bases (issue 21)"
SELF = "bench/bench_quant.py"


RERUN = False  # --rerun: measure again, the new row replacing the cached one


def cached(rows: dict, key: str, make) -> dict:
    if not RERUN and key in rows and rows[key].get("rc", 0) == 0:
        return rows[key]
    row = make()
    row["key"] = key
    rows[key] = row
    save_row(row, ROWS)
    return row


def quant_args(config: str) -> list[str]:
    return [] if config == "float32" else ["--quantize", config]


# ------------------------------------------------------------------------------------ workers

def _load(config: str, keep_float: bool = False):
    from deltatune.models import load_model

    q = None if config == "float32" else config
    return load_model("smollm2", quantize=q, keep_float=keep_float)


def worker_load(config: str, out: Path) -> None:
    tick = time.perf_counter()
    entry = _load(config)
    from deltatune.quant import float_bytes, quantized_bytes

    out.write_text(json.dumps({
        "seconds": time.perf_counter() - tick,
        "self_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "quantized_mb": quantized_bytes(entry.model) / 2**20,
        "float_mb": float_bytes(entry.model) / 2**20,
    }))


def _exact_match(entry) -> float:
    from deltatune.data import load_data
    from deltatune.lm.evaluate import evaluate_generation
    from deltatune.models.gguf import smollm2_tokenizer

    test = load_data(TASK, "test", seed=0, limit=EVAL).examples
    result = evaluate_generation(entry.model, smollm2_tokenizer(), test, max_new_tokens=8,
                                 batch_size=16)
    return result.metrics["exact_match"]


def worker_eval(config: str, adapter: Path, out: Path, merge: bool, loftq: bool) -> None:
    import torch

    import deltatune as dt
    from deltatune.quant import drop_float_references

    torch.manual_seed(0)
    entry = _load(config, keep_float=loftq)
    dt.load_adapter(entry.model, adapter)
    drop_float_references(entry.model)
    res: dict = {"exact_match": _exact_match(entry)}
    if merge:
        dt.merge(entry.model, requantize=True, unload=True)
        errors = dt.requantization_errors(entry.model)
        res["requant_error"] = errors
        res["exact_match_merged"] = _exact_match(entry)
    out.write_text(json.dumps(res))


def worker_layers(out: Path) -> None:
    """Relative weight error of the q/v layers: int4 alone, LoftQ r=8 and r=16 (1 iteration)."""
    import torch

    import deltatune as dt

    rows = {}
    for r in (None, 8, 16):
        entry = _load("float32")
        ws = {n: m.weight.detach().clone() for n, m in entry.model.named_modules()
              if n.endswith(("q_proj", "v_proj"))}
        dt.quantize_base(entry.model, "int4", keep_float=r is not None)
        num = den = 0.0
        if r is None:
            for n, w in ws.items():
                num += float((entry.model.get_submodule(n).dequantize() - w).square().sum())
                den += float(w.square().sum())
        else:
            dt.attach(entry.model, dt.LoRA(r=r, alpha=2 * r, init="loftq",
                                           targets=["q_proj", "v_proj"]))
            for n, w in ws.items():
                host = entry.model.get_submodule(n)
                eff = host.base.dequantize() + host.deltas["default"].product()
                num += float((eff - w).square().sum())
                den += float(w.square().sum())
        rows["int4" if r is None else f"loftq r={r}"] = (num / den) ** 0.5
        del entry
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out.write_text(json.dumps(rows))


# ------------------------------------------------------------------------------------ parts

def run_worker(args: list[str], out: Path) -> dict:
    res = measured([PY, str(Path(__file__).resolve()), "--worker", *args, "--out", str(out),
                    "--eval", str(EVAL)], out.with_suffix(".log"))
    res.update(read_json(out))
    return res


def part_load(rows: dict) -> None:
    for c in RUN_ORDER:
        cached(rows, f"load|{c}", lambda: run_worker(["load", c], RUNS / f"load-{c}.json"))


def train_run(c: str, extra: list[str], name: str) -> dict:
    data = str(data_file(TASK, LIMIT))
    out = RUNS / f"train-{name}"
    cmd = [DT, "train", "--model", "smollm2", "--data", data, "--batch-size", str(BATCH),
           "--max-steps", str(STEPS), "--lr", str(LR), "--seed", "0", *LORA, *quant_args(c),
           *extra, "--out", str(out), "--overwrite"]
    res = measured(cmd, out.with_suffix(".log"))
    metrics = read_json(out / "metrics.json")
    res["throughput"] = metrics.get("throughput")
    res["train_seconds"] = (read_json(out / "results.json").get("train") or {}).get("seconds")
    return res


def eval_run(c: str, name: str, merge: bool = False, loftq: bool = False) -> dict:
    adapter = RUNS / f"train-{name}" / "adapter"
    args = ["eval", c, "--adapter", str(adapter)] + (["--merge"] if merge else []) + (
        ["--loftq"] if loftq else [])
    return run_worker(args, RUNS / f"eval-{name}{'-merge' if merge else ''}.json")


def part_train(rows: dict) -> None:
    for c in RUN_ORDER:
        cached(rows, f"train|{c}|{STEPS}x{BATCH}", lambda: train_run(c, [], c))


def part_eval(rows: dict) -> None:
    for c in RUN_ORDER:
        if c != "int4":
            cached(rows, f"eval|{c}|{EVAL}", lambda: eval_run(c, c))


def part_merge(rows: dict) -> None:
    cached(rows, f"train|int4|{STEPS}x{BATCH}", lambda: train_run("int4", [], "int4"))
    cached(rows, f"eval+merge|int4|{EVAL}", lambda: eval_run("int4", "int4", merge=True))


def part_qalora(rows: dict) -> None:
    """QA-LoRA (r=8 alpha 16, the base's group 64) on int4, then the same exact re-quantizing
    merge as ``merge``: its change folds into the groups' minima."""
    cached(rows, f"train|int4-qalora|{STEPS}x{BATCH}",
           lambda: train_run("int4", ["--method", "qalora"], "int4-qalora"))
    cached(rows, f"eval+merge|int4-qalora|{EVAL}",
           lambda: eval_run("int4", "int4-qalora", merge=True))


def part_layers(rows: dict) -> None:
    cached(rows, "layers|int4", lambda: run_worker(["layers", "int4"], RUNS / "layers.json"))


def part_loftq(rows: dict) -> None:
    cached(rows, f"train|int4-loftq|{STEPS}x{BATCH}",
           lambda: train_run("int4", ["--opt", "init=loftq"], "int4-loftq"))
    cached(rows, f"eval|int4-loftq|{EVAL}", lambda: eval_run("int4", "int4-loftq", loftq=True))


# ------------------------------------------------------------------------------------ report

def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(rows: dict) -> str:
    lines = [f"## {HEADING}", "",
             f"`.venv/bin/python {SELF}` (SmolLM2-135M-Instruct, SFT LoRA r=8 alpha 16 on "
             f"q_proj/v_proj, {TASK}: {STEPS} steps x batch {BATCH} on {LIMIT} training examples, "
             f"lr {LR}, seed 0, gradient checkpointing on; exact match of the adapter on its own "
             f"quantized base, greedy, on {EVAL} test prompts; each number from its own process "
             "on a 2-core CPU, one process at a time; one seed, so one prompt is "
             f"{100 / EVAL:g} points).", "",
             "| base | weights in memory | load peak RSS | train peak RSS | x float32 | "
             "step time x float32 | train CPU s x float32 | exact match | vs float32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref_train = rows.get(f"train|float32|{STEPS}x{BATCH}", {})
    ref_eval = rows.get(f"eval|float32|{EVAL}", {})

    def step(row):
        tp = (row.get("throughput") or {}).get("samples_per_second")
        return BATCH / tp if tp else None

    for c in CONFIGS:
        load = rows.get(f"load|{c}", {})
        tr = rows.get(f"train|{c}|{STEPS}x{BATCH}", {})
        ev = rows.get(f"eval+merge|int4|{EVAL}" if c == "int4" else f"eval|{c}|{EVAL}", {})
        ratio = (tr.get("peak_rss_mb") / ref_train["peak_rss_mb"]
                 if tr.get("peak_rss_mb") and ref_train.get("peak_rss_mb") else None)
        st = (step(tr) / step(ref_train) if step(tr) and step(ref_train) else None)
        cpu = (tr["cpu_s"] / ref_train["cpu_s"] if tr.get("cpu_s") and ref_train.get("cpu_s")
               else None)  # the whole process's CPU seconds: less sensitive to the machine's load
        em, em0 = ev.get("exact_match"), ref_eval.get("exact_match")
        diff = 100 * (em - em0) if em is not None and em0 is not None else None
        held = (load["quantized_mb"] + load["float_mb"]) if "float_mb" in load else None
        lines.append(f"| {c} | {_f(held, '{:.0f} MB')} | "
                     f"{_f(load.get('peak_rss_mb'), '{:.0f} MB')} | "
                     f"{_f(tr.get('peak_rss_mb'), '{:.0f} MB')} | {_f(ratio)} | {_f(st)} | "
                     f"{_f(cpu)} | "
                     f"{_f(None if em is None else 100 * em, '{:.1f}')} | "
                     f"{_f(diff, '{:+.1f}')} |")
    lay = rows.get("layers|int4", {})
    lo_ev = rows.get(f"eval|int4-loftq|{EVAL}", {})
    mg = rows.get(f"eval+merge|int4|{EVAL}", {})

    def pct(x):
        return _f(None if x is None else 100 * x, "{:.1f}")

    lines += ["", "LoftQ vs the default init on the int4 base (group 64): relative error of the "
              "q/v weights (quantized base + starting LoRA vs the float weight), and exact match "
              "after the same training:", "",
              "| init | weight error r=8 | weight error r=16 | exact match |", "|---|---|---|---|",
              f"| default (int4 alone) | {_f(lay.get('int4'), '{:.4f}')} | "
              f"{_f(lay.get('int4'), '{:.4f}')} | "
              f"{pct(mg.get('exact_match'))} |",
              f"| loftq (1 iteration) | {_f(lay.get('loftq r=8'), '{:.4f}')} | "
              f"{_f(lay.get('loftq r=16'), '{:.4f}')} | "
              f"{pct(lo_ev.get('exact_match'))} |"]
    errs = list((mg.get("requant_error") or {}).values())
    if errs:
        lines += ["", "Merge into int4 (`dt.merge(model, requantize=True)`): re-quantization "
                  f"error per layer (relative, {len(errs)} layers) mean "
                  f"{sum(errs) / len(errs):.4f}, max {max(errs):.4f}; exact match "
                  f"{pct(mg.get('exact_match'))} before the merge, "
                  f"{pct(mg.get('exact_match_merged'))} after."]
    qa = rows.get(f"eval+merge|int4-qalora|{EVAL}", {})
    qa_errs = list((qa.get("requant_error") or {}).values())
    if qa_errs:
        lines += ["", "QA-LoRA (`--method qalora`, r=8 alpha 16, group 64 = the base's) on the "
                  "same int4 base and the same merge: error per layer mean "
                  f"{sum(qa_errs) / len(qa_errs):.6f}, max {max(qa_errs):.6f}; exact match "
                  f"{pct(qa.get('exact_match'))} before the merge, "
                  f"{pct(qa.get('exact_match_merged'))} after."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    global STEPS, EVAL, LIMIT, RUN_ORDER, RERUN
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs="+")
    p.add_argument("--out", type=Path)
    p.add_argument("--adapter", type=Path)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--loftq", action="store_true")
    p.add_argument("--only", nargs="+", default=["load", "train", "layers", "merge", "eval",
                                                 "loftq", "qalora"])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eval", type=int, default=EVAL)
    p.add_argument("--cached-only", action="store_true")
    p.add_argument("--rerun", action="store_true",
                   help="measure the chosen parts and configs again instead of using cached rows")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, help="only these bases (train, eval)")
    args = p.parse_args(argv)
    if args.configs:
        RUN_ORDER = tuple(c for c in RUN_ORDER if c in args.configs)
    STEPS, EVAL, LIMIT, RERUN = args.steps, args.eval, args.steps * BATCH, args.rerun
    if args.worker:
        kind = args.worker[0]
        if kind == "load":
            worker_load(args.worker[1], args.out)
        elif kind == "eval":
            worker_eval(args.worker[1], args.adapter, args.out, args.merge, args.loftq)
        else:
            worker_layers(args.out)
        return 0
    rows = load_rows(ROWS)
    if not args.cached_only:
        parts = {"load": part_load, "train": part_train, "merge": part_merge, "qalora": part_qalora,
                 "eval": part_eval, "layers": part_layers, "loftq": part_loftq}
        for name in args.only:
            parts[name](rows)
    text = render(rows)
    print(text)
    (CACHE / "section.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
