"""KV-cached generation, with many adapters in one batch.

Prompts are left-padded into batches and decoded by one loop over a transformers ``DynamicCache``:
the prompt is read once (only its last position's logits are computed), then each step feeds one
token per row. Prompts that name different adapters share a batch through :func:`deltatune.route`:
every forward, prefill and decode alike, keeps row ``i`` on its prompt's adapter, and LoRA serves
all of them with one gathered matmul per layer. Rows stop at the tokenizer's EOS or the chat
template's end-of-turn token (``<|im_end|>``); finished rows leave the batch (their cache rows are
dropped) once a quarter of it is done, so long answers do not drag short ones along.

Greedy decoding (``temperature=0``) gives each prompt the tokens it gets alone, whatever it is
batched with (up to float rounding of padded batches, which the tests check token-exact).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from .template import ChatError, render

#: end-of-turn tokens of common chat templates; one counts as a stop when the template writes it
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

Prompt = str | list[dict[str, str]]
_STOP_WINDOW = 32  # tokens decoded from a row's end to look for a stop string
Finish = Literal["eos", "stop", "length"]


@dataclass
class Generation:
    """One prompt's answer: its text (special tokens removed, cut before a stop string), the new
    token ids (the end token included), why it ended and which adapter wrote it."""

    text: str
    tokens: list[int]
    finish: Finish
    prompt_tokens: int
    adapter: str | None = None


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a deltatune model entry's model (its ``lm``), or ``model``
    itself when it is one already."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    lm = getattr(model, "lm", None)
    if not isinstance(lm, PreTrainedModel):
        raise TypeError(
            f"generation needs a transformers causal LM or a deltatune model holding one as .lm; "
            f"got {type(model).__name__}"
        )
    return lm


def stop_ids(tokenizer: Any, lm: nn.Module | None = None, template: str | None = None) -> set[int]:
    """Token ids that end an answer: the tokenizer's and the model's EOS, and the chat template's
    end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(lm, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for i in [eos] if isinstance(eos, int) else list(eos or []):
        ids.add(int(i))
    text = template or getattr(tokenizer, "chat_template", None) or ""
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in END_OF_TURN:
        if token in text:
            i = tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != unk:
                ids.add(i)
    return ids


def prompt_text(tokenizer: Any, prompt: Prompt, template: str | None = None, *,
                raw: bool = False) -> str:
    """The text the model continues: a string is one user message (``raw``: the text as it is),
    a message list a conversation; both rendered with the chat template and the assistant's
    header."""
    if isinstance(prompt, str):
        if raw:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ChatError(
            f"a prompt is a string or a list of {{'role', 'content'}} messages, "
            f"got {type(prompt).__name__}"
        )
    return render(tokenizer, prompt, template, add_generation_prompt=True)


def encode(tokenizer: Any, text: str, *, raw: bool = False) -> list[int]:
    """Token ids of ``text``; chat text carries its own special tokens, so none are added."""
    return list(tokenizer(text, add_special_tokens=raw)["input_ids"])


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T) with the rows right-aligned (padding first)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def routed(lm: nn.Module, names: Sequence[str | None] | None) -> Iterator[None]:
    """Row ``i`` on delta ``names[i]`` (``None``: the base model); ``names=None``: the model as it
    is. One name for every row takes the plain path instead of the gathered one: that delta is
    made the only active one for the block."""
    from ..core.model import active, disabled, route, set_active

    if names is None:
        yield
        return
    names = list(names)
    if len(set(names)) > 1:
        with route(lm, names):
            yield
    elif names[0] is None:
        with disabled(lm):
            yield
    else:
        before = active(lm)
        set_active(lm, names[0])
        try:
            yield
        finally:
            set_active(lm, before)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    adapters: str | Sequence[str | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    template: str | None = None,
    stop: Sequence[str] | None = None,
    raw: bool = False,
    ignore_eos: bool = False,
    progress: bool = False,
) -> list[Generation]:
    """Answer every prompt; returns one :class:`Generation` per prompt, in order.

    ``adapters``: one delta name (or ``None``, the base model) per prompt, or one name for all;
    prompts naming different adapters are decoded together (:func:`deltatune.route`). Without it
    the model runs as it is (its active deltas). ``temperature=0`` is greedy; otherwise tokens are
    sampled (``top_p`` nucleus) from a generator seeded with ``seed``: the same call gives the same
    answers. ``stop``: strings that end an answer (cut off). ``raw``: string prompts are plain text,
    not user messages. ``ignore_eos``: always write ``max_new_tokens`` (throughput measurements).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}"
        )
    prompts = list(prompts)
    names = _adapter_names(adapters, len(prompts))
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    ends = set() if ignore_eos else stop_ids(tokenizer, lm, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends, default=0)
    encoded = [encode(tokenizer, prompt_text(tokenizer, p, template, raw=raw), raw=raw)
               for p in prompts]
    if any(not e for e in encoded):
        raise ValueError("a prompt encodes to no tokens; give non-empty text")
    stop = [s for s in stop or () if s]

    def halts(tokens: list[int]) -> bool:  # a stop string written: the row is done
        text = tokenizer.decode(tokens[-_STOP_WINDOW:], skip_special_tokens=True)
        return any(s in text for s in stop)

    # longest first: batches of similar lengths waste little on padding; answers keep their order
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    gen = torch.Generator(device=device).manual_seed(seed)
    results: list[Generation | None] = [None] * len(prompts)
    was_training = lm.training
    lm.eval()
    try:
        with progress_bar(progress, len(prompts), "generate") as advance, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                routes = None if names is None else [names[i] for i in rows]
                out = _decode(
                    lm, [encoded[i] for i in rows], routes,
                    pad=pad, ends=ends, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, generator=gen, device=device,
                    halts=halts if stop else None,
                )
                for i, (tokens, finish) in zip(rows, out):
                    results[i] = _finish(tokenizer, tokens, finish, stop, len(encoded[i]),
                                         None if names is None else names[i])
                advance(len(rows))
    finally:
        lm.train(was_training)
    return results  # type: ignore[return-value]


def _adapter_names(adapters: str | Sequence[str | None] | None, n: int
                   ) -> list[str | None] | None:
    if adapters is None:
        return None
    if isinstance(adapters, str):
        return [adapters] * n
    names = list(adapters)
    if len(names) != n:
        raise ValueError(
            f"adapters has {len(names)} names for {n} prompts; give one per prompt (or one name)"
        )
    return names


def _decode(lm: nn.Module, rows: list[list[int]], names: list[str | None] | None, *, pad: int,
            ends: set[int], max_new_tokens: int, temperature: float, top_p: float,
            generator: torch.Generator, device: torch.device,
            halts: Callable[[list[int]], bool] | None = None) -> list[tuple[list[int], Finish]]:
    """One batch: prefill, then one token per live row per step; finished rows leave the batch.
    ``halts(tokens)`` (stop strings) ends a row too."""
    from transformers import DynamicCache

    ids, mask = left_pad(rows, pad, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first token
    cache = DynamicCache(config=lm.config)
    end_ids = torch.tensor(sorted(ends), dtype=torch.long, device=device)
    live = list(range(len(rows)))  # batch row b holds rows[live[b]]
    running = torch.ones(len(rows), dtype=torch.bool, device=device)  # (B,): not finished yet
    tokens: list[list[int]] = [[] for _ in rows]
    finish: list[Finish] = ["length"] * len(rows)
    step_ids = ids
    with contextlib.ExitStack() as routing:  # closed on errors too: no route is left set
        routing.enter_context(routed(lm, names))
        for step in range(max_new_tokens):
            logits = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            nxt = _pick(logits.float(), temperature, top_p, generator)  # (B,)
            ended = torch.isin(nxt, end_ids) & running
            now = torch.stack([nxt, running.long(), ended.long()]).tolist()  # one device sync
            halted = []
            for b, (i, t, on, e) in enumerate(zip(live, *now)):
                if on:
                    tokens[i].append(t)
                    if e:
                        finish[i] = "eos"
                    elif halts is not None and halts(tokens[i]):
                        finish[i] = "stop"
                        halted.append(b)
            running &= ~ended
            if halted:
                running[halted] = False
            left = sum(now[1]) - sum(now[2]) - len(halted)  # rows still running
            if left == 0 or step == max_new_tokens - 1:
                break
            if 4 * (len(live) - left) >= len(live):  # a quarter is done: drop those rows
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                mask, positions, nxt = mask[keep], positions[keep], nxt[keep]
                live = [live[b] for b in keep.tolist()]
                running = running[keep]
                if names is not None:  # the remaining rows keep their adapters
                    routing.close()
                    routing.enter_context(routed(lm, [names[i] for i in live]))
            # finished rows still in the batch feed padding; what they write is ignored
            step_ids = nxt.masked_fill(~running, pad)[:, None]
            mask = torch.cat([mask, running[:, None].long()], dim=1)
            positions = positions[:, -1:] + 1
    return list(zip(tokens, finish))


def _pick(logits: torch.Tensor, temperature: float, top_p: float,
          generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax (``temperature`` 0) or a nucleus sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        # drop a token when the tokens above it already hold top_p (the first one always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _finish(tokenizer: Any, tokens: list[int], finish: Finish, stop: Sequence[str],
            prompt_tokens: int, adapter: str | None) -> Generation:
    """The answer's text: special tokens dropped, cut before the first stop string."""
    body = tokens[:-1] if finish == "eos" else tokens
    text = tokenizer.decode(body, skip_special_tokens=True)
    cuts = [at for at in (text.find(s) for s in stop) if at >= 0]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return Generation(text, tokens, finish, prompt_tokens, adapter)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Any]:
    """A transient rich progress bar; ``advance(n)`` moves it (a no-op when disabled)."""
    bar = None
    if enabled:
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            pass
        else:
            bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
    if bar is None:
        yield lambda n: None
        return
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, advance=n)
