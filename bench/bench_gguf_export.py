"""GGUF export benchmark (issue 21): sizes, export time and read-back logit error of SmolLM2 + LoRA.

    .venv/bin/python bench/bench_gguf_export.py                  # as in RESULTS.md
    .venv/bin/python bench/bench_gguf_export.py --no-transformers --steps 5   # quick look

A LoRA (r=8, alpha=16 on q_proj,v_proj) is trained by SFT for ``--steps`` steps (batch 4 x 128
tokens) on ``tweet-sentiment-chat``; then ``deltatune export`` writes it as the merged
safetensors directory (today's default: the reference for time and size), as one GGUF file in f16,
q8_0 and q4_0, and as a llama.cpp LoRA GGUF. Each GGUF file is read back:

* by deltatune's reader (gguf-py's dequantizers, llama.cpp's q/k row order undone) into SmolLM2;
* by transformers' GGUF loader (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``;
  ``--no-transformers`` skips it: about a minute per file on 2 cores);
* by llama.cpp through llama-cpp-python, when it is importable (it builds llama.cpp from source;
  it is not a dependency of deltatune): its logits on the same prompts and a greedy generation,
  for the merged files and for the LoRA file applied on the base model's f16 GGUF and on the bundled
  Q4_1 GGUF.

The figure is the max |logit difference| to deltatune's merged model over every position of a few
chat prompts from the test split, next to the size of the adapter's own effect (max |logit
difference| between the base and the adapted model): an export is faithful when its error is a
small fraction of that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
QUANTS = ("f16", "q8_0", "q4_0")


def _train(run: Path, steps: int, limit: int) -> Path:
    """A LoRA trained by SFT on tweet-sentiment-chat (deltatune's chat collate: the loss on the
    answers), saved as the train job saves one (adapter + task.json), so that ``export`` finds its
    base model. The Python API, not ``deltatune train``: that job also evaluates every epoch and
    generates an answer per test example, minutes on a shared 2-core machine."""
    import torch

    import deltatune as dt
    from deltatune.data import load_data
    from deltatune.io.files import write_json
    from deltatune.lm.tokenize import chat_collate
    from deltatune.models import load_model
    from deltatune.train import TrainConfig, fit

    torch.manual_seed(0)
    entry = load_model("smollm2", max_length=128)
    data = load_data("tweet-sentiment-chat", "train", limit=limit)
    dt.attach(entry.model, dt.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    collate = chat_collate(entry.collate.tokenizer, 128, template=None, packing=False)
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=1e-3, objective="sft",
                      eval_each_epoch=False, keep_best=False, progress=False)
    fit(entry.model, data, collate, cfg, task=entry.task)
    adapter = run / "adapter"
    dt.save_adapter(entry.model, adapter)
    write_json(adapter / "task.json", {"model": "smollm2", "task": "causal-lm"})
    return adapter


def _prompts(tokenizer, n: int) -> list[list[int]]:
    from deltatune.data import load_data

    rows = load_data("tweet-sentiment-chat", "test", limit=n)
    return [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for r in rows]


def _logits(lm, prompts) -> list:
    import torch

    with torch.no_grad():
        return [lm(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


def _maxdiff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _agree(a, b) -> float:
    """Share of positions whose most likely next token is the same."""
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def _generate(lm, tokenizer, prompt: list[int], n: int) -> str:
    import torch

    with torch.no_grad():
        out = lm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def _llama_cpp(path: Path, prompts, n_new: int, lora: Path | None = None):
    """llama.cpp's logits on every prompt position and its greedy continuation of the first."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, seed=0,
                n_threads=2, **kwargs)
    logits = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(p)], dtype=np.float32)))
    llm.reset()
    toks = []
    for tok in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
        if tok == llm.token_eos() or len(toks) >= n_new:
            break
        toks.append(tok)
    text = llm.detokenize(toks).decode("utf-8", errors="replace")
    del llm
    return logits, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="LoRA training steps")
    ap.add_argument("--limit", type=int, default=40,
                    help="examples per split for training (the train job also generates an answer "
                    "for each test example, which dominates its time)")
    ap.add_argument("--prompts", type=int, default=4, help="test-split chat prompts compared")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_gguf")
    ap.add_argument("--no-transformers", action="store_true",
                    help="skip transformers' GGUF loader (about a minute per file)")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    ap.add_argument("--llama-cpp-only", action="store_true",
                    help="run llama.cpp on the files of an earlier run (WORK/raw.json)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the section from WORK/raw.json of an earlier run")
    args = ap.parse_args()
    if args.report_only:
        _report(json.loads((args.work / "raw.json").read_text()), args)
        return
    if args.llama_cpp_only:
        _reuse(args)
        return

    import torch

    import deltatune as dt
    from deltatune.cli.train import load_trained, run_export
    from deltatune.io.gguf_export import load_gguf_weights
    from deltatune.models import load_model
    from deltatune.models.text import offline_transformers

    torch.manual_seed(0)
    work = args.work
    run = work / "run"
    t0 = time.time()
    adapter = _train(run, args.steps, args.limit)
    train_s = time.time() - t0

    # exports: the safetensors default first, then each GGUF kind (the whole job each time: load,
    # merge, write), interleaved so that the machine's load falls on all alike
    exports: dict[str, dict] = {}
    for kind in ("safetensors", *QUANTS, "gguf-lora"):
        out = work / f"export-{kind}"
        fmt = {"safetensors": "safetensors", "gguf-lora": "gguf-lora"}.get(kind, "gguf")
        quant = kind if kind in QUANTS else None
        t = time.time()
        res = run_export(None, adapter, out, overwrite=True, fmt=fmt, quant=quant)
        seconds = time.time() - t
        size = sum(f.stat().st_size for f in out.iterdir()
                   if f.suffix in (".gguf", ".safetensors"))
        exports[kind] = {"seconds": seconds, "bytes": size, "dir": out,
                         "file": res.get("file"), "fallback": res.get("fallback_f16", [])}

    # deltatune's own model: the adapter active (what deltatune evaluates) and the base
    entry, _ = load_trained(None, adapter)
    tokenizer = entry.collate.tokenizer
    prompts = _prompts(tokenizer, args.prompts)
    lm = entry.model.lm
    ref = _logits(lm, prompts)
    with dt.disabled(entry.model):
        base_logits = _logits(lm, prompts)
    effect = _maxdiff(ref, base_logits)
    dt.merge(entry.model, unload=True)
    merged_text = _generate(lm, tokenizer, prompts[0], args.new_tokens)
    del entry, lm

    rows = {}
    fresh = load_model("smollm2").model.lm
    for q in QUANTS:
        path = exports[q]["dir"] / exports[q]["file"]
        load_gguf_weights(fresh, path)
        got = _logits(fresh, prompts)
        row = {"deltatune": _maxdiff(got, ref), "top1": _agree(got, ref),
               "text_dt": _generate(fresh, tokenizer, prompts[0], args.new_tokens)}
        if not args.no_transformers:
            tf = offline_transformers()
            t = time.time()
            theirs = tf.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
            row["transformers_load_s"] = time.time() - t
            row["transformers"] = _maxdiff(_logits(theirs, prompts), ref)
            del theirs
        rows[q] = row
        print(q, json.dumps({k: v for k, v in row.items()}), flush=True)

    cpp = _run_llama_cpp(work, exports, prompts, ref, args.new_tokens)

    raw = {"exports": {k: {**v, "dir": str(v["dir"])} for k, v in exports.items()},
           "rows": rows, "cpp": cpp, "effect": effect, "merged_text": merged_text,
           "train_s": train_s, "positions": sum(map(len, prompts)), "prompts": len(prompts),
           "argv": sys.argv[1:], "steps": args.steps, "limit": args.limit,
           "new_tokens": args.new_tokens}
    (work / "raw.json").write_text(json.dumps(raw, indent=1))
    _report(raw, args)


