"""Accelerator settings: bf16 autocast trains (half-precision matmuls, fp32 trainable tensors),
fp16 needs CUDA, devices that are not there and a compile torch cannot do are one-line errors
before anything is written, and the options reach TrainConfig from every training job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deltatune.cli.app import main
from deltatune.train import TrainConfig, TrainError, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_worker as W  # noqa: E402

TASK = "image-classification"


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("field,value", [("precision", "fp64"), ("device", "tpu"),
                                         ("compile", "yes")])
def test_config_rejects_unknown_settings(field, value):
    with pytest.raises(TrainError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_fp16_on_cpu_is_refused():
    with pytest.raises(TrainError, match="needs CUDA"):
        TrainConfig(precision="fp16", device="cpu")
    if not torch.cuda.is_available():
        cfg = TrainConfig(precision="fp16", max_steps=1, progress=False)  # device auto → cpu
        with pytest.raises(TrainError, match="needs a CUDA GPU") as info:
            fit(W.build_model(), W.TRAIN[:20], W.clean_collate, cfg, task=TASK)
        assert "\n" not in str(info.value)


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    model = W.build_model()
    seen = []
    model.hidden.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, precision="bf16", progress=False)
    result = fit(model, W.TRAIN, W.clean_collate, cfg, eval_data=W.EVAL, task=TASK)
    assert {d for training, d in seen if training} == {torch.bfloat16}  # the training forward
    assert {d for training, d in seen if not training} == {torch.float32}  # evaluation: plain
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.final["loss"] < 1.0  # learnt (untrained: about ln 3 = 1.10)
    # and it trains about as well as fp32 from the same start
    ref = W.build_model()
    fp32 = fit(ref, W.TRAIN, W.clean_collate,
               TrainConfig(epochs=3, batch_size=16, lr=1e-2, progress=False), eval_data=W.EVAL,
               task=TASK)
    assert abs(result.final["loss"] - fp32.final["loss"]) < 0.05


def test_missing_devices_and_compile_are_refused_up_front(monkeypatch):
    from deltatune.train import accel

    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="no CUDA GPU"):
            fit(W.build_model(), W.TRAIN[:20], W.clean_collate,
                TrainConfig(device="cuda", max_steps=1, progress=False), task=TASK)
    if not accel._mps_available():
        with pytest.raises(TrainError, match="no Apple MPS"):
            accel.check_settings(TrainConfig(device="mps"))
    assert accel.compile_problem() is None  # torch 2.x with g++ here: compile can run
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(TrainError, match="C\\+\\+ compiler") as info:
        fit(W.build_model(), W.TRAIN[:20], W.clean_collate,
            TrainConfig(compile=True, max_steps=1, progress=False), task=TASK)
    assert "\n" not in str(info.value)


def test_cli_refuses_bad_settings_before_out_exists(tmp_path, capsys, monkeypatch):
    from deltatune.train import accel

    out = tmp_path / "x"
    train = ["train", "--model", "small-cnn", "--data", "mnist", "--max-steps", "1", "--limit",
             "40", "--out", str(out)]
    cont = ["continual", "--model", "small-cnn", "--stream", "split-mnist", "--max-steps", "1",
            "--limit", "40", "--out", str(out)]
    search = ["search", "--model", "minilm", "--data", "tweet-sentiment", "--budget", "1%",
              "--trials", "1", "--max-steps", "1", "--limit", "40", "--out", str(out)]
    cases = [(train, ["--precision", "fp8"], "precision='fp8' must be one of"),
             (cont, ["--device", "tpu"], "--device='tpu' must be one of"),
             (cont, ["--gradient-checkpointing"], "gradient checkpointing recomputes"),
             (cont, ["--report-to", "neptune"], "unknown tracker 'neptune'"),
             (search, ["--report-to", "comet"], "unknown tracker 'comet'")]
    if not torch.cuda.is_available():
        cases += [(train, ["--precision", "fp16"], "needs a CUDA GPU"),
                  (cont, ["--device", "cuda"], "no CUDA GPU"),
                  (search, ["--precision", "fp16"], "needs a CUDA GPU")]
    for args, bad, message in cases:
        assert main([*args, *bad]) == 2, bad
        err = _err(capsys)
        assert message in err and "\n" not in err, (bad, err)
        assert not out.exists(), bad
    monkeypatch.setattr(accel, "compile_problem", lambda: "no compiler here")
    assert main([*train, "--compile"]) == 2
    assert "--compile: no compiler here" in _err(capsys) and not out.exists()


def test_cli_continual_trains_with_settings_and_records_them(tmp_path, capsys):
    import json

    out = tmp_path / "cl"
    rc = main(["continual", "--model", "small-cnn", "--stream", "split-mnist", "--max-steps", "2",
               "--limit", "100", "--limit-test", "50", "--batch-size", "8", "--grad-accum", "2",
               "--precision", "bf16", "--device", "cpu", "--report-to", "csv", "--out", str(out)])
    assert rc == 0, _err(capsys)
    results = json.loads((out / "results.json").read_text())
    rows = (out / "tracking" / "metrics.csv").read_text().splitlines()
    logged = {(int(r.split(",")[0]), r.split(",")[1]): float(r.split(",")[2]) for r in rows[1:]}
    for t, row in enumerate(results["accuracy_matrix"]):
        for name, acc in zip(results["tasks"], row):
            assert logged[(t + 1, f"accuracy/{name}")] == pytest.approx(acc)
    last = len(results["accuracy_matrix"])
    assert logged[(last, "average_accuracy")] == pytest.approx(results["average_accuracy"])
    assert results["train"]["precision"] == "bf16" and results["train"]["grad_accum"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_with_loss_scaling_and_bf16_on_cuda():  # pragma: no cover - GPU only
    for precision in ("fp16", "bf16"):
        model = W.build_model()
        cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, precision=precision, device="cuda",
                          progress=False)
        result = fit(model, W.TRAIN, W.clean_collate, cfg, eval_data=W.EVAL, task=TASK)
        assert next(model.parameters()).device.type == "cuda"
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert result.final["loss"] < 1.0, precision
