"""AdaLoRA and IncreLoRA: numerical parity with peft (files and the allocation schedule), the
schedules' invariants, export to plain LoRA, and bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.budget import (
    AdaLoRASchedule,
    BudgetError,
    IncreLoRASchedule,
    allocation_of,
    enforce_ranks,
    final_ranks,
    to_lora,
)
from deltatune.core.host import get_module, iter_hosts
from deltatune.train import TrainConfig, fit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["query", "value", "intermediate.dense"]
IDS = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 1])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def _logits(model):
    """The last hidden states (the tiny classifier's logits are too small to show a difference)."""
    with torch.no_grad():
        return model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]


def _peft_adalora(base, **config):
    cfg = {
        "init_r": 4,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 2,
        "deltaT": 1,
        "total_step": 10,
        "lora_alpha": 8,
        "target_modules": TARGETS,
    }
    return peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**{**cfg, **config}))


def _train_peft(pm, steps, lr=0.5):
    """peft's own loop; AdaLoraModel.forward adds its orthogonality penalty to ``outputs.loss``
    (PeftModel.forward without a task type bypasses it, so the tuner model is called)."""
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    masks = []
    for step in range(1, steps + 1):
        pm.base_model(input_ids=IDS, labels=LABELS).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
        masks.append(
            {n: (p.detach().view(-1) != 0) for n, p in pm.named_parameters() if "lora_E" in n}
        )
    return masks


def test_peft_adapter_loads_and_matches_both_ways(tmp_path):
    base = _bert()
    pm = _peft_adalora(base)
    _train_peft(pm, 10)  # ends pruned: per-module ranks differ, peft stores only the kept triplets
    pm.eval()
    g = torch.Generator().manual_seed(2)
    with (
        torch.no_grad()
    ):  # ten small steps barely move the outputs: give the kept triplets large values
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.where(p != 0, torch.randn(p.shape, generator=g), p))
            elif "lora_A" in n or "lora_B" in n:
                p.mul_(15)
    y_peft = _logits(pm)
    assert (y_peft - _logits(base)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "from_peft")
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "from_peft", name="ada")
    assert isinstance(dt.get_spec(ours, "ada"), dt.AdaLoRA)
    ranks = final_ranks(ours, "ada")
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1, ranks
    assert (_logits(ours) - y_peft).abs().max() <= 1e-5

    dt.save_adapter(ours, tmp_path / "from_dt", name="ada", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_dt").eval()
    with torch.no_grad():
        assert (_logits(back) - y_peft).abs().max() <= 1e-5
    # and deltatune's own format round-trips bit for bit, mask included
    dt.save_adapter(ours, tmp_path / "dt", name="ada")
    again = copy.deepcopy(base)
    dt.load_adapter(again, tmp_path / "dt")
    assert torch.equal(_logits(again), _logits(ours)) and final_ranks(again, "ada") == ranks


def test_peft_adapter_with_a_trained_head_matches_both_ways(tmp_path):
    base = _bert()
    pm = _peft_adalora(base, modules_to_save=["classifier"])
    _train_peft(pm, 10)
    pm.eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        y = pm(input_ids=IDS).logits
        assert (y - base(input_ids=IDS).logits).abs().max() > 1e-1
    pm.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "p")
    assert dt.get_spec(ours, "default").trainable_modules == ("classifier",)
    dt.save_adapter(ours, tmp_path / "d", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "d").eval()
    with torch.no_grad():
        assert (ours(input_ids=IDS).logits - y).abs().max() <= 1e-5
        assert (back(input_ids=IDS).logits - y).abs().max() <= 1e-5


def _copy_from_peft(ours, pm):
    """Start deltatune's AdaLoRA from peft's random P, Q (λ = 0 in both)."""
    theirs = {
        n.replace("base_model.model.", "").replace(".default", ""): p
        for n, p in pm.named_parameters()
        if "lora_" in n
    }
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                key = n.replace(".deltas.ada.", ".").replace(".base.", ".")
                p.copy_(theirs[key])
    return theirs


