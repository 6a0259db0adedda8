"""Chat, text and preference collates (issue 20) on SmolLM2's real tokenizer and chat template: the
loss on the assistant's tokens only, packing that gives the unpacked loss, truncation counted."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import smol_tokenizer, tiny_chat_llama

from deltatune.lm.template import ChatError
from deltatune.lm.tokenize import (
    assistant_spans,
    chat_collate,
    pack_examples,
    preference_collate,
)

U, A, S = "user", "assistant", "system"
END = "<|im_end|>"


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CHAT = {"messages": [_msg(S, "You answer briefly."), _msg(U, "What is two plus two?"),
                     _msg(A, "Four."), _msg(U, "And three plus three?"), _msg(A, "Six.")]}
SHORT = [
    {"messages": [_msg(U, "Name a colour."), _msg(A, "Blue.")]},
    {"messages": [_msg(U, "Say hi in French."), _msg(A, "Bonjour !")]},
    {"text": "Plain text for continued pretraining, one short document."},
    CHAT,
    {"messages": [_msg(U, "Count to three."), _msg(A, "One, two, three.")]},
]


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


def _labelled(tok, batch, row: int = 0) -> list[str]:
    """The labelled stretches of a row, each decoded."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i  # labels are aligned with the inputs
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


# --- assistant-only labels ------------------------------------------------------------------------
def test_labels_cover_exactly_the_assistant_turns_and_their_end_token(tok):
    batch = chat_collate(tok, 512)([CHAT])
    assert _labelled(tok, batch) == ["Four." + END, "Six." + END]
    text, spans = assistant_spans(tok, CHAT["messages"])
    assert [text[a:b] for a, b in spans] == ["Four." + END, "Six." + END]
    # exactly the tokens inside the spans are labelled: every other token is -100
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(b > s and a < e for s, e in spans) for a, b in enc["offset_mapping"]]
    assert (batch["labels"][0] != -100).tolist() == inside
    assert batch["input_ids"][0].tolist() == enc["input_ids"]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_changing_a_user_token_changes_no_label(tok):
    other = copy.deepcopy(CHAT)
    other["messages"][1]["content"] = "What is two minus two?"  # one user token differs
    a, b = chat_collate(tok, 512)([CHAT]), chat_collate(tok, 512)([other])
    differ = a["input_ids"][0] != b["input_ids"][0]
    assert differ.sum() == 1 and (a["labels"][0][differ] == -100).all()
    assert torch.equal(a["labels"], b["labels"])
    # the model's loss on the assistant turns sees the user token only as context: the loss mask
    # (where labels are taken) is the same, and a label placed on that token would be ignored
    model = tiny_chat_llama()
    with torch.no_grad():
        logits = model(input_ids=a["input_ids"]).logits
    lab = a["labels"].clone()
    base = F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
    lab[0][differ] = 7  # what a wrong mask would add: the user token as a target
    assert not torch.isclose(
        base, F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum"))


def test_text_examples_learn_every_token_and_the_end(tok):
    batch = chat_collate(tok, 64)([{"text": "Hello world, this is text."}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids == tok("Hello world, this is text.")["input_ids"] + [tok.eos_token_id]
    assert labels == [-100] + ids[1:]  # the first token has nothing before it to predict it


def test_dynamic_right_padding(tok):
    col = chat_collate(tok, 512)
    batch = col(SHORT)
    lengths = [len(col.encode(e).input_ids) for e in SHORT]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    assert col.stats == {"examples": 10, "truncated": 0, "no_loss": 0}  # encode counts too


def test_user_template_and_template_errors(tok):
    plain = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}[assistant] {% endif %}")
    batch = chat_collate(tok, 64, template=plain)([SHORT[0]])
    assert tok.decode(batch["input_ids"][0]) == "[user] Name a colour.\n[assistant] Blue.\n"
    assert _labelled(tok, batch) == [" Blue."]  # the token holding the header's space too
    # a template that renders the last turn differently is not prefix-stable
    unstable = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}"
                "{% endfor %}")
    with pytest.raises(ChatError, match="not prefix-stable") as info:
        chat_collate(tok, 64, template=unstable)([CHAT])
    assert "--chat-template" in str(info.value) and "\n" not in str(info.value)
    hidden = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}" \
             "{% endif %}{% endfor %}"
    with pytest.raises(ChatError, match="does not render assistant message 1"):
        chat_collate(tok, 64, template=hidden)([SHORT[0]])
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ChatError, match="has no chat template; pass one with --chat-template"):
        chat_collate(bare, 64)([SHORT[0]])
    assert chat_collate(bare, 64)([SHORT[2]])["input_ids"].shape[0] == 1  # text needs none


