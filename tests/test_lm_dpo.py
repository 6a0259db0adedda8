"""DPO (deltatune.lm.objectives) against trl 1.16's own DPOTrainer on the same tiny Llama, batch
and LoRA weights: loss (sigmoid, ipo, hinge, and each with RPO's NLL term, trl's "sft" loss type),
rewards, reward accuracy and gradients; the reference is the same network with the trained adapter
off (or, after SFT, the frozen starting adapter, as trl's ``ref`` adapter)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_chat_llama

import deltatune as dt
from deltatune.lm.loss import sequence_logps
from deltatune.lm.objectives import (
    ObjectiveError,
    dpo,
    frozen_reference,
    make_objective,
    sft,
)
from deltatune.models.text import CausalLM

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

BETA = 0.1
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}


def _randomize(model, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapter(base, tmp, seed: int):
    """A LoRA on (a copy of) ``base`` with random weights, saved in peft's layout at ``tmp``."""
    lm = copy.deepcopy(base)
    dt.attach(lm, dt.LoRA(**LORA), name="default")
    _randomize(lm, seed)
    dt.save_adapter(lm, tmp, format="peft")
    return tmp


def _trainer(model, tmp, **kwargs):
    data = datasets.Dataset.from_dict({"prompt": ["hi"] * 2, "chosen": [" a"] * 2,
                                       "rejected": [" b"] * 2})
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), use_cpu=True, report_to="none", beta=BETA,
                         loss_type=["sigmoid"])
    return trl.DPOTrainer(model=model, args=args, train_dataset=data,
                          processing_class=smol_tokenizer(), **kwargs)


def _batch(seed: int = 0):
    """2 pairs, chosen rows over rejected rows; a shared 4-token prompt, right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 3000, (4, 10), generator=g)
    ids[2:, :4] = ids[:2, :4]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 7:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion *= mask
    ids = ids.masked_fill(mask == 0, smol_tokenizer().pad_token_id)
    trl_inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
    labels = ids.masked_fill(completion == 0, -100)
    return trl_inputs, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trl_loss(trainer, inputs, loss_type, rpo_alpha: float = 0.0):
    """trl's loss; RPO is trl 1.16's loss_type [loss_type, "sft"], loss_weights [1, alpha]."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    if rpo_alpha:
        trainer.loss_types, trainer.loss_weights = [loss_type, "sft"], [1.0, rpo_alpha]
    return trainer._compute_loss(trainer.model, inputs, False)