def test_schedule_matches_peft_update_and_allocate_step_by_step():
    base = _bert(torch.float64)  # float64: near-threshold scores cannot flip between the two codes
    pm = _peft_adalora(base, orth_reg_weight=0.1)
    ours = copy.deepcopy(base)
    dt.attach(
        ours,
        dt.AdaLoRA(
            init_r=4,
            target_r=2,
            tinit=2,
            tfinal=2,
            total_step=10,
            orth_reg_weight=0.1,
            targets=TARGETS,
        ),
        "ada",
    )
    _copy_from_peft(ours, pm)
    peft_masks = _train_peft(pm, 10)

    sched = AdaLoRASchedule("ada")
    sched.on_train_start(ours)
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    budgets = []
    for step in range(1, 11):
        out = ours(input_ids=IDS).logits
        loss = F.cross_entropy(out, LABELS) + sched.penalty(ours, {}, out)
        loss.backward()
        opt.step()
        opt.zero_grad(
            set_to_none=True
        )  # as the trainer does, before on_step_end: the tap keeps the gradient
        sched.on_step_end(ours, step)
        budgets.append(sched.budget_schedule(step)[0])
        for n, mask in peft_masks[step - 1].items():
            path = n.replace("base_model.model.", "").replace(".lora_E.default", "")
            d = get_module(ours, path).part("ada")
            assert torch.equal(d.lora_E.detach().view(-1) != 0, mask), (step, path)
    sched.on_train_end(ours)
    theirs = {
        n.replace("base_model.model.", "").replace(".default", ""): p
        for n, p in pm.named_parameters()
        if "lora_" in n
    }
    for n, p in ours.named_parameters():
        if "lora_" in n:
            assert torch.allclose(
                p, theirs[n.replace(".deltas.ada.", ".").replace(".base.", ".")], atol=1e-9
            ), n
    # the cubic schedule: constant during tinit, never rising, the target (2 × 6 modules)
    # from total − tfinal on
    assert (
        budgets[:2] == [24, 24]
        and all(a >= b for a, b in itertools.pairwise(budgets))
        and budgets[7:] == [12] * 3
    )
    assert sched.live_rank() == 12 and [h[2] for h in sched.history] == [
        h[1] for h in sched.history
    ]


