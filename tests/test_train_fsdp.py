"""FSDP (accelerate's FSDP2 plugin) on two CPU processes (gloo): the delta saved from a sharded
run equals, to 1e-6, the delta of the same run on one process with the same global batch, for LoRA
and for full fine-tuning; it is whole and not empty (each process held half of it while
training); a sharded run interrupted after a checkpoint resumes sharded to the same delta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fsdp_worker as F  # noqa: E402


def test_fsdp_two_processes_equal_one_process_and_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path / "sharded")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    reports = [json.loads((tmp_path / "sharded" / f"report_2_rank{r}.json").read_text())
               for r in (0, 1)]
    for kind in ("lora", "full"):
        info = reports[0][kind]
        assert info["sharded"] and info["steps"] == 12
        # each process held about half of the trainable tensors while training
        assert info["local_trainable"] <= info["trainable"] * 0.6
        assert sum(r[kind]["local_trainable"] for r in reports) == info["trainable"]
    assert reports[0]["resumed_from_step"] == 2
    assert reports[0]["ddp_after_fsdp_steps"] == 1  # accelerate's state is handed back

    torch.set_num_threads(1)
    for kind, file in (("lora", "delta.safetensors"), ("full", "model.safetensors")):
        model, info = F.run(kind, tmp_path / "one" / kind, 1)
        assert not info["sharded"]
        F.save(model, kind, tmp_path / "one" / kind / "saved")
        one = load_file(str(tmp_path / "one" / kind / "saved" / file))
        shard_dirs = [f"{kind}_saved"] + (["resumed_saved"] if kind == "lora" else [])
        for name in shard_dirs:
            sharded = load_file(str(tmp_path / "sharded" / name / file))
            assert sharded.keys() == one.keys() and len(one) > 0, name
            for key in one:
                assert sharded[key].shape == one[key].shape, (name, key)
                assert torch.allclose(sharded[key], one[key], atol=1e-6, rtol=0), (name, key)
        if kind == "lora":  # trained: B starts at zero and is not zero any more
            b = [v for k, v in one.items() if "lora_B" in k or k.endswith(".B") or "_B" in k]
            assert b and all(v.abs().max() > 1e-3 for v in b), list(one)
        else:  # full fine-tuning moved every weight away from the start
            start = F.build("full").state_dict()
            assert all(not torch.allclose(one[k], start[k]) for k in start)
