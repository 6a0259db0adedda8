"""Split fractions (train, val, test) of the data sets deltatune splits itself: Python and CLI."""

import pytest

from deltatune.cli.app import main
from deltatune.data import DataError, load_data


def _texts(spec, split, fractions=None, **kw):
    return [e["text"] for e in load_data(spec, split, fractions=fractions, **kw).examples]


def test_bbc_news_twenty_percent_test_split_partitions_the_corpus():
    fr = (0.7, 0.1, 0.2)
    parts = {s: _texts("bbc-news", s, fr, seed=3) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 2225
    assert (
        430 <= len(parts["test"]) <= 470 and 200 <= len(parts["val"]) <= 240
    )  # 20% / 10% of 2,225
    assert not set(parts["test"]) & set(parts["train"]) and not set(parts["val"]) & set(
        parts["train"]
    )
    # each topic keeps its share in the test split (stratified)
    test = load_data("bbc-news", "test", seed=3, fractions=fr)
    full = [len(load_data("bbc-news", s, seed=3).labels) for s in ("train", "val", "test")]
    shares = [test.labels.count(k) / len(test) for k in range(5)]
    everything = [
        lab for s in ("train", "val", "test") for lab in load_data("bbc-news", s, seed=3).labels
    ]
    assert all(abs(a - everything.count(k) / sum(full)) < 0.02 for k, a in enumerate(shares))


def test_default_fractions_are_the_old_split():
    assert _texts("bbc-news", "test", seed=1) == _texts("bbc-news", "test", (0.8, 0.1, 0.1), seed=1)
    assert _texts("tweet-sentiment:cars", "val", seed=0, limit=50) == _texts(
        "tweet-sentiment:cars", "val", [0.8, 0.1, 0.1], seed=0, limit=50)


def test_tweets_and_user_csv_take_fractions(tmp_path):
    small = len(load_data("tweet-sentiment:cars", "test", seed=0))
    big = len(load_data("tweet-sentiment:cars", "test", seed=0, fractions=(0.6, 0.1, 0.3)))
    assert 2.5 < big / small < 3.5
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(100)))
    assert len(load_data(str(csv), "test", fractions=(0.6, 0.2, 0.2))) == 20
    assert len(load_data(str(csv), "test")) == 10
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("text,label,split\na,x,train\nb,y,test\n")
    with pytest.raises(DataError, match="has a split column"):
        load_data(str(fixed), "test", fractions=(0.6, 0.2, 0.2))


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.0, 0.0, 0.0), ("a", "b", "c"), 7])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(DataError, match="split fractions must be three numbers"):
        load_data("bbc-news", "test", fractions=bad)


def test_fractions_on_data_with_its_own_split_are_refused():
    with pytest.raises(DataError, match="has its own split"):
        load_data("mnist", "test", fractions=(0.7, 0.1, 0.2))
    with pytest.raises(DataError, match="has its own split"):
        load_data("mnist-c:fog:3", "test", fractions=(0.7, 0.1, 0.2))


def test_digits_and_image_folders_take_fractions(tmp_path):
    from PIL import Image

    assert len(load_data("digits", "test", fractions=(0.6, 0.1, 0.3))) > 2.5 * len(
        load_data("digits", "test")
    )
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(20):
            Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / c / f"{i}.png")
    assert len(load_data(str(tmp_path), "test", fractions=(0.5, 0.25, 0.25))) == 10
    assert len(load_data(str(tmp_path), "test")) == 4


def test_cli_refuses_bad_fractions_before_writing(capsys, tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            "minilm",
            "--data",
            "bbc-news",
            "--max-steps",
            "1",
            "--limit",
            "8",
            "--split-fractions",
            "0.7,0.1",
            "--out",
            str(out),
        ]
    )
    assert rc != 0 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "split fractions" in err
    rc = main(
        [
            "eval",
            "--adapter",
            str(tmp_path / "none"),
            "--data",
            "bbc-news",
            "--split-fractions",
            "x,y,z",
        ]
    )
    assert rc != 0
    assert "--split-fractions takes three comma-separated numbers" in capsys.readouterr().err


def test_cli_train_and_eval_with_fractions(capsys, tmp_path):
    import json

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "minilm",
                "--data",
                "bbc-news",
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--limit",
                "12",
                "--split-fractions",
                "0.7,0.1,0.2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["split_fractions"] == [0.7, 0.1, 0.2]
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", "bbc-news", "--limit", "12",
                 "--split-fractions", "0.7,0.1,0.2", "--out", str(tmp_path / "ev")]) == 0
    assert 0 <= json.loads((tmp_path / "ev" / "results.json").read_text())["accuracy"] <= 1
