"""Chat, text and preference examples → token batches, with the loss on the assistant's tokens only.

A conversation is rendered with the model's chat template (or the user's, ``--chat-template``) and
tokenized once; the assistant turns are found as character spans of that text — the turn ``i``
span runs from the end of ``messages[:i]`` rendered with the generation prompt to the end of
``messages[:i+1]`` (trailing whitespace dropped, so SmolLM2's ``<|im_end|>`` is learned and the
newline after it is not) — and mapped to tokens through the tokenizer's offsets. A template under
which those renders are not prefixes of the whole conversation is refused (:class:`ChatError`).

Labels are aligned with the inputs (the loss shifts them) and -100 off the assistant spans; the
first token of every example is -100 too: nothing precedes it in its example, so in a packed row it
would be predicted across the boundary from the previous example.

Too-long examples are truncated, never dropped: a chat or text example keeps its first
``max_length`` tokens; a preference pair loses the start of its prompt (the same number of tokens
from the chosen and the rejected row) so the responses survive, then, if a response alone is too
long, its end. Each collate counts in ``stats``: ``examples`` (encoded), ``truncated``,
``no_loss`` (examples left without a labelled token) and, when packing, ``rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..data.chat import conversation_problem
from .template import ChatError, render

IGNORE = -100


class Encoded(NamedTuple):
    """One tokenized example: ``input_ids`` and ``labels`` (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], template: str | None = None, *, start: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's chat text and the character spans ``[a, b)`` of its assistant turns from
    message ``start`` on (a preference row's responses follow its prompt)."""
    problem = conversation_problem(messages, start=start)
    if problem:
        raise ChatError(f"cannot train on this conversation: {problem}")
    full = render(tokenizer, messages, template)
    spans = []
    for i in range(start, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ChatError(
                "the chat template is not prefix-stable (rendering the conversation turn by "
                f"turn changes earlier text, at message {i}), so the assistant's tokens cannot be "
                "found; pass a template that renders past turns unchanged with --chat-template FILE"
            )
        end = len(upto.rstrip())
        if messages[i]["content"].strip() not in full[len(head) : end]:
            raise ChatError(
                f"the chat template does not render assistant message {i}'s text after the "
                "generation prompt; pass a template that does with --chat-template FILE"
            )
        spans.append((len(head), end))
    return full, spans


def _label_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> Encoded:
    """``text`` tokenized as is (the template holds the special tokens), labels on the tokens that
    overlap ``spans``."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        raise ChatError("finding the assistant's tokens needs a fast tokenizer (tokenizer.json); "
                        "load the model's tokenizer with use_fast=True") from None
    ids, labels, k = list(enc["input_ids"]), [], 0
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):  # spans and offsets both ascend
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        inside = k < len(spans) and b > spans[k][0] and a < spans[k][1]
        labels.append(tok if inside else IGNORE)
    return Encoded(ids, labels)


def _first_ignored(enc: Encoded) -> Encoded:
    return Encoded(enc.input_ids, [IGNORE] + enc.labels[1:]) if enc.labels else enc


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit: the indices of ``lengths`` grouped into rows of at most ``max_length``
    tokens, each item in the first row with room (rows and their items keep the given order).

    Usable outside a collate, e.g. to pack a whole epoch once: encode every example with
    ``collate.encode``, pack the lengths, and build batches of rows with ``collate.packed``.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ChatError(f"example {i} has {n} tokens, more than max_length={max_length}; "
                            "truncate it first (collate.encode does)")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([i])
            room.append(max_length - n)
        else:
            rows[j].append(i)
            room[j] -= n
    return rows


def _padded(rows: list[dict[str, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Rows of token lists (``input_ids``, ``labels``, ...) right-padded to the longest into
    (B, T) long tensors, with ``attention_mask`` (1 on the tokens, 0 on the padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    fills = {"input_ids": pad, "labels": IGNORE}  # position_ids, segment_ids: 0
    out: dict[str, list[list[int]]] = {"attention_mask": []}
    for r in rows:
        fill = width - len(r["input_ids"])
        out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * fill)
        for k, v in r.items():
            out.setdefault(k, []).append(v + [fills.get(k, 0)] * fill)
    return {k: torch.tensor(out[k], dtype=torch.long) for k in [*rows[0], "attention_mask"]}


class _Collate:
    """What the chat and preference collates share: tokenizer, max_length, template, stats."""

    def __init__(self, tokenizer: Any, max_length: int, template: str | None) -> None:
        if max_length < 2:
            raise ChatError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        self.stats: dict[str, int] = {"examples": 0, "truncated": 0, "no_loss": 0}
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def _count(self, cut: bool, *rows: Encoded) -> list[Encoded]:
        """One example's rows (first labels ignored), counted in stats."""
        out = [_first_ignored(e) for e in rows]
        self.stats["examples"] += 1
        self.stats["truncated"] += int(cut)
        self.stats["no_loss"] += int(any(all(x == IGNORE for x in e.labels) for e in out))
        return out

    def _padded(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        return _padded([{"input_ids": e.input_ids, "labels": e.labels} for e in rows], self.pad)

    def _chat(self, messages: list[dict[str, str]], start: int = 0) -> Encoded:
        text, spans = assistant_spans(self.tokenizer, messages, self.template, start=start)
        return _label_spans(self.tokenizer, text, spans)


class ChatCollate(_Collate):
    """Chat (``{"messages"}``) and plain-text (``{"text"}``) examples → a batch (see
    :func:`chat_collate`)."""

    def __init__(self, tokenizer: Any, max_length: int, template: str | None,
                 packing: bool) -> None:
        super().__init__(tokenizer, max_length, template)
        self.packing = packing
        if packing:
            self.stats["rows"] = 0

    def encode(self, example: dict[str, Any]) -> Encoded:
        """One example tokenized, labelled and truncated to ``max_length`` (counted in stats)."""
        if "messages" in example:
            enc = self._chat(example["messages"])
        elif "text" in example and isinstance(example["text"], str):
            ids = list(self.tokenizer(example["text"])["input_ids"])
            eos = self.tokenizer.eos_token_id
            if eos is not None and ids[-1:] != [eos]:
                ids.append(eos)  # the end of the document is learned too (and marks it in a row)
            enc = Encoded(ids, list(ids))
        else:
            fields = ", ".join(repr(k) for k in example) or "no fields"
            hint = "; use preference_collate" if "chosen" in example else ""
            raise ChatError(f"this collate takes chat ('messages') or text ('text') examples; "
                            f"the data holds {fields}{hint}")
        cut = len(enc.input_ids) > self.max_length
        if cut:
            enc = Encoded(enc.input_ids[: self.max_length], enc.labels[: self.max_length])
        return self._count(cut, enc)[0]

    def padded(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Encoded examples, one per row, right-padded: ``input_ids``, ``attention_mask``,
        ``labels``."""
        return self._padded(encoded)

    def packed(self, rows: list[list[Encoded]]) -> dict[str, torch.Tensor]:
        """Encoded examples packed as given (each inner list one row, at most ``max_length``
        tokens): adds ``position_ids`` (from 0 in each example) and ``segment_ids`` (1, 2, ... per
        example, 0 for padding)."""
        built = []
        for row in rows:
            ids, labels, pos, seg = [], [], [], []
            for k, e in enumerate(row, 1):
                ids += e.input_ids
                labels += e.labels
                pos += range(len(e.input_ids))
                seg += [k] * len(e.input_ids)
            if len(ids) > self.max_length:
                raise ChatError(f"a packed row holds {len(ids)} tokens, more than max_length="
                                f"{self.max_length}; group the examples with pack_examples")
            built.append(
                {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}
            )
        self.stats["rows"] = self.stats.get("rows", 0) + len(built)
        return _padded(built, self.pad)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ChatError("an empty batch; give the collate at least one example")
        encoded = [self.encode(e) for e in examples]
        if not self.packing:
            return self.padded(encoded)
        bins = pack_examples([len(e.input_ids) for e in encoded], self.max_length)
        return self.packed([[encoded[i] for i in row] for row in bins])


def chat_collate(tokenizer: Any, max_length: int, *, template: str | None = None,
                 packing: bool = False) -> ChatCollate:
    """A collate for chat (``{"messages"}``: loss on the assistant's tokens, end-of-turn token
    included) and plain-text (``{"text"}``: loss on every token, an end-of-sequence token appended)
    examples: ``input_ids``, ``attention_mask``, ``labels`` (B, T), right-padded to the longest.

    ``packing``: the batch's examples go first-fit into rows of at most ``max_length`` tokens, and
    the batch adds ``position_ids`` and ``segment_ids`` (the model must keep attention inside a
    segment; see :mod:`deltatune.lm`). ``template``: a Jinja chat template overriding the model's.
    """
    return ChatCollate(tokenizer, max_length, template, packing)


class PreferenceCollate(_Collate):
    """Preference examples → chosen rows over rejected rows (see :func:`preference_collate`)."""

    def encode(self, example: dict[str, Any]) -> tuple[Encoded, Encoded]:
        """The chosen and the rejected row, truncated together (counted once in stats)."""
        if not all(k in example for k in ("prompt", "chosen", "rejected")):
            fields = ", ".join(repr(k) for k in example) or "no fields"
            raise ChatError("this collate takes preference examples ('prompt', 'chosen', "
                            f"'rejected'); the data holds {fields}")
        prompt = example["prompt"]
        pair = [self._chat(prompt + example[k], start=len(prompt)) for k in ("chosen", "rejected")]
        # the prompt: the tokens before the first labelled one (the same text in both rows)
        heads = [next((i for i, x in enumerate(e.labels) if x != IGNORE), 0) for e in pair]
        over = max(len(e.input_ids) for e in pair) - self.max_length
        if over > 0:
            out = []
            for e, head in zip(pair, heads):
                drop = min(over, head)  # the prompt's start goes first, then the response's end
                ids = e.input_ids[drop:][: self.max_length]
                out.append(Encoded(ids, e.labels[drop:][: self.max_length]))
            pair = out
        chosen, rejected = self._count(over > 0, *pair)
        return chosen, rejected

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ChatError("an empty batch; give the collate at least one example")
        pairs = [self.encode(e) for e in examples]
        return self._padded([p[0] for p in pairs] + [p[1] for p in pairs])


def preference_collate(tokenizer: Any, max_length: int, *,
                       template: str | None = None) -> PreferenceCollate:
    """A collate for preference examples (``{"prompt", "chosen", "rejected"}`` message lists):
    ``input_ids``, ``attention_mask``, ``labels`` (2B, T), the chosen rows ``[0, B)`` over the
    rejected rows ``[B, 2B)``, labels on the response's assistant tokens only. A too-long pair
    loses its prompt's first tokens (both rows alike) so the responses survive."""
    return PreferenceCollate(tokenizer, max_length, template)


__all__ = [
    "ChatCollate", "Encoded", "PreferenceCollate", "assistant_spans", "chat_collate",
    "pack_examples", "preference_collate",
]
