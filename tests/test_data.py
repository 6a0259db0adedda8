"""deltatune.data on the real bundled sets and on user files built in the tests."""

from __future__ import annotations

import collections
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from deltatune.data import (
    CORRUPTIONS,
    DOMAIN_NAMES,
    DataError,
    Dataset,
    available_datasets,
    corruption_names,
    load_data,
    restricted_load,
    tweet_domain,
)
from deltatune.data.corrupt import corrupt_images

# --- bundled text sets ----------------------------------------------------------------------------


def _sizes(spec: str) -> dict[str, int]:
    return {s: len(load_data(spec, s)) for s in ("train", "val", "test")}


def test_bbc_news_counts_split_and_stratification():
    parts = {s: load_data("bbc-news", s) for s in ("train", "val", "test")}
    # 80/10/10 of 2,225 articles; the corpus's 98 repeated articles stay inside one split each
    assert {s: len(d) for s, d in parts.items()} == {"train": 1776, "val": 226, "test": 223}
    assert parts["train"].label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert parts["train"].task == "text-classification"
    texts = {s: {e["text"] for e in d.examples} for s, d in parts.items()}
    assert (
        not texts["train"] & texts["test"]
        and not texts["val"] & texts["test"]
        and not texts["train"] & texts["val"]
    )
    total = collections.Counter(parts["train"].labels + parts["val"].labels + parts["test"].labels)
    for split in ("val", "test"):  # every topic in the same 10% share
        counts = collections.Counter(parts[split].labels)
        for label, n in total.items():
            assert abs(counts[label] - n * 0.1) <= 4


def test_split_depends_only_on_seed():
    a, b = load_data("bbc-news", "test", seed=0), load_data("bbc-news", "test", seed=0)
    c = load_data("bbc-news", "test", seed=1)
    assert [e["text"] for e in a.examples] == [e["text"] for e in b.examples]
    assert [e["text"] for e in a.examples] != [e["text"] for e in c.examples]
    small = load_data("bbc-news", "test", limit=20)
    assert len(small) == 20 and {e["text"] for e in small.examples} <= {
        e["text"] for e in a.examples
    }
    assert [e["text"] for e in small.examples] == [
        e["text"] for e in load_data("bbc-news", "test", limit=20).examples
    ]


def test_bbc_news_text_is_plain_text_for_lm():
    d = load_data("bbc-news-text", "val", limit=5)
    assert d.task == "text" and d.label_names == [] and len(d) == 5
    assert set(d[0]) == {"text"} and len(d[0]["text"]) > 200


def test_tweet_domains_counts_and_labels():
    parts = [load_data("tweet-sentiment", s) for s in ("train", "val", "test")]
    rows = [e for p in parts for e in p.examples]
    assert len(rows) == 38158 and parts[0].label_names == ["negative", "neutral", "positive"]
    counts = collections.Counter(e["domain"] for e in rows)
    assert counts == {"airlines": 14638, "nfl": 9434, "other": 5482, "cars": 4806, "apple": 3798}
    by_domain = {
        d: collections.Counter(e["label"] for e in rows if e["domain"] == d) for d in DOMAIN_NAMES
    }
    assert by_domain["airlines"].most_common(1)[0][0] == 0  # airlines: mostly negative
    assert by_domain["cars"].most_common(1)[0][0] == 1  # self-driving cars: mostly neutral
    # stratified by domain and label: each domain keeps about its 10% share of the test split
    test = collections.Counter(e["domain"] for e in parts[2].examples)
    for d, n in counts.items():
        assert abs(test[d] - 0.1 * n) <= 0.01 * n
    # retweets (repeated texts) never straddle splits
    texts = [{e["text"] for e in p.examples} for p in parts]
    assert not texts[0] & texts[2] and not texts[1] & texts[2]


def test_tweet_domain_selection():
    apple = load_data("tweet-sentiment:apple", "test")
    assert apple.name == "tweet-sentiment:apple" and {e["domain"] for e in apple.examples} == {
        "apple"
    }
    assert 340 <= len(apple) <= 390
    pair = load_data("tweet-sentiment:airlines,nfl", "val")
    assert {e["domain"] for e in pair.examples} == {"airlines", "nfl"}
    with pytest.raises(DataError, match="choose from airlines"):
        load_data("tweet-sentiment:mars")


@pytest.mark.parametrize("text,domain", [
    ("@united my bag is lost again", "airlines"),
    ("Brady knew about the footballs #DeflateGate", "nfl"),
    ("Just saw the Google car drive by", "cars"),
    ("My new iPhone battery dies by noon", "apple"),
    ("Mac Demarco at #Coachella2015!", "other"),  # not apple
    ("Claritin D saves lives", "other"),
])
def test_tweet_domain_rules(text, domain):
    assert tweet_domain(text) == domain