@pytest.mark.parametrize("example,match", [
    ({"messages": [_msg(U, "hi")]}, "no assistant turn"),
    ({"messages": [_msg(U, "hi"), _msg("bot", "yo")]}, "unknown role 'bot'"),
    ({"prompt": [], "chosen": [], "rejected": []}, "use preference_collate"),
    ({"label": 1}, "takes chat ('messages') or text ('text') examples"),
])
def test_bad_examples_are_one_line(tok, example, match):
    with pytest.raises(ChatError, match=re.escape(match)) as info:
        chat_collate(tok, 64)([example])
    assert "\n" not in str(info.value)


# --- truncation -----------------------------------------------------------------------------------
def test_truncation_is_counted_never_dropped(tok):
    col = chat_collate(tok, 16)
    batch = col([CHAT, {"text": "A short text."}])
    assert batch["input_ids"].shape == (2, 16)  # kept, cut to max_length
    assert col.stats == {"examples": 2, "truncated": 1, "no_loss": 1}  # CHAT's answers fell off
    lengths = [len(chat_collate(tok, 512).encode(e).input_ids) for e in SHORT]
    packed = chat_collate(tok, 40, packing=True)
    batch = packed(SHORT)
    assert packed.stats["truncated"] == sum(n > 40 for n in lengths) > 0
    assert packed.stats["examples"] == len(SHORT) and batch["input_ids"].shape[1] <= 40
    assert int((batch["segment_ids"].amax(1)).sum()) == len(SHORT)  # every example is there


# --- packing --------------------------------------------------------------------------------------
def test_pack_examples_first_fit():
    assert pack_examples([5, 7, 3, 2, 6], 10) == [[0, 2, 3], [1], [4]]
    assert pack_examples([10, 1], 10) == [[0], [1]]
    with pytest.raises(ChatError, match="more than max_length=4"):
        pack_examples([3, 5], 4)


def test_packed_batch_keys(tok):
    col = chat_collate(tok, 160, packing=True)
    batch = col(SHORT)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids", "segment_ids"}
    plain = chat_collate(tok, 160)
    singles = [plain.encode(e) for e in SHORT]
    rows = pack_examples([len(e.input_ids) for e in singles], 160)
    assert batch["input_ids"].shape[0] == len(rows) == col.stats["rows"] < len(SHORT)
    for r, row in enumerate(rows):
        seg, pos = batch["segment_ids"][r].tolist(), batch["position_ids"][r].tolist()
        at = 0
        for k, i in enumerate(row, 1):
            n = len(singles[i].input_ids)
            assert seg[at : at + n] == [k] * n and pos[at : at + n] == list(range(n))
            assert batch["input_ids"][r, at : at + n].tolist() == singles[i].input_ids
            assert batch["labels"][r, at : at + n].tolist() == singles[i].labels
            assert batch["labels"][r, at] == -100  # each segment's first token: no target
            at += n
        assert set(seg[at:]) <= {0} and batch["attention_mask"][r].sum() == at