def _tiny_task(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.head = (
            nn.Linear(12, 24),
            nn.Linear(24, 24),
            nn.Linear(24, 16),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def _collate(batch):
    return {
        "x": torch.stack([b["x"] for b in batch]),
        "labels": torch.stack([b["labels"] for b in batch]),
    }


def _fit(model, callbacks, steps):
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=8,
        lr=1e-2,
        progress=False,
        eval_each_epoch=False,
        keep_best=False,
    )
    return fit(model, _tiny_task(), _collate, cfg, callbacks=callbacks)


class Recorder:
    def __init__(self, name):
        self.name, self.ranks = name, []

    def on_step_end(self, model, step):
        self.ranks.append(final_ranks(model, self.name))


def test_adalora_in_the_trainer_reaches_the_target_and_exports_a_plain_lora(tmp_path):
    model = Net()
    dt.attach(model, dt.AdaLoRA(init_r=6, target_r=2, tinit=3, tfinal=4, delta_t=2, total_step=20,
                                targets=["fc1", "fc2", "fc3"], trainable_modules=["head"]), "ada")
    sched, rec = AdaLoRASchedule("ada"), Recorder("ada")
    _fit(model, [sched, rec], 20)
    totals = [sum(r.values()) for r in rec.ranks]
    assert totals[-1] == 2 * 3 and totals[0] == 18
    assert all(a >= b for a, b in itertools.pairwise(totals)), "the total rank only shrinks"
    assert rec.ranks[-4:] == [rec.ranks[-1]] * 4, "the pattern is frozen after total_step - tfinal"
    for _, host in iter_hosts(model):
        if "ada" in host.delta_names() and hasattr(host.part("ada"), "rank_mask"):
            d = host.part("ada")
            assert torch.all(d.lora_E[~d.rank_mask] == 0), "masked singular values are zero"
    alloc = allocation_of(model, "ada", sched.scores)
    assert [r.rank for r in alloc.rows] == list(final_ranks(model, "ada").values())
    x = torch.stack([e["x"] for e in _tiny_task(8)])
    with torch.no_grad():
        y = model(x)
        name = to_lora(model, "ada")
        assert torch.allclose(model(x), y, atol=1e-5), "the exported LoRA equals the AdaLoRA"
    dt.detach(model, "ada")
    dt.save_adapter(model, tmp_path / "lora", name=name)
    fresh = Net()
    dt.load_adapter(fresh, tmp_path / "lora")
    spec = dt.get_spec(fresh, name)
    assert isinstance(spec, dt.LoRA) and sorted(spec.rank_pattern.values()) == sorted(
        r for r in rec.ranks[-1].values() if r
    )
    with torch.no_grad():
        assert torch.allclose(fresh(x), y, atol=1e-5)


def test_adalora_stopped_early_is_pruned_to_the_target_with_a_warning():
    model = Net()
    dt.attach(
        model, dt.AdaLoRA(init_r=4, target_r=1, total_step=100, targets=["fc1", "fc2"]), "ada"
    )
    sched = AdaLoRASchedule("ada")
    with pytest.warns(UserWarning, match="before AdaLoRA's final allocation"):
        _fit(model, [sched], 5)
    assert sum(final_ranks(model, "ada").values()) == 2


class Saboteur:
    """Wrecks the head after step ``after``: every later evaluation is worse than the earlier ones,
    so an unrestricted best-state choice picks one from before AdaLoRA's final allocation."""

    def __init__(self, after, name):
        self.after, self.name = after, name

    def on_step_end(self, model, step):
        if step > self.after:
            with torch.no_grad():
                w = model.head.part(self.name).weight  # the trained copy of the head
                w.fill_(-50.0)
                w[0] = 50.0  # every prediction class 0, confidently


def test_keep_best_restores_no_state_from_before_the_final_allocation():
    """Issue 22's root fix: with keep_best, the trainer restored the best evaluation even when it
    came before AdaLoRA's final allocation, reviving pruned triplets beyond the budget; now only
    evaluations from the final allocation on are candidates (AdaLoRASchedule.keeps_best)."""
    from deltatune.budget.adalora import svd_deltas

    model = Net()
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=1, tinit=6, tfinal=10, delta_t=1, total_step=24,
                                targets=["fc1", "fc2", "fc3"], trainable_modules=["head"]), "ada")
    cfg = TrainConfig(max_steps=24, batch_size=8, lr=1e-2, progress=False, metric="loss")
    # 64 examples: evaluations at step 8 (6 triplets live, before the final allocation at 14),
    # 16 and 24 (3 live, a wrecked head)
    data = _tiny_task()
    result = fit(model, data, _collate, cfg, eval_data=data,
                 callbacks=[AdaLoRASchedule("ada"), Saboteur(14, "ada")])
    assert result.final["step"] == 24 and result.best, "an evaluation after the allocation is kept"
    assert result.best["step"] >= 14, "the best state is one from the final allocation on"
    for d in svd_deltas(model, "ada").values():
        assert torch.all(d.lora_E[~d.rank_mask] == 0), "a pruned triplet was restored"
    assert enforce_ranks(model, "ada") == 0 and sum(final_ranks(model, "ada").values()) == 3


def test_a_callback_that_vetoes_every_state_leaves_the_last_one():
    """keeps_best returning False everywhere: no state is restored, the model ends as trained."""

    class Never:
        def keeps_best(self, model, step):
            return False

    model = Net()
    dt.attach(model, dt.LoRA(r=2, targets=["fc1"], trainable_modules=["head"]), "lora")
    cfg = TrainConfig(max_steps=16, batch_size=8, lr=1e-2, progress=False, metric="loss")
    data = _tiny_task()
    result = fit(
        model, data, _collate, cfg, eval_data=data, callbacks=[Never(), Saboteur(0, "lora")]
    )
    assert result.best == {} and result.final["step"] == 16
    assert torch.all(model.head.part("lora").weight[1:] == -50.0), "the last state is kept"