# --- MNIST and the restricted unpickler -----------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_restricted_unpickler_refuses_non_numpy_globals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"x": np.arange(3), "evil": _Evil()}, protocol=4)
    with pytest.raises(DataError, match="refusing to unpickle .*system"):
        restricted_load(payload)
    assert not (tmp_path / "pwned.txt").exists()
    with pytest.raises(DataError, match="numpy.load"):  # a numpy name outside the allow-list
        restricted_load(b"\x80\x02cnumpy\nload\nq\x00.")


def test_restricted_unpickler_reads_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    back = restricted_load(pickle.dumps(arrays, protocol=4))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, back))


def test_mnist_splits_and_images():
    assert _sizes("mnist") == {"train": 50000, "val": 10000, "test": 10000}
    d = load_data("mnist", "test", limit=64, seed=3)
    img = d[0]["image"]
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28) and int(img.max()) > 200
    assert d.label_names == [str(i) for i in range(10)] and len(set(d.labels)) > 5
    again = load_data("mnist", "test", limit=64, seed=3)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(d.examples, again.examples))


def test_digits_look_like_mnist():
    assert _sizes("digits") == {"train": 1439, "val": 179, "test": 179}
    imgs = torch.stack([e["image"] for e in load_data("digits", "train").examples]).float()
    assert imgs.shape[1:] == (1, 28, 28)
    assert (
        imgs[..., :4, :].max() == 0 and imgs[..., :, -4:].max() == 0
    )  # 4 px empty margin like MNIST
    assert imgs.max() == 255 and 20 < imgs.mean() < 60  # MNIST's mean is 33


# --- corruptions ----------------------------------------------------------------------------------


def test_corruption_names_match_corrupt_tta():
    import corrupt_tta

    assert len(corruption_names(extra=False)) == 15 and corruption_names(extra=False) == CORRUPTIONS
    assert len(corruption_names()) == 19 and set(corruption_names()) == set(
        corrupt_tta.corruption_dict
    )


def test_mnist_c_is_deterministic_and_cached():
    from deltatune.data import corrupt

    clean = load_data("mnist", "test", limit=6)
    a = load_data("mnist-c:gaussian_noise:3", "test", limit=6)
    assert a.name == "mnist-c:gaussian_noise:3" and a.labels == clean.labels
    corrupt._cache.clear()
    b = load_data("mnist-c:gaussian_noise:3", "test", limit=6)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a.examples, b.examples))
    assert not torch.equal(a[0]["image"], clean[0]["image"])
    c = load_data("mnist-c:gaussian_noise:3", "test", limit=6, seed=1)
    assert not torch.equal(c[0]["image"], a[0]["image"]) or c.labels != a.labels


def test_corruption_per_image_seeding_and_severity():
    images = np.stack([e["image"][0].numpy() for e in load_data("mnist", "test", limit=4).examples])
    idx = np.array([10, 20, 30, 40])
    full = corrupt_images(images, idx, "impulse_noise", 3, seed=0)  # skimage rng made deterministic
    part = corrupt_images(images[2:], idx[2:], "impulse_noise", 3, seed=0)
    assert np.array_equal(full[2:], part) and np.array_equal(
        full, corrupt_images(images, idx, "impulse_noise", 3, seed=0)
    )
    mild = np.abs(corrupt_images(images, idx, "gaussian_noise", 1, 0).astype(float) - images).mean()
    harsh = np.abs(
        corrupt_images(images, idx, "gaussian_noise", 5, 0).astype(float) - images
    ).mean()
    assert harsh > 2 * mild > 0


def test_digits_c_and_corruption_errors():
    d = load_data("digits-c:fog:2", "test", limit=3)
    assert len(d) == 3 and d[0]["image"].shape == (1, 28, 28)
    for spec, msg in [
        ("mnist-c:foo:3", "unknown corruption"),
        ("mnist-c:fog:9", "severity must be 1-5"),
        ("mnist-c:fog", "mnist-c:<corruption>:<severity>"),
    ]:
        with pytest.raises(DataError, match=msg):
            load_data(spec, "test")