def segment_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, 1, T, T) mask of a packed batch: causal inside each segment, padding
    queries attending to themselves only (no empty softmax row)."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal & (segment_ids[:, :, None] > 0)) | torch.eye(t, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tok, impl):
    model = tiny_chat_llama().double()
    model.set_attn_implementation(impl)
    plain, packed = chat_collate(tok, 160)(SHORT), chat_collate(tok, 160, packing=True)(SHORT)
    assert packed["input_ids"].shape[0] < len(SHORT)
    with torch.no_grad():
        want = _loss_sum(model(input_ids=plain["input_ids"],
                               attention_mask=plain["attention_mask"]).logits, plain["labels"])
        mask = segment_mask(packed["segment_ids"], torch.float64)
        got = _loss_sum(model(input_ids=packed["input_ids"], attention_mask=mask,
                              position_ids=packed["position_ids"]).logits, packed["labels"])
        leaky = _loss_sum(model(input_ids=packed["input_ids"],
                                attention_mask=packed["attention_mask"],
                                position_ids=packed["position_ids"]).logits, packed["labels"])
    assert (plain["labels"] != -100).sum() == (packed["labels"] != -100).sum()
    assert abs(got.item() - want.item()) < 1e-5
    assert abs(leaky.item() - want.item()) > 1e-3  # attending across segments would differ


# --- preference -----------------------------------------------------------------------------------
PAIR = {"prompt": [_msg(S, "Be honest."), _msg(U, "Is the sky green?")],
        "chosen": [_msg(A, "No, it is usually blue.")], "rejected": [_msg(A, "Yes.")]}
PAIR2 = {"prompt": [_msg(U, "Capital of France?")], "chosen": [_msg(A, "Paris.")],
         "rejected": [_msg(A, "Lyon, I think.")]}


def test_preference_rows_chosen_over_rejected(tok):
    col = preference_collate(tok, 256)
    batch = col([PAIR, PAIR2])
    assert batch["input_ids"].shape[0] == 4 and set(batch) == {"input_ids", "attention_mask",
                                                                "labels"}
    assert [_labelled(tok, batch, r) for r in range(4)] == [
        ["No, it is usually blue." + END], ["Paris." + END], ["Yes." + END],
        ["Lyon, I think." + END]]
    chat = chat_collate(tok, 256)([{"messages": PAIR["prompt"] + PAIR["chosen"]}])
    n = int(chat["attention_mask"].sum())
    assert batch["input_ids"][0, :n].tolist() == chat["input_ids"][0, :n].tolist()
    assert col.stats == {"examples": 2, "truncated": 0, "no_loss": 0}


def test_preference_prompt_with_an_assistant_turn_is_not_learned(tok):
    pair = {"prompt": [_msg(U, "Hi"), _msg(A, "Hello!"), _msg(U, "Joke?")],
            "chosen": [_msg(A, "A pun.")], "rejected": [_msg(A, "No.")]}
    batch = preference_collate(tok, 256)([pair])
    assert _labelled(tok, batch, 0) == ["A pun." + END]
    assert _labelled(tok, batch, 1) == ["No." + END]


def test_preference_truncation_keeps_the_responses(tok):
    long = copy.deepcopy(PAIR)
    long["prompt"][1]["content"] = "Tell me: " + "is the sky green? " * 40
    full = preference_collate(tok, 1024)([long])
    n_chosen, n_rejected = full["attention_mask"].sum(1).tolist()
    col = preference_collate(tok, 48)
    batch = col([long])
    assert batch["input_ids"].shape[1] == 48 and col.stats["truncated"] == 1
    assert _labelled(tok, batch, 0) == ["No, it is usually blue." + END]
    assert _labelled(tok, batch, 1) == ["Yes." + END]
    # the same prompt tokens were dropped from both rows: their kept prompts are equal
    drop = n_chosen - 48
    assert batch["input_ids"][0].tolist() == full["input_ids"][0, drop:n_chosen].tolist()
    assert batch["input_ids"][1, : n_rejected - drop].tolist() == full["input_ids"][
        1, drop:n_rejected].tolist()


def test_preference_bad_examples(tok):
    with pytest.raises(ChatError, match="takes preference examples"):
        preference_collate(tok, 64)([{"messages": []}])
    bad = dict(PAIR, chosen=[_msg(U, "no answer")])
    with pytest.raises(ChatError, match="no assistant turn"):
        preference_collate(tok, 64)([bad])