def test_enforce_ranks_prunes_triplets_that_a_best_state_restore_revived():
    """keep_best restores λ saved before the final allocation (issue 22): the pruned triplets would
    be live again beyond the budget that rank_mask shows; enforce_ranks zeroes them."""
    from deltatune.budget.adalora import svd_deltas

    model = Net()
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=1, total_step=10, targets=["fc1", "fc2"]), "ada")
    x = torch.stack([e["x"] for e in _tiny_task(4)])
    with torch.no_grad():
        for d in svd_deltas(model, "ada").values():  # as restored: every λ non-zero, mask of 1
            d.lora_E.copy_(torch.tensor([[0.5], [0.4], [0.3], [0.2]]))
            d.rank_mask.copy_(torch.tensor([True, False, False, False]))
        before = model(x)
    assert enforce_ranks(model, "ada") == 2 * 3 and sum(final_ranks(model, "ada").values()) == 2
    for d in svd_deltas(model, "ada").values():
        assert d.lora_E.view(-1).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    with torch.no_grad():
        assert not torch.allclose(model(x), before), "the revived triplets were live"
    assert enforce_ranks(model, "ada") == 0


def test_increlora_grows_within_budget_without_output_jumps():
    model = Net()
    costs = {"fc1": 12 + 24 + 1, "fc2": 24 + 24 + 1, "fc3": 24 + 16 + 1}
    budget = (
        sum(costs.values()) + 4 * costs["fc2"]
    )  # init rank 1 everywhere, then about four more triplets
    dt.attach(model, dt.IncreLoRA(init_r=1, max_r=4, budget=budget, delta_t=2, grow_per_step=2,
                                  targets=list(costs)), "inc")
    x = torch.stack([e["x"] for e in _tiny_task(8)])

    class Probe:
        """Runs the schedule's growth inside its own step hook, to see the output on both sides of
        it."""

        def __init__(self, sched):
            self.sched, self.ranks, self.jumps, self.used = sched, [], [], []

        def on_train_start(self, model):
            self.sched.on_train_start(model)

        def penalty(self, model, batch, outputs):
            return self.sched.penalty(model, batch, outputs)

        def on_step_end(self, model, step):
            with torch.no_grad():
                before, ranks = model(x), final_ranks(model, "inc")
                self.sched.on_step_end(model, step)
                after, new = model(x), final_ranks(model, "inc")
            if new != ranks:
                self.jumps.append((after - before).abs().max().item())
            self.ranks.append(new)
            self.used.append(self.sched.used())

        def on_train_end(self, model):
            self.sched.on_train_end(model)

    probe = Probe(IncreLoRASchedule("inc"))
    _fit(model, [probe], 16)
    assert probe.jumps and max(probe.jumps) == 0.0, "a grown triplet starts at zero contribution"
    assert all(u <= budget for u in probe.used) and probe.used[-1] > sum(costs.values())
    for a, b in itertools.pairwise(probe.ranks):
        assert all(b[p] >= a[p] for p in a), "ranks only grow"
    assert budget - probe.used[-1] < max(costs.values()) or all(
        r == 4 for r in probe.ranks[-1].values()
    )


def test_increlora_gates_inactive_triplets_and_the_optimizer_keeps_its_state():
    model = Net()
    dt.attach(model, dt.IncreLoRA(init_r=1, max_r=3, target_r=2, targets=["fc2"]), "inc")
    d = get_module(model, "fc2").part("inc")
    with torch.no_grad():
        d.lora_E.fill_(1.0)  # inactive slots hold values, yet contribute nothing
    x = torch.randn(4, 12)
    model(x).sum().backward()
    assert torch.all(d.lora_E.grad[1:] == 0) and d.lora_E.grad[0].abs().sum() > 0
    ids = {id(p) for p in d.parameters()}
    d.rank_mask[1] = (
        True  # growth switches a slot on: the same Parameter objects, no new optimizer state
    )
    assert {id(p) for p in d.parameters()} == ids and d.rank == 2


