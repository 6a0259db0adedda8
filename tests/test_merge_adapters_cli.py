"""`deltatune merge` on adapters (`- adapter: DIR` entries): two chat LoRAs trained by `deltatune
train` on a tiny Llama merge into one adapter whose weight change is the weighted sum (task
arithmetic, exact) or a LoRA of the summed rank (TIES), that eval and export take with --adapter;
bad configs are refused in one line before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_lm import smol_tokenizer, tiny_chat_llama

from deltatune.algebra.task_vector import TaskVector
from deltatune.cli.app import main
from deltatune.models.text import CausalLM

COLORS = ["red", "green", "blue", "black"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge-adapters")
    model, tok = tiny_chat_llama(seed=7), smol_tokenizer()
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    for name, offset in (("a", 0), ("b", 2)):
        rows = [{"messages": [
            {"role": "user", "content": f"Question {i}: name a color."},
            {"role": "assistant", "content": COLORS[offset + i % 2]}]} for i in range(24)]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc = main(["train", "--model", str(tmp / "tiny"), "--data", str(tmp / f"{name}.jsonl"),
                   "--rank", "4", "--max-steps", "3", "--lr", "5e-2", "--seed", str(offset),
                   "--out", str(tmp / f"run-{name}")])
        assert rc == 0
    return tmp


def _config(path, entries, **top) -> str:
    lines = [f"merge_method: {top.pop('merge_method', 'task_arithmetic')}", "models:"]
    for adapter, params in entries:
        lines.append(f"  - adapter: {adapter}")
        if params is not None:
            lines.append(f"    parameters: {json.dumps(params)}")
    lines += [f"{k}: {json.dumps(v)}" for k, v in top.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _vectors(adapters, *dirs):
    model = CausalLM(tiny_chat_llama(seed=7))
    return [TaskVector.from_adapter_dir(model, d) for d in dirs]


def _dense(entry) -> torch.Tensor:
    return entry.dense().float() if hasattr(entry, "dense") else entry.float()


def test_task_arithmetic_merges_into_one_adapter_that_eval_and_export_take(adapters, tmp_path):
    a, b = adapters / "run-a" / "adapter", adapters / "run-b" / "adapter"
    config = _config(tmp_path / "both.yaml", [(a, {"weight": 0.5}), (b, {"weight": 1.0})])
    out = tmp_path / "both"
    assert main(["merge", config, "--out", str(out), "-q"]) == 0
    merged, va, vb = _vectors(adapters, out, a, b)
    assert set(merged) == set(va) == set(vb) and len(merged) > 0
    for key in merged:  # exact: the factors stacked with the weights
        want = 0.5 * _dense(va[key]) + _dense(vb[key])
        assert torch.allclose(_dense(merged[key]), want, atol=1e-6)
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "adapters" and results["rank"] == 8
    assert results["weights"] == [0.5, 1.0]
    task = json.loads((out / "task.json").read_text())
    assert task["model"] == str(adapters / "tiny") and task["merge_method"] == "task_arithmetic"
    assert "data" not in task  # never one input's data file
    # the merged adapter is an adapter like any other: evaluated and exported by name of its base
    rc = main(["eval", "--adapter", str(out), "--data", str(adapters / "a.jsonl"), "--split",
               "test", "--max-new-tokens", "2", "--out", str(tmp_path / "eval")])
    assert rc == 0
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_ties_stores_the_dense_merge_as_a_lora_of_the_summed_rank(adapters, tmp_path):
    a, b = adapters / "run-a" / "adapter", adapters / "run-b" / "adapter"
    config = _config(tmp_path / "ties.yaml", [(a, {"weight": 1.0}), (b, {"weight": 1.0})],
                     merge_method="ties", parameters={"density": 0.5})
    out = tmp_path / "ties"
    assert main(["merge", config, "--out", str(out), "-q"]) == 0
    assert json.loads((out / "results.json").read_text())["rank"] == 8
    merged, va, vb = _vectors(adapters, out, a, b)
    key = next(iter(merged))
    got, plain = _dense(merged[key]), _dense(va[key]) + _dense(vb[key])
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    assert not torch.allclose(got, plain, atol=1e-6)  # TIES trims and elects signs: not the sum


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "slerp"}, "does not merge adapters; use one of task_arithmetic"),
        ({"weight": "x"}, "weight must be a finite number"),
        ({"missing": True}, "adapter directory"),
        ({"mixed": True}, "mixes adapters and checkpoints"),
        ({"rank": 4}, "task_arithmetic on adapters is exact"),
        ({"base_model": "smollm2"}, "is not the model the adapters were trained on"),
        ({"other_base": True}, "belong to different base models"),
        ({"classifier": True}, "classifier adapters carry one head per task"),
        ({"params_list": True}, "'parameters' must be a mapping"),
    ],
)
def test_bad_adapter_merges_are_refused_in_one_line_and_write_nothing(
    adapters, tmp_path, capsys, change, message
):
    a, b = adapters / "run-a" / "adapter", str(adapters / "run-b" / "adapter")
    if change.get("other_base") or change.get("classifier"):
        copy = tmp_path / "copy"
        shutil.copytree(b, copy)
        task = json.loads((copy / "task.json").read_text())
        task.update({"model": "minilm"} if change.get("other_base")
                    else {"label_names": ["x", "y"]})
        (copy / "task.json").write_text(json.dumps(task))
        b = str(copy)
    entries = [(a, {"weight": change.get("weight", 1.0)}),
               (tmp_path / "nowhere" if change.get("missing") else b, None)]
    if change.get("params_list"):
        entries[0] = (a, [0.5])
    top = {k: change[k] for k in ("merge_method", "base_model") if k in change}
    if "rank" in change:
        top["parameters"] = {"rank": change["rank"]}
    config = _config(tmp_path / "bad.yaml", entries, **top)
    if change.get("mixed"):
        with open(config, "a") as f:
            f.write(f"  - model: {a}\n")
    out = tmp_path / "out"
    rc = main(["merge", config, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
