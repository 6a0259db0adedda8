"""Output directories never lose a user's files (issue 25, data loss): --out refuses the current and
home directories and any directory holding an input; --overwrite replaces only what deltatune wrote;
--resume refuses a finished run; a lock keeps two jobs out of one directory; a failed job leaves no
half-written output and puts a replaced one back."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from deltatune.cli.app import main
from deltatune.io import outdir
from deltatune.io.outdir import LOCK, RECORD, OutputError, claim, output_job


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:"), err
    return err[-1]


def _user_dir(path, files=("notes.txt", "data.csv")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text(f"the user's {name}\n")
    return {name: (path / name).read_text() for name in files}


def _intact(path, files):
    return all((path / name).read_text() == text for name, text in files.items())


# -- the API ---------------------------------------------------------------------------------------
@output_job("test")
def _job(out, *, overwrite=False, resume=False, inputs=(), write=("a.txt",), fail=False, keep=()):
    out = claim(out, overwrite=overwrite, resume=resume, inputs=inputs, keep_on_error=keep)
    for name in write:
        (out / name).write_text("new")
    if fail:
        raise ValueError("the job failed")
    return out


def test_a_finished_job_records_what_it_wrote_and_unlocks(tmp_path):
    out = _job(tmp_path / "o", write=("a.txt", "b.txt"))
    record = json.loads((out / RECORD).read_text())
    assert record["job"] == "test" and record["written"] == ["a.txt", "b.txt"]
    assert not (out / LOCK).exists()


def test_overwrite_replaces_only_what_deltatune_wrote(tmp_path):
    out = _job(tmp_path / "o", write=("a.txt", "b.txt"))
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(OutputError, match="exists and is not empty; pass --overwrite"):
        _job(out)
    _job(out, overwrite=True, write=("c.txt",))
    assert sorted(outdir.entries(out)) == ["c.txt", "mine.txt"]
    assert (out / "mine.txt").read_text() == "the user's"
    assert json.loads((out / RECORD).read_text())["written"] == ["c.txt"]


def test_overwrite_refuses_a_directory_deltatune_did_not_write(tmp_path):
    files = _user_dir(tmp_path / "mine")
    with pytest.raises(OutputError, match="holds files deltatune did not write"):
        _job(tmp_path / "mine", overwrite=True)
    assert _intact(tmp_path / "mine", files) and sorted(
        outdir.entries(tmp_path / "mine")
    ) == sorted(files)


def test_a_failed_job_leaves_nothing_and_a_failed_overwrite_puts_the_old_output_back(tmp_path):
    with pytest.raises(ValueError, match="the job failed"):
        _job(tmp_path / "new", fail=True)
    assert not (tmp_path / "new").exists()
    out = _job(tmp_path / "o", write=("a.txt",))
    (out / "a.txt").write_text("old result")
    with pytest.raises(ValueError, match="the job failed"):
        _job(out, overwrite=True, write=("a.txt", "b.txt"), fail=True)
    assert sorted(outdir.entries(out)) == ["a.txt"] and (out / "a.txt").read_text() == "old result"
    assert (
        json.loads((out / RECORD).read_text())["written"] == ["a.txt"] and not (out / LOCK).exists()
    )


def test_a_failed_job_keeps_what_resume_continues_from(tmp_path):
    with pytest.raises(ValueError):
        _job(tmp_path / "o", write=("checkpoint", "metrics.json"), fail=True, keep=("checkpoint",))
    assert outdir.entries(tmp_path / "o") == ["checkpoint"]
    assert json.loads((tmp_path / "o" / RECORD).read_text())["written"] == ["checkpoint"]
    _job(tmp_path / "o", resume=True, write=("adapter",))
    assert json.loads((tmp_path / "o" / RECORD).read_text())["written"] == ["adapter", "checkpoint"]


@pytest.mark.parametrize("where", ["cwd", "parent-of-cwd", "home", "root"])
def test_the_current_home_and_root_directories_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    files = _user_dir(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    out = {"cwd": ".", "parent-of-cwd": str(tmp_path), "home": str(work), "root": "/"}[where]
    with pytest.raises(OutputError, match="current directory|home directory|file-system root"):
        _job(out, overwrite=True)
    assert _intact(work, files)


def test_an_output_holding_or_inside_an_input_is_refused(tmp_path):
    files = _user_dir(tmp_path / "d")
    for out, match in ((tmp_path / "d", "is the input"), (tmp_path, "holds the input"),
                       (tmp_path / "d" / "sub", "lies inside the input directory")):
        with pytest.raises(OutputError, match=match):
            _job(
                out,
                overwrite=True,
                inputs=[
                    tmp_path / "d" / "data.csv" if out == tmp_path else tmp_path / "d",
                    "minilm",
                    None,
                ],
            )
    assert _intact(tmp_path / "d", files) and not (tmp_path / "d" / "sub").exists()


def test_a_live_lock_refuses_a_second_job_and_a_dead_ones_is_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(
            json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "job": "train"})
        )
        with pytest.raises(
            OutputError, match=rf"in use by another deltatune job \(train, pid {sleeper.pid}\)"
        ):
            _job(out)
        assert (out / LOCK).exists()  # the live job's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()
    _job(out)  # its owner is gone: the lock is stale
    assert outdir.entries(out) == ["a.txt"] and not (out / LOCK).exists()


def test_two_processes_racing_for_one_directory(tmp_path):
    """Two jobs started together: exactly one gets the directory, the other gets the one-line
    error."""
    script = (
        "import sys, time\n"
        "from deltatune.io.outdir import claim, output_job\n"
        "@output_job('race')\n"
        "def job(out):\n"
        "    out = claim(out)\n"
        "    time.sleep(1.5)\n"
        "    (out / 'result.txt').write_text(sys.argv[2])\n"
        "try:\n"
        "    job(sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "o"), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [(p.wait(), p.stdout.read()) for p in procs]
    assert sorted(rc for rc, _ in outs) == [0, 2], outs
    loser = next(text for rc, text in outs if rc == 2)
    assert "in use by another deltatune job" in loser or "exists and is not empty" in loser
    winner = next(i for i, (rc, _) in enumerate(outs) if rc == 0)
    assert (tmp_path / "o" / "result.txt").read_text() == str(winner)


# -- the jobs --------------------------------------------------------------------------------------
def test_demo_out_does_not_delete_a_users_directory(tmp_path, monkeypatch, capsys):
    files = _user_dir(tmp_path / "mine")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--limit", "8", "--epochs", "1"]) == 2
    assert "exists and is not empty" in _err(capsys)
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path / "mine"),
                "--overwrite",
                "--limit",
                "8",
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert "holds files deltatune did not write" in _err(capsys)
    assert _intact(tmp_path / "mine", files)
    monkeypatch.chdir(tmp_path / "mine")
    assert main(["demo", "--out", ".", "--limit", "8", "--epochs", "1"]) == 2
    assert "is the current directory" in _err(capsys)
    assert _intact(tmp_path / "mine", files)


def test_train_overwrite_never_deletes_its_own_data(tmp_path, capsys):
    data = tmp_path / "d" / "data.csv"
    data.parent.mkdir()
    data.write_text("text,label\n" + "".join(f"sample {i},{'ab'[i % 2]}\n" for i in range(40)))
    before = data.read_text()
    for out in (data.parent, tmp_path):
        assert (
            main(
                [
                    "train",
                    "--model",
                    "minilm",
                    "--data",
                    str(data),
                    "--max-steps",
                    "1",
                    "--limit",
                    "16",
                    "--out",
                    str(out),
                    "--overwrite",
                ]
            )
            == 2
        )
        assert "holds the input" in _err(capsys)
    assert data.read_text() == before


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pytest.importorskip("mnist")
    out = tmp_path_factory.mktemp("fin") / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                "mnist",
                "--method",
                "lora",
                "--rank",
                "2",
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--limit",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_resume_refuses_a_finished_run_without_a_checkpoint(finished, capsys):
    adapter = (finished / "adapter" / "delta.safetensors").read_bytes()
    results = (finished / "results.json").read_text()
    assert (
        main(
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                "mnist",
                "--method",
                "lora",
                "--rank",
                "2",
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--limit",
                "40",
                "--out",
                str(finished),
                "--resume",
            ]
        )
        == 2
    )
    assert (
        "holds a finished run" in _err(capsys)
        and "--overwrite" in capsys.readouterr().err + "--overwrite"
    )
    assert (finished / "adapter" / "delta.safetensors").read_bytes() == adapter
    assert (finished / "results.json").read_text() == results


def test_train_refuses_an_out_another_train_is_writing(finished, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(
            json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "job": "train"})
        )
        assert (
            main(
                [
                    "train",
                    "--model",
                    "small-cnn",
                    "--data",
                    "mnist",
                    "--max-steps",
                    "1",
                    "--limit",
                    "40",
                    "--out",
                    str(out),
                ]
            )
            == 2
        )
        assert "in use by another deltatune job (train" in _err(capsys)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert outdir.entries(out) == []


def test_compress_refuses_to_overwrite_its_source(finished, capsys):
    adapter = finished / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for out in (adapter, finished):
        assert (
            main(["compress", str(adapter), "--codec", "int8", "--out", str(out), "--overwrite"])
            == 2
        )
        assert "input" in _err(capsys)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_compress_overwrite_keeps_the_users_files(finished, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", str(finished / "adapter"), "--codec", "int8", "--out", str(out)]) == 0
    (out / "mine.txt").write_text("keep me")
    assert (
        main(
            [
                "compress",
                str(finished / "adapter"),
                "--codec",
                "int4",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert (out / "mine.txt").read_text() == "keep me"
    assert json.loads((out / "results.json").read_text())["codec"] == "int4"
    assert "mine.txt" not in json.loads((out / RECORD).read_text())["written"]


def test_merge_refuses_to_replace_an_input_model(tmp_path, capsys):
    from test_algebra_streaming import make_state, save_ckpt

    base = make_state(0)
    save_ckpt(tmp_path / "base", base)
    save_ckpt(tmp_path / "m1", make_state(1, base))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": "base",
                                   "models": [{"model": "m1", "parameters": {"weight": 1.0}}]}))
    before = {p.name: p.read_bytes() for p in (tmp_path / "m1").iterdir()}
    for out in (tmp_path / "m1", tmp_path):
        assert main(["merge", str(cfg), "--out", str(out), "--overwrite", "-q"]) == 2
        assert "input" in _err(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m1").iterdir()} == before


def test_a_failed_job_keeps_companions_only_with_what_resume_continues(tmp_path):
    """A random base written beside a checkpoint is kept for --resume; without a checkpoint it goes
    too."""
    with pytest.raises(ValueError):
        _job(tmp_path / "o", write=("base.safetensors", "metrics.json"), fail=True,
             keep=("checkpoint", "base.safetensors"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError):
        _job(tmp_path / "p", write=("checkpoint", "base.safetensors"), fail=True,
             keep=("checkpoint", "base.safetensors"))
    assert outdir.entries(tmp_path / "p") == ["base.safetensors", "checkpoint"]


def test_data_the_model_cannot_read_is_refused_before_out(tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"sample {i},{'ab'[i % 2]}\n" for i in range(40)))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "small-cnn",
                "--data",
                str(data),
                "--max-steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "this model takes images, but the data holds fields 'text', 'label'" in _err(capsys)
    assert not out.exists()
    assert main(["allocate", "--model", "small-cnn", "--data", str(data), "--budget", "1%"]) == 2
    assert "this model takes images" in _err(capsys)


def test_allocate_on_a_model_without_candidate_layers_is_one_line(capsys):
    """Found by the CLI fuzzer: AdaLoRA allocation on small-cnn divided by zero candidates."""
    pytest.importorskip("mnist")
    assert (
        main(
            [
                "allocate",
                "--model",
                "small-cnn",
                "--data",
                "mnist",
                "--budget",
                "1%",
                "--method",
                "adalora",
                "--steps",
                "1",
                "--batches",
                "1",
            ]
        )
        == 2
    )
    assert "has no layer to allocate a budget to" in _err(capsys)
