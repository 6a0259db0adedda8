"""Language-model data (issue 20): the user's chat, preference and plain-text files in every shape
they are accepted in, normalised to the deltatune.lm contract; the one-line refusals; and the
bundled chat/preference tasks built on the classification splits."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from deltatune.data import DataError, available_datasets, load_data
from deltatune.data.chat import BBC_CHARS

U, A, S = "user", "assistant", "system"


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _csv(path: Path, rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    path.write_text(buf.getvalue(), encoding="utf-8")
    return str(path)


def _all(spec: str) -> list[dict]:
    """Every example of a user file, over the three seeded splits (order: train, val, test)."""
    return [e for s in ("train", "val", "test") for e in load_data(spec, s).examples]


def _refused(spec: str, *match: str, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        load_data(spec, split)
    msg = str(info.value)
    assert "\n" not in msg and Path(spec).name in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


# --- accepted shapes ------------------------------------------------------------------------------
CONVERSATION = [_msg(S, "Be brief."), _msg(U, "Hi"), _msg(A, "Hello."), _msg(U, "2+2?"),
                _msg(A, "4")]


@pytest.mark.parametrize("write", [_jsonl, _csv], ids=["jsonl", "csv"])
def test_messages_shape(tmp_path, write):
    rows = [{"messages": CONVERSATION, "id": i} for i in range(10)]  # extra columns are ignored
    spec = write(tmp_path / f"chat.{'csv' if write is _csv else 'jsonl'}", rows)
    train = load_data(spec, "train")
    assert train.task == "chat" and train.label_names == [] and len(train) == 10
    assert train.examples[0] == {"messages": CONVERSATION}


def test_json_array_and_message_keys_beyond_role_and_content(tmp_path):
    rows = [{"messages": [{"role": U, "content": f"q{i}", "name": "ann"}, _msg(A, "a")]}
            for i in range(10)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows, indent=1))
    assert _all(str(path))[0]["messages"] == [_msg(U, "q0"), _msg(A, "a")]


@pytest.mark.parametrize("write", [_jsonl, _csv], ids=["jsonl", "csv"])
def test_prompt_completion_strings(tmp_path, write):
    rows = [{"prompt": f"Capital of country {i}?", "completion": f"City {i}"} for i in range(10)]
    spec = write(tmp_path / f"pc.{'csv' if write is _csv else 'jsonl'}", rows)
    got = sorted(_all(spec), key=lambda e: e["messages"][0]["content"])
    assert got[0] == {"messages": [_msg(U, "Capital of country 0?"), _msg(A, "City 0")]}
    assert {load_data(spec, "val").task} == {"chat"}


def test_prompt_completion_message_lists(tmp_path):
    prompt = [_msg(S, "Answer in French."), _msg(U, "Hello?")]
    rows = [{"prompt": prompt, "completion": [_msg(A, f"Bonjour {i}")]} for i in range(10)]
    got = _all(_jsonl(tmp_path / "pc.jsonl", rows))
    assert {json.dumps(e["messages"][:2]) for e in got} == {json.dumps(prompt)}
    assert sorted(e["messages"][2]["content"] for e in got) == [f"Bonjour {i}" for i in range(10)]


@pytest.mark.parametrize("write", [_jsonl, _csv], ids=["jsonl", "csv"])
def test_alpaca(tmp_path, write):
    rows = [{"instruction": "Translate to French.", "input": "cat" if i % 2 else "",
             "output": "chat"} for i in range(10)]
    spec = write(tmp_path / f"alpaca.{'csv' if write is _csv else 'jsonl'}", rows)
    users = {e["messages"][0]["content"] for e in _all(spec)}
    assert users == {"Translate to French.", "Translate to French.\n\ncat"}
    assert all(e["messages"][1] == _msg(A, "chat") for e in _all(spec))
    no_input = _jsonl(tmp_path / "a2.jsonl", [{"instruction": f"Say {i}", "output": str(i)}
                                               for i in range(10)])
    assert _all(no_input)[0]["messages"][0]["role"] == U


@pytest.mark.parametrize("write", [_jsonl, _csv], ids=["jsonl", "csv"])
def test_preference_strings(tmp_path, write):
    rows = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
             "rejected": "no" if i % 2 == 0 else "yes"} for i in range(10)]
    spec = write(tmp_path / f"pref.{'csv' if write is _csv else 'jsonl'}", rows)
    ds = load_data(spec, "train")
    assert ds.task == "preference"
    e = next(e for e in _all(spec) if e["prompt"][0]["content"] == "Is 0 even?")
    assert e == {"prompt": [_msg(U, "Is 0 even?")], "chosen": [_msg(A, "yes")],
                 "rejected": [_msg(A, "no")]}


def test_preference_message_lists(tmp_path):
    rows = [{"prompt": [_msg(S, "Be kind."), _msg(U, f"Rate idea {i}")],
             "chosen": [_msg(A, "Interesting!")], "rejected": [_msg(A, "Awful.")]}
            for i in range(10)]
    e = _all(_jsonl(tmp_path / "pref.jsonl", rows))[0]
    assert e["prompt"][0] == _msg(S, "Be kind.") and e["chosen"] == [_msg(A, "Interesting!")]


@pytest.mark.parametrize("write", [_jsonl, _csv], ids=["jsonl", "csv"])
def test_text_only_files(tmp_path, write):
    rows = [{"text": f"Document number {i}."} for i in range(10)]
    spec = write(tmp_path / f"t.{'csv' if write is _csv else 'jsonl'}", rows)
    ds = load_data(spec, "train")
    assert ds.task == "text" and ds.label_names == [] and len(ds) == 8
    assert sorted(e["text"] for e in _all(spec)) == sorted(r["text"] for r in rows)


def test_txt_file_one_example_per_paragraph(tmp_path):
    paragraphs = [f"Paragraph {i}, line one.\nLine two of {i}." for i in range(20)]
    path = tmp_path / "book.txt"
    path.write_bytes("\r\n\r\n \r\n".join(paragraphs).encode())  # CRLF, a blank line with a space
    train = load_data(str(path), "train")
    assert train.task == "text" and len(train) == 16
    assert sorted(e["text"] for e in _all(str(path))) == sorted(paragraphs)
    assert len(load_data(str(path), "train", limit=3)) == 3
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    _refused(str(tmp_path / "empty.txt"), "holds no text")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _refused(str(tmp_path / "latin.txt"), "not valid utf-8", "--encoding")
    assert load_data(str(tmp_path / "latin.txt"), encoding="latin-1")[0] == {"text": "café"}


def test_split_column_and_seeded_split(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "split": ["train", "dev", "test"][i % 3]}
            for i in range(9)]
    spec = _jsonl(tmp_path / "s.jsonl", rows)
    val = load_data(spec, "val")
    assert [e["messages"][0]["content"] for e in val.examples] == ["q1", "q4", "q7"]
    with pytest.raises(DataError, match="drop the split fractions"):
        load_data(spec, "train", fractions=(0.5, 0.25, 0.25))
    bad = _jsonl(tmp_path / "b.jsonl", [dict(rows[0], split="training")])
    _refused(bad, "split column has ['training']")
    # seeded: the same seed, the same split; identical rows stay together
    plain = _jsonl(tmp_path / "p.jsonl", [{"text": f"d{i % 15}"} for i in range(30)])
    tests = [e["text"] for e in load_data(plain, "test").examples]
    assert tests == [e["text"] for e in load_data(plain, "test").examples]
    assert not set(tests) & {e["text"] for e in load_data(plain, "train").examples}


def test_classification_files_are_unchanged(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    ds = load_data(_jsonl(tmp_path / "c.jsonl", rows), "train")
    assert ds.task == "text-classification" and ds.label_names == ["0", "1"] and len(ds) == 16
    msg = _refused(_jsonl(tmp_path / "x.jsonl", [{"text": "a", "category": 1}]),
                   "no 'label' column")
    assert "category, text" in msg


# --- refusals: one line, naming the row and the fix -----------------------------------------------
def test_no_accepted_shape_names_the_shapes_and_the_columns(tmp_path):
    msg = _refused(_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}]),
                   "matches no accepted shape", "columns: answer, question")
    for shape in ("messages", "prompt+completion", "instruction(+input)+output",
                  "prompt+chosen+rejected", "text alone", "text+label"):
        assert shape in msg, msg
    _refused(_jsonl(tmp_path / "two.jsonl", [{"messages": [], "prompt": "a", "completion": "b"}]),
             "several shapes", "keep the columns of one")


GOOD_ROWS = [
    {"messages": [_msg(U, "q"), _msg(A, "a")]},
    {"prompt": "p", "completion": "c"},
    {"instruction": "i", "output": "o"},
    {"prompt": "p", "chosen": "c", "rejected": "r"},
]


@pytest.mark.parametrize("row,match", [
    ({"messages": [_msg(S, "s"), _msg(U, "hi")]}, "no assistant turn"),
    ({"messages": [_msg(U, "hi"), _msg("bot", "yo")]}, "unknown role 'bot'"),
    ({"messages": [_msg(A, "hi"), _msg(U, "yo")]}, "opens with an assistant turn"),
    ({"messages": [_msg(U, "hi"), {"role": A, "content": None}]}, "NoneType as its content"),
    ({"messages": [_msg(U, "hi"), _msg(A, " ")]}, "assistant turn is empty"),
    ({"messages": "hi"}, "messages holds a str; write a message list"),
    ({"messages": [_msg(U, "hi"), "yo"]}, "not a {\"role\": ..., \"content\": ...} object"),
    ({"prompt": "", "completion": "b"}, "prompt is empty"),
    ({"prompt": "a", "completion": [_msg(U, "b")]}, "no assistant turn"),
    ({"instruction": 3, "output": "b"}, "instruction (and input, when given) must be text"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "chosen equals rejected"),
    ({"prompt": "a", "chosen": "b", "rejected": None}, "rejected holds nothing"),
    ({"prompt": "a", "chosen": [_msg(U, "b")], "rejected": "c"},
     "prompt + chosen: it has no assistant turn"),
])
def test_bad_rows_name_file_line_and_fix(tmp_path, row, match):
    good = next(g for g in GOOD_ROWS if set(g) == set(row))  # two good rows of the same shape
    _refused(_jsonl(tmp_path / "bad.jsonl", [good, good, row]), "bad.jsonl:3: ", match)


def test_bad_row_in_csv_and_json_array(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""x""}]"\nnot json\n')
    _refused(str(path), "bad.csv:2: it has no assistant turn")
    path.write_text("messages\n" + '"[{""role"": ""user"", ""content"": ""x""}, {""role"": '
                    '""assistant"", ""content"": ""y""}]"\nnot json\n')
    _refused(str(path), "bad.csv:3: the messages cell is not JSON")
    arr = tmp_path / "bad.json"
    arr.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "b"}]))
    _refused(str(arr), "bad.json (record 1): chosen equals rejected")


# --- bundled chat and preference tasks ------------------------------------------------------------
def test_bundled_names_are_registered():
    for name in ("tweet-sentiment-chat", "tweet-sentiment-pref", "bbc-news-chat", "bbc-news-pref"):
        assert name in available_datasets()


@pytest.mark.parametrize("source,chat", [
    ("tweet-sentiment", "tweet-sentiment-chat"),
    ("tweet-sentiment:nfl,cars", "tweet-sentiment-chat:nfl,cars"),
    ("bbc-news", "bbc-news-chat"),
])
def test_bundled_chat_is_the_classification_split(source, chat):
    for split in ("test", "val"):
        cls, ds = load_data(source, split), load_data(chat, split)
        assert ds.task == "chat" and ds.label_names == cls.label_names and len(ds) == len(cls)
        for c, e in zip(cls.examples, ds.examples):
            user, reply = e["messages"]
            assert user["role"] == U and reply == _msg(A, cls.label_names[c["label"]])
            assert e["answer"] == reply["content"] and e["label"] == c["label"]
            head = c["text"] if source.startswith("tweet") else c["text"][: BBC_CHARS // 2]
            assert head in user["content"]
            assert e.get("domain") == c.get("domain")
    assert [e["label"] for e in load_data(chat, "train", limit=50).examples] == [
        e["label"] for e in load_data(source, "train", limit=50).examples
    ]


def test_bundled_sizes_domains_and_article_cut():
    assert len(load_data("tweet-sentiment-chat:airlines", "test")) == len(
        load_data("tweet-sentiment:airlines", "test"))
    assert {e["domain"] for e in load_data("tweet-sentiment-chat:apple", "val").examples} == {
        "apple"}
    with pytest.raises(DataError, match="unknown tweet domain"):
        load_data("tweet-sentiment-chat:mars", "test")
    with pytest.raises(DataError, match="bbc-news-chat takes no ':' argument"):
        load_data("bbc-news-chat:x", "test")
    long = max(load_data("bbc-news-chat", "test").examples,
               key=lambda e: len(e["messages"][0]["content"]))
    article = long["messages"][0]["content"].split("Article: ", 1)[1]
    assert article.endswith(" [...]") and len(article) <= BBC_CHARS + 6


@pytest.mark.parametrize("name", ["tweet-sentiment", "bbc-news"])
def test_bundled_preference_pairs(name):
    chat, pref = load_data(f"{name}-chat", "test"), load_data(f"{name}-pref", "test")
    assert pref.task == "preference" and pref.label_names == chat.label_names
    wrong = set()
    for c, p in zip(chat.examples, pref.examples):
        assert p["prompt"] == c["messages"][:1] and p["chosen"] == c["messages"][1:]
        (rejected,) = p["rejected"]
        assert rejected["role"] == A and rejected["content"] in pref.label_names
        assert rejected["content"] != p["answer"] == c["answer"]
        wrong.add(rejected["content"])
    assert len(wrong) == len(pref.label_names)  # drawn among every class, not a fixed one
    again = load_data(f"{name}-pref", "test", limit=30).examples
    assert all(e in pref.examples for e in again)  # seeded per example: the same in any subset
    other_seed = load_data(f"{name}-pref", "test", seed=1).examples
    assert {json.dumps(e["prompt"]) for e in other_seed} != {
        json.dumps(e["prompt"]) for e in pref.examples}


@pytest.mark.parametrize("name", ["bbc-news-chat", "tweet-sentiment-chat"])
def test_bundled_chat_sets_fit_the_default_length(name):
    """Every bundled conversation, answer included, fits the causal-LM default of 256 tokens with
    SmolLM2's template: a longer one would train on a truncated (or no) answer. (1,000 characters
    of a BBC article did not: `deltatune train --data bbc-news-chat` was refused.)"""
    from tiny_lm import smol_tokenizer

    from deltatune.cli.train_lm import LM_MAX_LENGTH
    from deltatune.lm.tokenize import chat_collate

    collate = chat_collate(smol_tokenizer(), LM_MAX_LENGTH)
    examples = load_data(name, "train", seed=0, limit=400).examples
    for i in range(0, len(examples), 50):
        collate(examples[i: i + 50])
    assert collate.stats["examples"] == len(examples) and collate.stats["truncated"] == 0
