"""Issue 22's continual strategies: prototype classifiers on frozen features (SimpleCIL, APER,
RanPAC, EASE), prompt pools (L2P, DualPrompt, CODA-Prompt), the regulariser fixes, the validation
stream, and a reduced real-data check."""

from __future__ import annotations

import pytest
import torch
from continual_toys import ToyNet, vector_collate

import deltatune as dt
from deltatune import continual as cl
from deltatune.core.host import iter_hosts
from deltatune.data import Dataset
from deltatune.train import TrainConfig

CFG = dict(max_steps=4, batch_size=16, lr=1e-2, progress=False, eval_each_epoch=False,
           keep_best=False)
KIND = "text-classification"


def _clusters(seed: int = 0, n: int = 40):
    """Six well-separated Gaussian classes in 8-d, split 0,1 / 2,3 / 4,5 (class-incremental)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 8, generator=g) * 3
    names = [f"c{i}" for i in range(6)]

    def data(k: int) -> Dataset:
        ex = [{"x": centres[c] + 0.3 * torch.randn(8, generator=g), "label": c}
              for c in range(6) for _ in range(k)]
        return Dataset("clusters", KIND, ex, names)

    train, test = data(n), data(n // 2)
    tasks = []
    for i, group in enumerate([[0, 1], [2, 3], [4, 5]]):
        tr = Dataset(f"t{i}", KIND, [e for e in train.examples if e["label"] in group], names)
        te = Dataset(f"t{i}", KIND, [e for e in test.examples if e["label"] in group], names)
        tasks.append(cl.Task(f"t{i}", tr, te, group))
    return cl.Stream("clusters", "class", tasks, names, KIND)


def _run(name, spec=None, **options):
    torch.manual_seed(0)
    model = ToyNet(6)
    result = cl.run_stream(model, vector_collate, _clusters(), cl.make_strategy(name, **options),
                           TrainConfig(**CFG), spec=spec, head=["head"])
    return model, result


LORA = dt.LoRA(r=2, targets=["body"])


def test_simplecil_is_the_nearest_class_mean_and_does_not_forget():
    model, r = _run("simplecil")
    assert r.average_accuracy > 0.95 and r.forgetting == pytest.approx(0.0, abs=0.02)
    _, seq = _run("sequential")
    assert seq.average_accuracy < 0.5  # the shared head forgets: what simplecil fixes
    # before the second task, the classes of later tasks can never be predicted
    assert r.accuracy_matrix[0][1] == 0.0 and r.accuracy_matrix[0][2] == 0.0


def test_simplecil_prototypes_are_class_means():
    torch.manual_seed(0)
    model = ToyNet(6)
    s = cl.make_strategy("simplecil")
    stream = _clusters()
    s.setup(model, None, ["head"], vector_collate)
    s.after_task(0, stream.tasks[0])
    xs = torch.stack([e["x"] for e in stream.tasks[0].train.examples if e["label"] == 1])
    with torch.no_grad():
        mean = torch.tanh(model.body(xs)).mean(0)
    assert torch.allclose(s.prototypes("base")[1], mean, atol=1e-5)
    assert s.seen_mask().tolist() == [True, True, False, False, False, False]


def test_ranpac_is_the_ridge_solution_of_the_projected_features():
    torch.manual_seed(0)
    model = ToyNet(6)
    s = cl.make_strategy("ranpac", dim=64, ridge=0.5)
    stream = _clusters()
    s.setup(model, None, ["head"], vector_collate)
    for t, task in enumerate(stream.tasks[:2]):
        s.after_task(t, task)
    ex = stream.tasks[0].train.examples + stream.tasks[1].train.examples
    with torch.no_grad():
        h = torch.relu(torch.tanh(model.body(torch.stack([e["x"] for e in ex]))).double() @ s.W)
    y = torch.nn.functional.one_hot(torch.tensor([e["label"] for e in ex]), 6).double()
    expected = torch.linalg.solve(h.t() @ h + 0.5 * torch.eye(64, dtype=torch.float64), h.t() @ y)
    assert torch.allclose(s.out.double(), expected, atol=1e-4)
    _, r = _run("ranpac", dim=256)  # λ chosen on held-out training data
    assert r.average_accuracy > 0.95


def test_aper_trains_only_on_the_first_task_then_keeps_the_delta():
    torch.manual_seed(0)
    model = ToyNet(6)
    s = cl.make_strategy("aper")
    stream = _clusters()
    states = []

    class Spy:
        def on_train_end(self, m):
            states.append(1)

    s.callbacks = lambda t, task: [Spy()]
    r = cl.run_stream(model, vector_collate, stream, s, TrainConfig(**CFG), spec=LORA,
                      head=["head"])
    assert states == [1] and [s.trains(t) for t in range(3)] == [True, False, False]
    lora_b = dict(iter_hosts(model))["body"].part("adapted").lora_B
    assert lora_b.abs().sum() > 0 and not lora_b.requires_grad
    assert r.average_accuracy > 0.9


def test_ease_keeps_one_frozen_delta_per_task_and_synthesises_old_prototypes():
    model, r = _run("ease", spec=LORA)
    host = dict(iter_hosts(model))["body"]
    assert host.delta_names() == ["task0", "task1", "task2"]
    assert all(not p.requires_grad for n in host.delta_names() for p in host.part(n).parameters())
    assert r.average_accuracy > 0.9


def test_ease_synthesised_prototype_is_a_convex_mix_of_new_ones():
    torch.manual_seed(0)
    model = ToyNet(6)
    s = cl.make_strategy("ease")
    stream = _clusters()
    s.configure(TrainConfig(**CFG), 4, "class", 3)
    s.setup(model, LORA, ["head"], vector_collate)
    for t in range(2):
        s.before_task(t, stream.tasks[t])
        s.after_task(t, stream.tasks[t])
    p = s.prototypes("task1")
    assert s.counts["task1"][0] == 0 and p[0].abs().sum() > 0  # synthesised, not empty
    new = p[[2, 3]]
    w = torch.linalg.lstsq(new.t(), p[0].unsqueeze(1)).solution.squeeze()
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-3) and bool((w > -1e-4).all())


def test_feature_strategies_need_a_head_to_read_and_a_delta_where_they_adapt():
    with pytest.raises(cl.ContinualError, match="no head module was named; pass head="):
        cl.make_strategy("simplecil").setup(ToyNet(6), None, [], vector_collate)
    with pytest.raises(cl.ContinualError, match="has no head module 'fc'"):
        cl.make_strategy("ranpac").setup(ToyNet(6), None, ["fc"], vector_collate)
    with pytest.raises(cl.ContinualError, match="aper.*give a delta method"):
        cl.make_strategy("aper").validate(None)
    with pytest.raises(cl.ContinualError, match="has no option 'lam'"):
        cl.make_strategy("simplecil", lam=1)
    with pytest.raises(cl.ContinualError, match="ranpac dim must be"):
        cl.make_strategy("ranpac", dim=0).validate(None)


def test_lwf_trains_on_its_own_classes_and_distils_the_raw_old_logits():
    model = ToyNet(6)
    s = cl.make_strategy("lwf")
    stream = _clusters()
    s.configure(TrainConfig(**CFG), 4, "class", 3)
    s.setup(model, LORA, ["head"], vector_collate)
    trainee = s.trainee(1, stream.tasks[1])
    assert isinstance(trainee, cl.base.TaskMasked)
    out = trainee(x=torch.randn(3, 8))
    assert (out[:, [0, 1, 4, 5]] == -1e4).all() and torch.equal(out[:, 2:4], s.raw[:, 2:4])
    s.configure(TrainConfig(**CFG), 4, "domain", 3)
    assert s.trainee(1, stream.tasks[1]) is model  # domain streams: nothing masked


def test_olora_restores_the_old_classes_head_rows():
    model = ToyNet(6)
    s = cl.make_strategy("olora")
    s.setup(model, LORA, ["head"], vector_collate)
    s.seen = [0, 1]
    keep = [c for c in s.callbacks(1, None) if isinstance(c, cl.base.KeepRows)][0]
    before = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    keep.on_step_end(model, 1)
    assert torch.equal(model.head.weight[:2], before[:2])
    assert torch.equal(model.head.weight[2:], before[2:] + 1.0)


def test_lae_offline_head_is_an_ema_used_only_by_the_offline_member():
    model = ToyNet(6)
    s = cl.make_strategy("lae", momentum=0.5)
    s.setup(model, LORA, ["head"], vector_collate)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(2.0)
    s.ema_update()
    offline = dict((id(p), off) for p, off in s._heads)[id(model.head.weight)]
    assert torch.allclose(offline, start + 1.0)
    with s.offline_head(True):
        assert torch.allclose(model.head.weight, start + 1.0)
    assert torch.allclose(model.head.weight, start + 2.0)


def test_ewc_fisher_is_not_rescaled():
    torch.manual_seed(0)
    model = ToyNet(6)
    s = cl.make_strategy("ewc", lam=1.0, fisher_batches=1)
    stream = _clusters()
    s.setup(model, LORA, ["head"], vector_collate)
    s.after_task(0, stream.tasks[0])
    from deltatune.algebra import diagonal_fisher

    batch = vector_collate(stream.tasks[0].train.examples[:16])
    raw = diagonal_fisher(model, [batch], params=list(s.fisher), labels=lambda b: b["labels"])
    assert all(torch.allclose(s.fisher[n], raw[n]) for n in raw)


def test_validation_stream_holds_out_the_val_split():
    test = cl.make_stream("tweet-domains", limit_train=200, limit_test=50)
    val = cl.make_stream("tweet-domains", limit_train=200, limit_test=50, held="val")
    assert [e["text"] for e in test.tasks[0].train.examples] == \
        [e["text"] for e in val.tasks[0].train.examples]
    assert not {e["text"] for e in val.tasks[0].test.examples} & \
        {e["text"] for e in test.tasks[0].test.examples}
    with pytest.raises(cl.ContinualError, match="held must be"):
        cl.make_stream("tweet-domains", held="train")


# -- prompt pools on a tiny BERT ------------------------------------------------------------------
def _text_stream():
    g = torch.Generator().manual_seed(0)
    names = ["a", "b", "c", "d"]

    def ex(c: int) -> dict:
        ids = torch.randint(1, 100, (6,), generator=g)
        ids[0] = 10 + c  # the class is in the first token
        return {"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "label": c}

    tasks = []
    for i, group in enumerate([[0, 1], [2, 3]]):
        tr = Dataset(f"t{i}", KIND, [ex(c) for c in group for _ in range(16)], names)
        te = Dataset(f"t{i}", KIND, [ex(c) for c in group for _ in range(4)], names)
        tasks.append(cl.Task(f"t{i}", tr, te, group))
    return cl.Stream("text", "class", tasks, names, KIND)


def _textvector_collate(examples):
    batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


def _tiny_classifier():
    from tiny_transformers import tiny_bert

    from deltatune.models.text import MeanPoolClassifier

    return MeanPoolClassifier(tiny_bert(), 4)


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda-prompt"])
def test_prompt_pools_train_the_pool_and_head_only(name):
    torch.manual_seed(0)
    model = _tiny_classifier()
    frozen = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    s = cl.make_strategy(name)
    head = model.classifier.weight.detach().clone()
    r = cl.run_stream(model, _textvector_collate, _text_stream(), s, TrainConfig(**CFG),
                      spec=dt.PromptTuning(num_virtual_tokens=2), head=["classifier"])
    pool = s.pool
    assert any(p.requires_grad for p in pool.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.encoder.named_parameters()
               if n in frozen)
    assert len(r.accuracy_matrix) == 2 and not torch.equal(model.classifier.weight, head)
    batch = _textvector_collate(_text_stream().tasks[0].test.examples[:4])
    batch.pop("labels")
    q = s.query(batch)
    prompts, _ = s.compose(q, False)
    assert prompts.shape == (4, s.width, 32)
    with torch.no_grad():
        plain = model(**batch)
        prompted = s.predictor().eval()(**batch)
    assert not torch.allclose(plain, prompted)  # the prompts reach the model


def test_l2p_picks_prompts_per_sample_and_needs_a_prompt_spec():
    torch.manual_seed(0)
    model = _tiny_classifier()
    s = cl.make_strategy("l2p", pool_size=6, top_k=2)
    s.configure(TrainConfig(**CFG), 4, "class", 2)
    s.setup(model, dt.PromptTuning(num_virtual_tokens=3), ["classifier"], _textvector_collate)
    q = torch.randn(5, 32)
    with torch.no_grad():
        s.pool.keys.copy_(torch.eye(32)[:6])
    q[:, :6] = torch.eye(6)[[0, 1, 2, 3, 4]] * 10
    prompts, aux = s.compose(q, True)
    assert prompts.shape == (5, 6, 32) and aux.requires_grad
    assert torch.equal(prompts[1, :3], s.pool.prompts[1])  # best key of sample 1 is key 1
    with pytest.raises(cl.ContinualError, match="use --method prompt"):
        cl.make_strategy("dualprompt").validate(LORA)
    with pytest.raises(cl.ContinualError, match="has none to prompt.*use simplecil"):
        cl.make_strategy("coda-prompt").setup(ToyNet(6), dt.PromptTuning(num_virtual_tokens=2),
                                              ["head"], vector_collate)


def test_real_bbc_simplecil_reduced():
    """Reduced real-data check: frozen MiniLM class means on BBC News, class-incremental."""
    from deltatune.models import load_model

    stream = cl.make_stream("bbc-news-classinc", limit_train=150, limit_test=60)
    entry = load_model("minilm", num_labels=5, max_length=32)
    r = cl.run_stream(entry.model, entry.collate, stream, cl.make_strategy("simplecil"),
                      TrainConfig(**CFG), spec=None, head=entry.head)
    assert r.average_accuracy > 0.75  # sequential fine-tuning ends near 1/3 here (last task only)
