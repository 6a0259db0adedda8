"""Fault injection in reduced form (bench/bench_reliability.py runs the full one, issue #25): train
is SIGKILLed three times in a row and resumed each time, compress twice (once over an old output
with --overwrite), and one job runs under a file-size limit. After every kill the final output is
absent, the old one byte for byte, or complete and new; the last --resume gives the clean run's
adapter bit for bit; the file-size limit ends in one ``error:`` line with nothing half-written."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_reliability.py"
# the smallest training that still writes several checkpoints
TRAIN = [
    "--model",
    "small-cnn",
    "--data",
    "mnist",
    "--limit",
    "64",
    "--max-steps",
    "8",
    "--save-every",
    "2",
    "--batch-size",
    "4",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def rel():
    spec = importlib.util.spec_from_file_location("bench_reliability", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(rel, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    (work / "logs").mkdir()
    (work / "out").mkdir()
    jobs = rel.build_jobs(work, TRAIN)
    rel.clean_run(jobs["train"], work)  # also the adapter compress reads (work/trained)
    return work, jobs


def _kill(rel, job, work, out, tag, delay, overwrite=False, resume=False):
    r = rel.run_job(
        job.argv(out, overwrite, resume), work, work / "logs" / f"{tag}.log", kill_after=delay
    )
    assert r.rc == 0 or r.killed, r.stderr[-2000:]
    return r


def test_train_killed_three_times_then_resumed(rel, setup):
    work, jobs = setup
    job = jobs["train"]
    out = work / "out" / "train-chain"
    killed = 0
    for i, fraction in enumerate((0.45, 0.7, 0.85)):
        # each run continues the one before (--resume), and is killed in turn
        r = _kill(rel, job, work, out, f"chain{i}", fraction * job.seconds, resume=i > 0)
        killed += r.killed
        outcome, detail = rel.classify(job, out, None)
        assert outcome in ("absent", "new", "adapter only"), detail
    assert killed >= 1
    r = rel.run_job(job.argv(out, False, True), work, work / "logs" / "chain-final.log")
    assert r.rc == 0, r.stderr[-2000:]
    assert rel.classify(job, out, None)[0] == "new"
    assert (
        rel.adapter_diff(out / "adapter", work / "trained" / "adapter") == []
    )  # bit-identical tensors
    assert rel.leftovers(out) == []


def test_compress_killed_absent_old_or_new(rel, setup):
    work, jobs = setup
    job = jobs["compress"]
    rel.clean_run(job, work)
    out = work / "out" / "compress"
    old_tpl = (
        work / "old-compress"
    )  # the clean output stands for an old one (the same bytes, a record)
    shutil.copytree(out, old_tpl)
    for i, (fraction, with_old) in enumerate(((0.6, False), (0.9, True))):
        shutil.rmtree(out, ignore_errors=True)
        old = None
        if with_old:
            shutil.copytree(old_tpl, out)
            old = rel.snapshot(out)
        _kill(rel, job, work, out, f"compress{i}", fraction * job.seconds, overwrite=with_old)
        outcome, detail = rel.classify(job, out, old)
        assert outcome in (("absent", "old", "new") if with_old else ("absent", "new")), detail
        # whatever the kill left (a staging directory, a publish lock), the next run succeeds
        r = rel.run_job(job.argv(out, True, False), work, work / "logs" / f"compress{i}-again.log")
        assert r.rc == 0, r.stderr[-2000:]
        assert rel.classify(job, out, None)[0] == "new"
        assert rel.leftovers(out) == []


def test_file_size_limit_is_one_line_and_leaves_nothing(rel, setup):
    work, jobs = setup
    job = jobs["export"]
    out = work / "out" / "export"
    shutil.rmtree(out, ignore_errors=True)
    # below the exported model.safetensors (about 230 kB): the write fails with EFBIG, as on a full
    # disk
    r = rel.run_job(job.argv(out, False, False), work, work / "logs" / "fsize.log", fsize=100_000)
    assert r.rc != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "too large" in last.lower(), r.stderr[-2000:]
    assert not out.exists() or rel.snapshot(out) == {}
    assert rel.leftovers(out) == []