def _run_llama_cpp(work: Path, exports: dict, prompts, ref, n_new: int) -> dict[str, dict]:
    """llama.cpp on the merged files, and on the LoRA file applied to the base's f16 GGUF and to
    the bundled Q4_1 GGUF; ``{}`` when llama-cpp-python is not importable."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {}
    from deltatune.io.gguf_export import write_gguf
    from deltatune.models import load_model
    from deltatune.models.gguf import smollm2_gguf

    base_f16 = work / "base-f16.gguf"
    base = load_model("smollm2").model.lm
    write_gguf(base, base_f16, quant="f16", tokenizer=smollm2_gguf())
    del base
    lora = Path(exports["gguf-lora"]["dir"]) / exports["gguf-lora"]["file"]
    runs = {q: (Path(exports[q]["dir"]) / exports[q]["file"], None) for q in QUANTS}
    runs["lora on base f16"] = (base_f16, lora)
    runs["lora on bundled Q4_1"] = (smollm2_gguf(), lora)
    cpp = {}
    for label, (path, with_lora) in runs.items():
        logits, text = _llama_cpp(path, prompts, n_new, with_lora)
        cpp[label] = {"maxdiff": _maxdiff(logits, ref), "top1": _agree(logits, ref),
                      "text": text}
        print("llama.cpp", label, json.dumps(cpp[label]), flush=True)
    return cpp


def _reuse(args) -> None:
    """``--llama-cpp-only``: llama.cpp on the files of an earlier run (WORK/raw.json), e.g. once
    llama-cpp-python has finished building; the section is rewritten with its figures."""
    from deltatune.cli.train import load_trained

    raw = json.loads((args.work / "raw.json").read_text())
    entry, _ = load_trained(None, args.work / "run" / "adapter")
    prompts = _prompts(entry.collate.tokenizer, raw["prompts"])
    ref = _logits(entry.model.lm, prompts)
    raw["cpp"] = _run_llama_cpp(args.work, raw["exports"], prompts, ref, raw["new_tokens"])
    (args.work / "raw.json").write_text(json.dumps(raw, indent=1))
    _report(raw, args)


def _report(raw: dict, args) -> None:
    """The RESULTS.md section from the measured figures (``--report-only`` rebuilds it from
    ``WORK/raw.json``)."""
    exports, rows, cpp = raw["exports"], raw["rows"], raw["cpp"]
    effect, merged_text, train_s = raw["effect"], raw["merged_text"], raw["train_s"]
    safe = exports["safetensors"]
    lines = [
        "| export | file size | size / safetensors | export job time / safetensors | "
        "max abs logit diff, deltatune reader | same top-1 token | transformers GGUF loader | "
        "llama.cpp | llama.cpp same top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| safetensors (float32, default) | {safe['bytes'] / 2**20:.1f} MiB | 1.00 | 1.00 | "
        "- | - | - | - | - |",
    ]
    for kind in (*QUANTS, "gguf-lora"):
        e = exports[kind]
        row = rows.get(kind, {})
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else "-")  # noqa: E731
        c = cpp.get("lora on base f16" if kind == "gguf-lora" else kind, {})
        cpp_v = c.get("maxdiff")
        lines.append(
            f"| {kind} | {e['bytes'] / 2**20:.1f} MiB | {e['bytes'] / safe['bytes']:.3f} | "
            f"{e['seconds'] / safe['seconds']:.2f} | {fmt(row.get('deltatune'))} | "
            f"{fmt(row.get('top1'))} | {fmt(row.get('transformers'))} | {fmt(cpp_v)}"
            + (" (on the base's f16 GGUF)" if kind == "gguf-lora" and cpp_v is not None else "")
            + f" | {fmt(c.get('top1'))} |")
    texts = [f"- deltatune, merged float32 model: {merged_text!r}"]
    texts += [f"- deltatune reading the {q} file: {rows[q]['text_dt']!r}" for q in QUANTS]
    if cpp:
        texts += [f"- llama.cpp, {label}: {v['text']!r}" + (
            f" (max abs logit diff {v['maxdiff']:.4f})" if label.endswith("Q4_1") else "")
            for label, v in cpp.items()]
    else:
        texts.append("- llama.cpp: llama-cpp-python is not importable here; not run")
    cmd = "`.venv/bin/python bench/bench_gguf_export.py" + "".join(
        " " + a for a in raw["argv"]) + "`"
    fallback = sorted({n for e in exports.values() for n in (e["fallback"] or [])})
    body = "\n".join([
        f"Command: {cmd} (SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on q_proj,v_proj, SFT "
        f"{raw['steps']} steps on tweet-sentiment-chat (--limit {raw['limit']} examples per split, "
        f"train job {train_s:.0f} s); {raw['prompts']} chat prompts of the test split, "
        f"{raw['positions']} positions; 2 shared CPU cores, so "
        "times are ratios to the safetensors export measured in the same run).",
        "",
        *lines,
        "",
        f"The adapter's own effect on the logits (max abs diff, base vs adapted): {effect:.4f}. "
        "q4_0 keeps the tied embedding/output matrix in q8_0 (llama.cpp's quantizer gives the "
        f"output a higher type too). Tensors written as f16 for rows that are not whole blocks: "
        f"{', '.join(fallback) or 'none'}.",
        "",
        f"Greedy continuation of the first prompt ({raw['new_tokens']} tokens):",
        "",
        *texts,
    ])
    print(body)
    if not args.no_write:
        from _results import write_section

        write_section("GGUF export (issue 21)", body)


if __name__ == "__main__":
    main()
