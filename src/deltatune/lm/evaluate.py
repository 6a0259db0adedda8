"""Evaluation by what the model says: exact match of generated answers, the completion loss of the
reference answers, and the reward accuracy of preference pairs.

Losses and log-probabilities are taken only at the answer positions: prompts are left-padded so
every answer ends the row, and the model computes logits for the last ``max answer length + 1``
positions alone (transformers' ``logits_to_keep``), never batch × prompt length × vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .generate import (
    causal_lm,
    encode,
    generate,
    left_pad,
    progress_bar,
    prompt_text,
    routed,
    stop_ids,
)
from .template import ChatError, render

Messages = list[dict[str, str]]


def normalize(text: str) -> str:
    """The form answers are compared in: surrounding whitespace stripped, case folded."""
    return text.strip().casefold()


def chat_reference(example: dict[str, Any]) -> tuple[Messages, str]:
    """A chat example's prompt (its messages before the last assistant turn) and reference answer
    (``answer``, else that last assistant message)."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatError(
            f"a chat example holds a non-empty 'messages' list; got keys {sorted(example)}"
        )
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    answer = example.get("answer")
    if last is None and answer is None:
        raise ChatError(
            "a chat example to score needs a reference: an 'answer' field or an assistant turn"
        )
    prompt = messages if last is None else messages[:last]
    if not prompt:
        raise ChatError("a chat example's prompt is empty: no message before the assistant turn")
    return prompt, str(answer if answer is not None else messages[last]["content"])