# --- user files -----------------------------------------------------------------------------------


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_string_labels_sorted_and_seeded_split(tmp_path):
    rows = "".join(f'"text number {i}",{["spam", "ham", "eggs"][i % 3]}\n' for i in range(60))
    path = _write(
        tmp_path / "d.csv", "\ufefftext,label\n" + rows
    )  # a spreadsheet's byte-order mark
    parts = {s: load_data(path, s) for s in ("train", "val", "test")}
    assert parts["train"].label_names == ["eggs", "ham", "spam"]
    assert {s: len(d) for s, d in parts.items()} == {"train": 48, "val": 6, "test": 6}
    dup = _write(
        tmp_path / "dup.csv",
        "text,label\n" + "same text,a\n" * 10 + "".join(f"t{i},b\n" for i in range(10)),
    )
    placed = [
        [e["text"] for e in load_data(dup, s).examples].count("same text")
        for s in ("train", "val", "test")
    ]
    assert sorted(placed) == [0, 0, 10]  # duplicates are kept together
    assert collections.Counter(parts["test"].labels) == {0: 2, 1: 2, 2: 2}
    assert parts["train"][0]["text"].startswith("text number")


def test_csv_numeric_labels_and_split_column(tmp_path):
    lines = ["text,label,split"] + [
        f"t{i},{[2, 10, 9][i % 3]},{['train', 'validation', 'test'][i % 3]}" for i in range(9)
    ]
    path = _write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    val = load_data(path, "val")
    assert val.label_names == ["2", "9", "10"]  # numerically, not as strings
    assert [e["text"] for e in val.examples] == ["t1", "t4", "t7"] and val.labels == [2, 2, 2]
    bad = _write(tmp_path / "b.csv", "text,label,split\na,1,training\n")
    with pytest.raises(DataError, match="split column"):
        load_data(bad, "train")


@pytest.mark.parametrize("content,msg", [
    ("text,category\na,1\n", "no 'label' column"),
    ("", "holds no rows"),
    ("text,label\n", "holds no rows"),
    ("text,label\na,\n", "row 1 lacks"),
])
def test_csv_errors(tmp_path, content, msg):
    with pytest.raises(DataError, match=msg):
        load_data(_write(tmp_path / "x.csv", content))


def test_jsonl_and_file_errors(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20)),
    )
    assert (
        load_data(path, "train").label_names == ["0", "1"] and len(load_data(path, "train")) == 16
    )
    with pytest.raises(DataError, match="d2.jsonl:2 is not valid JSON"):
        load_data(_write(tmp_path / "d2.jsonl", '{"text": "a", "label": 1}\nnot json\n'))
    with pytest.raises(DataError, match="not a JSON object"):
        load_data(_write(tmp_path / "d3.jsonl", "[1, 2]\n"))
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(_write(tmp_path / "notes.xlsx", "hello"))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    root = str(tmp_path / "imgs")
    train, test = load_data(root, "train"), load_data(root, "test")
    assert (
        train.label_names == ["cat", "dog"] and len(train) == 16 and sorted(test.labels) == [0, 1]
    )
    assert train.task == "image-classification" and train[0]["image"].shape == (3, 12, 16)
    assert len(load_data(root, "train", limit=5)) == 5
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable image"):
        [load_data(root, s) for s in ("train", "val", "test")]
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(str(tmp_path / "imgs" / "cat"))


def test_datasets_save_to_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=feats
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(
        str(tmp_path / "dict")
    )
    ds.save_to_disk(str(tmp_path / "single"))
    val = load_data(str(tmp_path / "dict"), "val")
    assert val.label_names == ["neg", "pos"] and [e["text"] for e in val.examples] == [
        "t0",
        "t1",
        "t2",
        "t3",
    ]
    assert val.labels == [0, 1, 0, 1]
    with pytest.raises(DataError, match="none named test"):
        load_data(str(tmp_path / "dict"), "test")
    assert len(load_data(str(tmp_path / "single"), "train")) == 16
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_data(str(tmp_path / "single"), "train")


# --- names and errors -----------------------------------------------------------------------------


def test_unknown_names_splits_and_limits():
    with pytest.raises(DataError, match="bundled: bbc-news.*tweet-sentiment.*mnist"):
        load_data("imagenet")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_data("bbc-news", "dev")
    with pytest.raises(DataError, match="limit must be"):
        load_data("bbc-news", limit=0)
    with pytest.raises(DataError, match="takes no ':'"):
        load_data("mnist:3")
    assert {"bbc-news", "tweet-sentiment", "mnist", "digits", "mnist-c"} <= set(
        available_datasets()
    )
    assert issubclass(DataError, ValueError) and isinstance(
        load_data("bbc-news", limit=2), torch.utils.data.Dataset
    )
    assert isinstance(load_data("bbc-news", limit=2), Dataset)