def _grad_norms(params) -> torch.Tensor:
    return torch.stack(sorted(p.grad.norm() for p in params))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours: CausalLM with a deltatune LoRA, trl's DPOTrainer with the same LoRA in peft)."""
    tmp = tmp_path_factory.mktemp("dpo")
    base = tiny_chat_llama(seed=1)
    path = _adapter(base, tmp / "adapter", seed=0)
    ours = CausalLM(copy.deepcopy(base))
    dt.load_adapter(ours.lm, path)
    trainer = _trainer(copy.deepcopy(base), tmp, peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(trainer.model, load_file(path / "adapter_model.safetensors"))
    assert list(trainer.model.peft_config) == ["default"]  # a new adapter: trl's ref = disabled
    return ours, trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl(pair, loss_type):
    ours, trainer = pair
    trl_inputs, batch = _batch()
    ours.zero_grad(set_to_none=True)
    trainer.model.zero_grad(set_to_none=True)
    expected = _trl_loss(trainer, trl_inputs, loss_type)
    got = dpo(ours, batch, beta=BETA, loss_type=loss_type)
    torch.testing.assert_close(got.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for ours_key, trl_key in [("rewards_chosen", "rewards/chosen"),
                              ("rewards_rejected", "rewards/rejected"),
                              ("reward_accuracy", "rewards/accuracies"),
                              ("reward_margin", "rewards/margins")]:
        assert float(got.metrics[ours_key]) == pytest.approx(logged[trl_key], abs=1e-5)
    expected.backward()
    got.loss.backward()
    trl_params = [p for p in trainer.model.parameters() if p.requires_grad]
    our_params = [p for p in ours.parameters() if p.requires_grad]
    assert len(trl_params) == len(our_params) == 8
    torch.testing.assert_close(_grad_norms(our_params), _grad_norms(trl_params),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type, rpo_alpha", [("sigmoid", 1.0), ("sigmoid", 0.3),
                                                   ("ipo", 0.5)])
def test_rpo_equals_trl(pair, loss_type, rpo_alpha):
    """RPO (DPO + alpha x the chosen answers' NLL) equals trl's DPOTrainer with the "sft" loss
    type weighted alpha: loss and gradients."""
    ours, trainer = pair
    trl_inputs, batch = _batch(3)
    ours.zero_grad(set_to_none=True)
    trainer.model.zero_grad(set_to_none=True)
    expected = _trl_loss(trainer, trl_inputs, loss_type, rpo_alpha)
    got = dpo(ours, batch, beta=BETA, loss_type=loss_type, rpo_alpha=rpo_alpha)
    plain = dpo(ours, batch, beta=BETA, loss_type=loss_type)
    assert float(got.loss.detach() - plain.loss) > 0.01  # the NLL term is there
    torch.testing.assert_close(got.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    expected.backward()
    got.loss.backward()
    trl_params = [p for p in trainer.model.parameters() if p.requires_grad]
    our_params = [p for p in ours.parameters() if p.requires_grad]
    torch.testing.assert_close(_grad_norms(our_params), _grad_norms(trl_params),
                               rtol=1e-4, atol=1e-7)


def test_rpo_term_is_the_sft_loss_of_the_chosen_answers(pair):
    """The NLL term is the SFT loss of the chosen rows alone (token mean over the batch)."""
    ours, _ = pair
    _, batch = _batch(4)
    with torch.no_grad():
        got = dpo(ours, batch, beta=BETA, rpo_alpha=2.0)
        plain = dpo(ours, batch, beta=BETA)
        chosen = sft(ours, {k: v[:2] for k, v in batch.items()})
    assert float(got.metrics["nll_chosen"]) == pytest.approx(float(chosen.loss), abs=1e-5)
    assert float(got.loss) == pytest.approx(float(plain.loss + 2.0 * chosen.loss), abs=1e-5)


def test_reference_is_the_base_with_the_adapter_off(pair):
    ours, _ = pair
    _, batch = _batch(1)
    with torch.no_grad():
        got = dpo(ours, batch, beta=BETA)
    base = copy.deepcopy(ours)  # a second network only to check the numbers
    dt.detach(base)
    labels = batch["labels"]
    with torch.no_grad():
        policy, _ = sequence_logps(ours.hidden(**batch), labels, ours.project)
        ref, _ = sequence_logps(base.hidden(**batch), labels, base.project)
    ratios = policy - ref
    margin = BETA * (ratios[:2] - ratios[2:])
    assert float(got.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(margin).mean()),
                                            abs=1e-6)
    assert float(got.metrics["rewards_chosen"]) == pytest.approx(float(BETA * ratios[:2].mean()),
                                                                 abs=1e-6)
    # a new adapter (LoRA's B = 0) is the reference itself: log 2, zero rewards
    fresh = copy.deepcopy(base)
    dt.attach(fresh, dt.LoRA(**LORA), name="default")
    out = dpo(fresh, batch, beta=BETA)
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(out.metrics["rewards_chosen"]) == 0.0 == float(out.metrics["reward_margin"])


def test_reference_after_sft_equals_trls_ref_adapter(tmp_path):
    """DPO from an existing adapter: trl copies it as 'ref'; deltatune loads it frozen."""
    base = tiny_chat_llama(seed=2)
    start = _adapter(base, tmp_path / "start", seed=1)
    moved = _adapter(base, tmp_path / "moved", seed=2)
    policy = peft.PeftModel.from_pretrained(copy.deepcopy(base), start, is_trainable=True)
    trainer = _trainer(policy, tmp_path)
    assert "ref" in trainer.model.peft_config  # trl's reference: the starting adapter
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(trainer.model, load_file(moved / "adapter_model.safetensors"))
    ours = CausalLM(copy.deepcopy(base))
    dt.load_adapter(ours.lm, moved)
    reference = frozen_reference(ours.lm, start)
    assert dt.active(ours) == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "reference" in n)
    trl_inputs, batch = _batch(2)
    expected = _trl_loss(trainer, trl_inputs, "sigmoid")
    got = dpo(ours, batch, beta=BETA, reference=reference)
    torch.testing.assert_close(got.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert dt.active(ours) == ["default"]  # the reference context restored the active delta


def test_bad_preference_batches_and_options():
    model = CausalLM(tiny_chat_llama(seed=3))
    dt.attach(model, dt.LoRA(**LORA), name="default")
    _, batch = _batch()
    odd = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ObjectiveError, match="odd number"):
        dpo(model, odd)
    with pytest.raises(ObjectiveError, match="unknown DPO loss 'kto'"):
        make_objective("dpo", loss_type="kto")
    with pytest.raises(ObjectiveError, match="unknown objective 'ppo'"):
        make_objective("ppo")
    for bad in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(ObjectiveError, match="rpo_alpha .*: use a finite number >= 0"):
            dpo(model, batch, rpo_alpha=bad)
        with pytest.raises(ObjectiveError, match="rpo_alpha"):
            make_objective("dpo", rpo_alpha=bad)
    sums = make_objective("dpo").sums(model, batch)
    metrics = make_objective("dpo").metrics(sums)
    assert metrics["pairs"] == 2 and metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
