"""The chunked LM loss (deltatune.lm.loss) equals the whole-batch cross-entropy, loss and gradients,
and the causal-LM wrapper (models.text.CausalLM): plain logits, hidden + head, packed rows."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_chat_llama
from torch import nn

import deltatune as dt
from deltatune.lm.loss import LossError, eval_sums, lm_loss, sequence_logps, token_logps
from deltatune.models.text import CausalLM, packed_mask, segment_positions
from deltatune.train.losses import compute_loss
from deltatune.train.losses import eval_sums as full_eval_sums

B, T, H, V = 3, 11, 16, 50


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    labels[2, 5] = -100  # a hole
    return hidden, head, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_loss_and_grads_equal_full_logits(chunk):
    hidden, head, labels = _case()
    full = compute_loss(head(hidden), labels, "causal-lm")
    g_full = _grads(full, hidden, head.weight)
    chunked = lm_loss(hidden, labels, head, chunk)
    g_chunked = _grads(chunked, hidden, head.weight)
    assert abs(float(chunked.detach() - full.detach())) < 1e-5
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_eval_sums_and_sequence_logps_equal_full_logits():
    hidden, head, labels = _case(1)
    with torch.no_grad():
        logits = head(hidden)
    torch.testing.assert_close(
        eval_sums(hidden, labels, head, 5), full_eval_sums(logits, labels, "causal-lm"),
        atol=1e-5, rtol=0,
    )
    sums, counts = sequence_logps(hidden, labels, head, 4)
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    per = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * keep
    torch.testing.assert_close(sums, per.sum(1), atol=1e-5, rtol=0)
    assert counts.tolist() == keep.sum(1).tolist()


def test_nothing_labelled_gives_zero_with_a_graph_and_bad_shapes_one_line():
    hidden, head, labels = _case()
    loss = lm_loss(hidden, torch.full_like(labels, -100), head)
    loss.backward()
    assert float(loss) == 0.0 and hidden.grad is not None
    with pytest.raises(LossError, match=r"causal-lm needs logits \(batch, time, vocab\)"):
        lm_loss(hidden[:, 0], labels, head)
    with pytest.raises(LossError, match="chunk_size"):
        token_logps(hidden, labels, head, 0)


def test_training_keeps_no_chunk_logits_for_backward():
    """Nothing of (positions x vocab) size is saved for backward: chunks are recomputed."""
    hidden, head, labels = _case()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(hidden, labels, head, 4)
    assert max(saved) < 4 * V  # one chunk's logits would be 4 x V
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        compute_loss(head(hidden), labels, "causal-lm")
    assert max(saved) >= B * (T - 1) * V  # the whole-batch loss keeps the logits
    loss.backward()


# -- the causal-LM wrapper ------------------------------------------------------------------------
def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(5, 2000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wrapped():
    return CausalLM(tiny_chat_llama(seed=3))


def test_causal_lm_logits_equal_the_transformers_model(wrapped):
    ids = torch.stack([_ids(0, 9), _ids(1, 9)])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = wrapped.lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(wrapped(ids, mask), ref, atol=1e-5, rtol=0)
    hidden = wrapped.hidden(ids, mask)
    assert hidden.shape == (2, 9, wrapped.lm.config.hidden_size)
    torch.testing.assert_close(wrapped.project(hidden), ref, atol=1e-5, rtol=0)
    assert wrapped.head is wrapped.lm.lm_head


def test_segment_positions_and_packed_mask():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 0, 1]]
    mask = packed_mask(seg, torch.float32)
    assert mask.shape == (2, 1, 6, 6)
    allowed = (mask[:, 0] == 0).int()
    assert allowed[0].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only: no all-masked row (NaN in softmax)
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_the_examples_alone(wrapped, attn):
    wrapped.lm.config._attn_implementation = attn
    try:
        a, b = _ids(2, 5), _ids(3, 4)
        ids = torch.cat([a, b, torch.zeros(2, dtype=torch.long)])[None]  # (1, 11): a, b, padding
        seg = torch.tensor([[1] * 5 + [2] * 4 + [0] * 2])
        pos = segment_positions(seg)
        packed = wrapped(ids, position_ids=pos, segment_ids=seg)
        assert torch.isfinite(packed).all()
        torch.testing.assert_close(packed[0, :5], wrapped(a[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[0, 5:9], wrapped(b[None])[0], atol=1e-5, rtol=0)
        # position ids are derived from the segments when the batch has none
        torch.testing.assert_close(wrapped(ids, segment_ids=seg), packed, atol=0, rtol=0)
    finally:
        wrapped.lm.config._attn_implementation = "sdpa"


def test_chunked_loss_through_a_delta_on_the_head():
    """A delta on lm_head (the host replacing it) still applies: gradients match full logits."""
    model = CausalLM(tiny_chat_llama(seed=4))
    dt.attach(model, dt.LoRA(r=2, targets=["q_proj", "lm_head"]), name="default")
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad:  # lora_B starts at 0: make the delta visible
            with torch.no_grad():
                p.normal_(0, 0.05)
    assert model.head is model.lm.lm_head and not isinstance(model.head, nn.Linear)  # the host
    ids = torch.stack([_ids(5, 8), _ids(6, 8)])
    labels = ids.clone()
    labels[0, :3] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    full = compute_loss(model(ids), labels, "causal-lm")
    g_full = torch.autograd.grad(full, params)
    chunked = lm_loss(model.hidden(ids), labels, model.project, 5)
    g_chunked = torch.autograd.grad(chunked, params)
    assert abs(float(chunked.detach() - full.detach())) < 1e-5
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with dt.disabled(model):
        base = model(ids)
    assert not torch.allclose(base, model(ids))  # the head's delta changes the logits
