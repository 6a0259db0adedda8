"""`deltatune generate`: answer prompts with a causal LM and its adapters, many adapters in one
batch; and the chat evaluation `deltatune eval` runs on chat and preference data."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .common import CLIError, output_job, prepare_out, write_results

GENERATIONS = "generations.jsonl"
PREDICTIONS = "predictions.jsonl"
BASE_NAMES = ("base", "none")  # a route naming the model without any adapter


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``--adapter DIR`` or ``--adapter NAME=DIR`` (repeated) as ``{name: dir}``; an unnamed
    adapter is called ``default`` when it is the only one, else by its directory's name."""
    out: dict[str, Path] = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or "/" in name or "\\" in name:
            name, path = "", value
        path_ = Path(path)
        if not name:
            name = "default" if len(values) == 1 else re.sub(r"[^A-Za-z0-9_-]+", "-", path_.name)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in BASE_NAMES:
            raise CLIError(f"--adapter {value}: the name {name!r} must be letters, digits, '_' or "
                           f"'-' and not {' or '.join(BASE_NAMES)}; write NAME=DIR")
        if name in out:
            raise CLIError(f"--adapter {value}: the name {name!r} is given twice; write NAME=DIR "
                           "with a different NAME for each adapter")
        if not path_.is_dir():
            raise CLIError(f"--adapter {path}: no such directory; pass an adapter directory "
                           "written by `deltatune train` or dt.save_adapter")
        out[name] = path_
    return out


def read_prompts(path: Path, encoding: Optional[str] = None) -> list[dict[str, Any]]:
    """The prompts of a CSV/JSONL/JSON file, ``{"prompt": messages, "adapter"?: name}`` each:
    a ``messages`` column (the conversation before its last assistant turn), a ``prompt`` column
    (text or messages; ``completion``/``chosen``/``rejected`` are ignored) or ``instruction``
    (+ ``input``); an ``adapter`` column routes the row."""
    from ..data.base import DataError
    from ..data.user_files import read_rows

    if not path.is_file():
        raise CLIError(f"--data {path}: no such file; pass a CSV, JSONL or JSON file of prompts")
    rows, columns = read_rows(path, encoding)
    if not rows:
        raise CLIError(f"--data {path} holds no rows; add prompts")
    if not {"messages", "prompt", "instruction"} & set(columns):
        raise CLIError(f"--data {path} has no messages, prompt or instruction column (columns: "
                       f"{', '.join(columns)}); add one")
    out = []
    for where, row in rows:
        try:
            prompt = _row_prompt(row, path.suffix.lower() == ".csv")
        except (DataError, ValueError) as exc:
            raise CLIError(f"{path}:{where}: {exc}") from None
        route = row.get("adapter")
        item: dict[str, Any] = {"prompt": prompt}
        if route is not None and str(route).strip():
            item["adapter"] = str(route).strip()
        out.append(item)
    return out