def completion_ids(tokenizer: Any, prompt: Messages, completion: Messages,
                   template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (ending with the assistant's header) and of the completion turn(s)
    as the template writes them, through the end-of-turn token; tokenized apart, as generation
    sees the prompt."""
    head = prompt_text(tokenizer, prompt, template)
    full = render(tokenizer, prompt + completion, template)
    if not full.startswith(head):  # a template that rewrites earlier turns: the turn alone
        tail = "".join(m["content"] for m in completion)
        ends = sorted(stop_ids(tokenizer, template=template))
        return encode(tokenizer, head), encode(tokenizer, tail) + ends[:1]
    # trailing whitespace dropped, as training labels it (deltatune.lm.tokenize): SmolLM2's
    # <|im_end|> is scored, the newline after it is not
    return encode(tokenizer, head), encode(tokenizer, full[len(head):].rstrip())


def completion_logprobs(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                        batch_size: int = 8, adapters: Sequence[str | None] | None = None,
                        pad: int = 0, advance=None) -> list[torch.Tensor]:
    """Log-probability of each completion token given what precedes it, one (L,) tensor per
    ``(prompt_ids, completion_ids)`` pair."""
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    out: list[torch.Tensor] = []
    was_training = lm.training
    lm.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            ids, mask = left_pad([p + c for p, c in chunk], pad, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            k = max(len(c) for _, c in chunk)
            routes = None if adapters is None else list(adapters[start:start + batch_size])
            with torch.inference_mode(), routed(lm, routes):
                logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions,
                            logits_to_keep=k + 1).logits[:, :-1]  # (B, k, V): predict the last k
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, ids[:, -k:, None]).squeeze(-1)  # (B, k)
            out += [row[k - len(c):].cpu() for row, (_, c) in zip(picked, chunk)]
            if advance is not None:
                advance(len(chunk))
    finally:
        lm.train(was_training)
    return out


@dataclass
class Evaluation:
    """Metrics and one prediction row per example."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    data: Sequence[dict[str, Any]],
    *,
    adapters: str | Sequence[str | None] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    template: str | None = None,
    progress: bool = False,
) -> Evaluation:
    """Answer each chat example greedily and score it: ``exact_match`` (the answer equals the
    reference after :func:`normalize`) and ``completion_loss`` (mean token cross-entropy of the
    reference answer, end-of-turn token included, given the prompt). ``adapters`` routes examples
    as in :func:`~deltatune.lm.generate.generate`; by default an ``adapter`` field of the examples.
    """
    examples = list(data)
    if not examples:
        raise ValueError("no examples to evaluate")
    refs = [chat_reference(e) for e in examples]
    if adapters is None and any("adapter" in e for e in examples):
        adapters = [e.get("adapter") for e in examples]
    routes = [adapters] * len(examples) if isinstance(adapters, str) else adapters
    answers = generate(model, tokenizer, [p for p, _ in refs], adapters=routes,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                       progress=progress)
    pairs = [completion_ids(tokenizer, p, [{"role": "assistant", "content": a}], template)
             for p, a in refs]
    with progress_bar(progress, len(pairs), "loss") as advance:
        logps = completion_logprobs(model, pairs, batch_size=batch_size, adapters=routes,
                                    pad=_pad(tokenizer), advance=advance)
    rows, hits = [], 0
    for (prompt, ref), g, lp in zip(refs, answers, logps):
        hit = normalize(g.text) == normalize(ref)
        hits += hit
        rows.append({"prompt": prompt, "reference": ref, "prediction": g.text,
                     "exact_match": hit, "loss": float(-lp.mean()), "finish": g.finish,
                     **({"adapter": g.adapter} if g.adapter is not None else {})})
    tokens = sum(lp.numel() for lp in logps)
    metrics = {"exact_match": hits / len(rows),
               "completion_loss": float(-sum(lp.sum() for lp in logps) / max(tokens, 1)),
               "n": len(rows)}
    return Evaluation(metrics, rows)


def reward_accuracy(
    model: nn.Module,
    tokenizer: Any,
    data: Sequence[dict[str, Any]],
    beta: float = 0.1,
    *,
    batch_size: int = 8,
    template: str | None = None,
    progress: bool = False,
) -> Evaluation:
    """How often the chosen answer's implicit reward beats the rejected one's (DPO's reward
    accuracy, Rafailov et al., https://arxiv.org/abs/2305.18290): the reward of ``y`` is
    ``β·(log π(y|x) − log π_ref(y|x))``, π the model as it is, π_ref the model with its deltas
    disabled. Ties (as with no delta at all) count as misses. Metrics: ``reward_accuracy``,
    ``reward_margin`` (mean chosen − rejected), ``chosen_reward``, ``rejected_reward``, ``n``,
    and ``logprob_accuracy`` (how often log π(chosen|x) > log π(rejected|x): the model's own
    preference, meaningful for an untuned model too); a row per pair with its two rewards.
    """
    examples = list(data)
    if not examples:
        raise ValueError("no preference pairs to evaluate")
    pairs = []
    for e in examples:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in e]
        if missing:
            raise ChatError(f"a preference example lacks {missing}; it holds {sorted(e)}")
        prompt = e["prompt"] if isinstance(e["prompt"], list) else [
            {"role": "user", "content": str(e["prompt"])}]
        for side in ("chosen", "rejected"):
            turn = e[side] if isinstance(e[side], list) else [
                {"role": "assistant", "content": str(e[side])}]
            pairs.append(completion_ids(tokenizer, prompt, turn, template))
    from ..core.model import disabled

    with progress_bar(progress, 2 * len(pairs), "reward") as advance:
        policy = _sums(model, pairs, batch_size, tokenizer, advance)
        with disabled(causal_lm(model)):
            reference = _sums(model, pairs, batch_size, tokenizer, advance)
    reward = beta * (policy - reference)  # (2N,): chosen, rejected, chosen, ...
    chosen, rejected = reward[0::2], reward[1::2]
    rows = [{"prompt": e["prompt"], "chosen": e["chosen"], "rejected": e["rejected"],
             "chosen_reward": float(c), "rejected_reward": float(r), "correct": bool(c > r)}
            for e, c, r in zip(examples, chosen, rejected)]
    likelier = policy[0::2] > policy[1::2]  # the model itself finds chosen more likely
    metrics = {"reward_accuracy": float((chosen > rejected).float().mean()),
               "logprob_accuracy": float(likelier.float().mean()),
               "reward_margin": float((chosen - rejected).mean()),
               "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
               "n": len(examples)}
    return Evaluation(metrics, rows)


def _sums(model, pairs, batch_size, tokenizer, advance) -> torch.Tensor:
    logps = completion_logprobs(model, pairs, batch_size=batch_size, pad=_pad(tokenizer),
                                advance=advance)
    return torch.stack([lp.double().sum() for lp in logps])


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