def test_bad_input_is_one_line_and_names_the_problem():
    with pytest.raises(
        dt.SpecError, match=r"AdaLoRA.target_r=9 must be an integer in \[1, init_r=4\]"
    ):
        dt.AdaLoRA(init_r=4, target_r=9)
    with pytest.raises(dt.SpecError, match="AdaLoRA.total_step=3 must be an integer > tinit"):
        dt.AdaLoRA(tinit=2, tfinal=1, total_step=3)
    with pytest.raises(dt.SpecError, match="IncreLoRA.init_r=5"):
        dt.IncreLoRA(init_r=5, max_r=4)
    model = Net()
    with pytest.raises(
        dt.SpecError,
        match="IncreLoRA.budget=10 gives a budget of 10 parameters, which is smaller than one "
        "rank-1 delta",
    ):
        dt.attach(model, dt.IncreLoRA(budget=10, targets=["fc1"]), "inc")
    assert not dt.delta_names(model), "a failed attach leaves the model unchanged"
    with pytest.raises(dt.TargetError):
        dt.attach(model, dt.AdaLoRA(targets=["nonexistent"]), "ada")
    dt.attach(model, dt.AdaLoRA(targets=["fc1"]), "ada")
    with pytest.raises(BudgetError, match="needs the run's length"):
        AdaLoRASchedule("ada").on_train_start(model)
    with pytest.raises(BudgetError, match="no SVDDelta delta named 'other'"):
        AdaLoRASchedule("other").on_train_start(model)


def test_fit_adds_the_schedules_the_specs_ask_for(recwarn):
    from deltatune.train import callbacks_from_specs

    cfg = TrainConfig(
        max_steps=6, batch_size=8, lr=1e-2, progress=False, eval_each_epoch=False, keep_best=False
    )
    model = Net()
    dt.attach(
        model, dt.AdaLoRA(init_r=4, target_r=1, targets=["fc1", "fc2"]), "ada"
    )  # no total_step: fit's length
    fit(model, _tiny_task(), _collate, cfg)
    assert sum(final_ranks(model, "ada").values()) == 8, "without spec_callbacks nothing prunes"
    model = Net()
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=1, targets=["fc1", "fc2"]), "ada")
    fit(model, _tiny_task(), _collate, cfg, spec_callbacks=True)
    assert sum(final_ranks(model, "ada").values()) == 2, (
        "pruned to target_r × modules at the run's last step"
    )
    assert not [w for w in recwarn if "final allocation" in str(w.message)], (
        "the schedule knew the run's length"
    )

    found = callbacks_from_specs(model, 50)
    assert [(type(c), c.name, c._total) for c in found] == [(AdaLoRASchedule, "ada", 50)]
    assert callbacks_from_specs(model, 50, given=[AdaLoRASchedule("ada")]) == [], (
        "a given schedule is not doubled"
    )
    dt.attach(
        model,
        dt.IncreLoRA(init_r=1, max_r=3, target_r=2, delta_t=1, targets=["fc3"]),
        "inc",
        activate=False,
    )
    assert [c.name for c in callbacks_from_specs(model, 50)] == ["ada"], (
        "inactive deltas are not trained"
    )
    dt.set_active(model, ["inc"])
    assert [type(c) for c in callbacks_from_specs(model, 50)] == [IncreLoRASchedule]
    fit(model, _tiny_task(), _collate, cfg, spec_callbacks=True)
    assert final_ranks(model, "inc") == {"fc3": 2}, "IncreLoRA grew to its budget (target_r on fc3)"


def test_core_does_not_import_the_outer_layers():
    """Specs name their trainer callbacks, but core must not import train/budget/cli to do it."""
    import ast
    from pathlib import Path

    from deltatune import core

    outer = ("train", "budget", "cli")
    for f in Path(core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                package = {0: "", 1: "deltatune.core.", 2: "deltatune."}[
                    node.level
                ]  # relative to deltatune/core/
                names = [package + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith(f"deltatune.{o}") for n in names for o in outer), (
                f"{f.name} imports {names}"
            )