def _row_prompt(row: dict[str, Any], csv: bool) -> list[dict[str, str]]:
    if row.get("messages") is not None:
        messages = _messages(row["messages"], csv, "messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        prompt = messages if last is None else messages[:last]
    elif row.get("prompt") is not None:
        prompt = _messages(row["prompt"], csv, "prompt")
    else:
        user = str(row.get("instruction") or "")
        if str(row.get("input") or "").strip():
            user += f"\n\n{row['input']}"
        prompt = [{"role": "user", "content": user}]
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise ValueError("the prompt is empty; fill it in or remove the row")
    return prompt


def _messages(value: Any, csv: bool, column: str) -> list[dict[str, str]]:
    if isinstance(value, str) and csv and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a text prompt that happens to start with "["
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise ValueError(f'{column} must be text or a list of {{"role", "content"}} messages')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_lm(model: Optional[str], adapters: dict[str, Path], *, verify: bool = True):
    """The causal-LM entry with every adapter loaded under its name (none active)."""
    import deltatune as dt

    from ..models import load_model
    from .train import read_task

    recorded = {n: read_task(p).get("model") for n, p in adapters.items()}
    if model is None:
        found = sorted({m for m in recorded.values() if m})
        if len(found) != 1:
            raise CLIError("pass --model NAME: " + (
                "no adapter records its base model" if not found
                else f"the adapters record different base models ({', '.join(found)})"))
        model = found[0]
    for name, was in recorded.items():
        if was and was != model and Path(was).name != Path(model).name:
            raise CLIError(f"--adapter {adapters[name]} was trained on {was}, not {model}; load "
                           "it on its own base model")
    entry = load_model(model)
    if entry.task != "causal-lm":
        raise CLIError(f"{model} is a {entry.task} model; generation needs a causal language "
                       "model (smollm2 or a transformers causal-LM directory)")
    for name, path in adapters.items():
        dt.load_adapter(entry.model, path, name=name, activate=False, verify=verify)
    dt.set_active(entry.model, [])
    entry.model.eval()
    return entry, model


def tokenizer_of(entry) -> Any:
    tokenizer = getattr(entry.collate, "tokenizer", None) or getattr(entry, "tokenizer", None)
    if tokenizer is None:
        raise CLIError(f"{entry.name} has no tokenizer to generate with")
    return tokenizer


def resolve_routes(prompts: list[dict[str, Any]], routes: list[str], names: list[str]
                   ) -> list[Optional[str]] | None:
    """Each prompt's adapter (``None``: the base model): ``--route`` (one for all, or one per
    prompt), else the data's ``adapter`` column, else the only adapter; checked against
    ``names``."""
    if routes and any("adapter" in p for p in prompts):
        raise CLIError("--route and the data's adapter column both route the prompts; use one")
    if routes and len(routes) not in (1, len(prompts)):
        raise CLIError(f"--route is given {len(routes)} times for {len(prompts)} prompts; give "
                       "it once (every prompt) or once per prompt")
    if routes:
        wanted = routes * len(prompts) if len(routes) == 1 else routes
    elif any("adapter" in p for p in prompts):
        wanted = [p.get("adapter", "base") for p in prompts]
    elif len(names) > 1:
        raise CLIError(f"{len(names)} adapters are loaded ({', '.join(names)}); say which one "
                       "each prompt uses with --route NAME or an adapter column in --data")
    else:
        wanted = [names[0] if names else "base"] * len(prompts)
    for w in wanted:
        if w not in names and w.lower() not in BASE_NAMES:
            raise CLIError(f"route {w!r} names no loaded adapter; loaded: "
                           f"{', '.join(names) or 'none'} (or 'base' for the model alone)")
    out = [None if w.lower() in BASE_NAMES and w not in names else w for w in wanted]
    return None if all(r is None for r in out) else out


@output_job("generate")
def run_generate(
    model: Optional[str],
    adapters: dict[str, Path],
    prompts: list[dict[str, Any]],
    *,
    out: Path,
    routes: list[str] = (),  # type: ignore[assignment]
    data: Optional[Path] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    template: Optional[Path] = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer every prompt; writes generations.jsonl and results.json into ``out``."""
    from ..io.files import atomic_write
    from ..lm.generate import generate
    from ..lm.template import load_template

    if not prompts:
        raise CLIError("no prompts: pass --prompt TEXT or --data FILE")
    if max_new_tokens < 1 or batch_size < 1:
        raise CLIError("--max-new-tokens and --batch-size must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise CLIError("--temperature must be >= 0 and --top-p in (0, 1]")
    per_prompt = resolve_routes(prompts, list(routes), list(adapters))
    if template is None:  # the template the adapters were trained with, if they record one
        from .train import read_task

        recorded = [read_task(p).get("chat_template") for p in adapters.values()]
        template = next((Path(t) for t in recorded if t), None)
    chat_template = load_template(template)
    out = prepare_out(out, overwrite, inputs=[data, template, *adapters.values()])
    entry, model = load_lm(model, adapters, verify=verify)
    tokenizer = tokenizer_of(entry)
    t0 = time.perf_counter()
    answers = generate(entry.model, tokenizer, [p["prompt"] for p in prompts],
                       adapters=per_prompt, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                       template=chat_template, progress=progress)
    seconds = time.perf_counter() - t0
    lines = [json.dumps({"prompt": p["prompt"], "adapter": g.adapter, "text": g.text,
                         "finish": g.finish, "new_tokens": len(g.tokens)}, ensure_ascii=False)
             for p, g in zip(prompts, answers)]
    atomic_write(out / GENERATIONS, lambda tmp: Path(tmp).write_text(
        "".join(line + "\n" for line in lines), encoding="utf-8"))
    tokens = sum(len(g.tokens) for g in answers)
    results = {
        "job": "generate", "model": model,
        "adapters": {n: str(p) for n, p in adapters.items()},
        "data": str(data) if data else None, "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "seed": seed, "batch_size": batch_size, "new_tokens": tokens,
        "finished_at_eos": sum(g.finish == "eos" for g in answers),
        "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
    }
    write_results(out, results)
    return {**results, "generations": answers, "out": str(out)}


def evaluate_chat(entry, dataset, *, max_new_tokens: int = 64, batch_size: int = 16,
                  beta: float = 0.1, progress: bool = False, template: Optional[str] = None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`deltatune eval` on chat data (exact match and completion loss of generated answers) or
    preference data (reward accuracy): metrics and one prediction row per example. ``template``:
    a chat template file (the one the adapter was trained with), else the model's own."""
    from ..lm.evaluate import evaluate_generation, reward_accuracy
    from ..lm.template import load_template

    tokenizer = tokenizer_of(entry)
    chat_template = load_template(template)
    if dataset.task == "preference":
        result = reward_accuracy(entry.model, tokenizer, dataset.examples, beta,
                                 batch_size=batch_size, progress=progress, template=chat_template)
        return {**result.metrics, "beta": beta}, result.predictions
    result = evaluate_generation(entry.model, tokenizer, dataset.examples,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress, template=chat_template)
    return {**result.metrics, "max_new_tokens": max_new_tokens}, result.predictions


def write_predictions(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``predictions.jsonl`` in ``out``, written atomically."""
    from ..io.files import atomic_write

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write(out / PREDICTIONS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# -- CLI ------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command(
        "generate",
        epilog=(
            "Examples:\n\n"
            "  deltatune generate --model smollm2 --prompt 'What is the capital of France?' "
            "--out runs/gen\n\n"
            "  deltatune generate --adapter runs/sft/adapter --data prompts.jsonl "
            "--max-new-tokens 128 --out runs/sft/gen\n\n"
            "  deltatune generate --model smollm2 --adapter news=runs/news/adapter --adapter "
            "tweets=runs/tweets/adapter --data routed.jsonl --out runs/routed   (an adapter "
            "column names each row's adapter: all rows are answered in one batch)\n\n"
            "  deltatune generate --model smollm2 --adapter a=runs/a --adapter b=runs/b "
            "--prompt hi --prompt hello --route a --route b --out runs/ab"
        ),
    )
    def generate_(
        out: Path = typer.Option(..., help="directory for generations.jsonl and results.json"),
        model: Optional[str] = typer.Option(
            None, help="causal LM: smollm2 or a transformers directory (default: the one the "
            "adapters record)"),
        adapter: list[str] = typer.Option(
            [], help="adapter directory, or NAME=DIR; repeat to load several"),
        prompt: list[str] = typer.Option([], help="a user message to answer; repeat for more"),
        data: Optional[Path] = typer.Option(
            None, help="CSV/JSONL/JSON file of prompts (messages, prompt or instruction column; "
            "an adapter column routes each row)"),
        route: list[str] = typer.Option(
            [], help="adapter NAME (or 'base') for the prompts: once for all, or once per prompt"),
        max_new_tokens: int = typer.Option(64, help="at most this many new tokens per answer"),
        temperature: float = typer.Option(0.0, help="0: greedy; above 0: seeded sampling"),
        top_p: float = typer.Option(1.0, help="nucleus sampling mass (with --temperature)"),
        seed: int = typer.Option(0, help="seed of the sampling"),
        batch_size: int = typer.Option(16, help="prompts decoded together"),
        chat_template: Optional[Path] = typer.Option(
            None, help="Jinja chat template file (default: the model's own)"),
        encoding: Optional[str] = typer.Option(None, help="text encoding of --data"),
        overwrite: bool = typer.Option(False, help="replace an earlier deltatune output in --out"),
        no_verify: bool = typer.Option(
            False, "--no-verify", help="skip the adapters' sha256 check"),
    ) -> None:
        """Answer prompts with a language model and its adapters (KV-cached; prompts routed to
        different adapters are answered together in one batch)."""
        from rich.console import Console

        if not prompt and data is None:
            raise CLIError("no prompts: pass --prompt TEXT (repeatable) or --data FILE")
        if prompt and data is not None:
            raise CLIError("pass --prompt or --data, not both")
        adapters = parse_adapters(adapter)
        prompts = ([{"prompt": [{"role": "user", "content": p}]} for p in prompt] if prompt
                   else read_prompts(data, encoding))
        console = Console(stderr=True)
        results = run_generate(
            model, adapters, prompts, out=out, routes=route, data=data,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            batch_size=batch_size, template=chat_template, overwrite=overwrite,
            verify=not no_verify, progress=console.is_terminal,
        )
        if prompt:
            for p, g in zip(prompt, results["generations"]):
                tag = f" [{g.adapter}]" if g.adapter else ""
                print(f"> {p}{tag}\n{g.text}\n")
        print(f"{results['prompts']} answers, {results['new_tokens']} tokens in "
              f"{results['seconds']:.1f} s ({results['tokens_per_s']:.1f} tokens/s): "
              f"{Path(results['out']) / GENERATIONS}")
