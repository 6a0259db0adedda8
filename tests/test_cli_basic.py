"""CLI plumbing that needs no real model: help, info, error exits, spec options."""

import json
import subprocess
import sys

import pytest
import torch

import deltatune as dt
from deltatune.cli.app import main
from deltatune.cli.spec_options import build_spec


def test_root_help_lists_jobs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for job in ("train", "eval", "info", "export", "demo"):
        assert job in out


def test_every_job_help_shows_its_examples_verbatim(capsys):
    """rich turns ``:name:`` into an emoji when ``name`` is one (``mnist-c:fog:3`` showed a fog
    glyph): no job's --help may contain a character rich substituted."""
    from deltatune.cli.app import build_app

    jobs = [c.name for c in build_app().registered_commands]
    assert {"detect", "estimate", "adapt", "train"} <= set(jobs)
    for job in jobs:
        assert main([job, "--help"]) == 0
        out = capsys.readouterr().out
        assert not [ch for ch in out if ord(ch) >= 0x1F000 or 0x2600 <= ord(ch) < 0x2800], job


def test_info_shows_a_saved_delta(tmp_path, capsys):
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    dt.attach(m, dt.LoRA(r=2, targets=["0", "1"]))
    dt.save_adapter(m, tmp_path / "a")
    assert main(["info", str(tmp_path / "a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["method"] == "lora"
        and data["hosts"] == ["0", "1"]
        and data["num_parameters"] == 2 * (4 + 6) + 2 * (6 + 2)
    )
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "lora" in capsys.readouterr().out


def test_info_on_missing_dir_is_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.cli.app", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_build_spec_options():
    spec = build_spec(
        "lora", {"rank": 4, "alpha": 8, "targets": "query,value", "dora": True}, head=["classifier"]
    )
    assert (
        spec.r == 4
        and spec.targets == ("query", "value")
        and spec.dora
        and spec.trainable_modules == ("classifier",)
    )
    with pytest.raises(dt.SpecError, match="unknown method 'lorax'"):
        build_spec("lorax", {})
    with pytest.raises(dt.SpecError, match="has no option 'rnk'"):
        build_spec("lora", {"rnk": 3})
    with pytest.raises(dt.SpecError, match="LoRA.r=0"):
        build_spec("lora", {"r": 0})
