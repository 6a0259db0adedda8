"""Fault injection (issue 25): SIGKILL at random points of train, merge, compress and export, and a
file-size limit (RLIMIT_FSIZE) standing in for a full disk.

    # full: >= 100 kill points, table into bench/RESULTS.md
    .venv/bin/python bench/bench_reliability.py
    # a few cases per job, prints the table only
    .venv/bin/python bench/bench_reliability.py --quick

Every job runs as its own process (``python -m deltatune.cli.app``) on the smallest real inputs:

* train: ``--model small-cnn --data mnist --limit 200 --max-steps 30 --save-every 5 --batch-size 4``
  (a checkpoint every 5 steps);
* merge: TIES of two seeded "fine-tuned" safetensors checkpoints (4 x 512x512 float32) over a base,
  ``--shard-size 1MB`` (several shards and an index);
* compress: ComPEFT of the trained small-cnn adapter;
* export: the trained small-cnn adapter merged into its base.

For each job a clean run first gives its duration and its complete output. Then N runs are killed
with SIGKILL (the whole process group) at stratified random points: one point drawn uniformly in
each of N equal slices of the clean duration (seeded). Every other run starts with an old complete
output in ``--out`` and passes ``--overwrite``. After each kill the invariant is checked: the job's
final output is either absent, byte-identical to the old one, or complete and new (its files are
those of the clean run, every JSON file parses, the adapter loads with its base through
``load_trained``, the merged shards load with the clean run's tensor names). train's final output is
``adapter/`` and ``results.json`` (checkpoints, metrics.json and the curve are progress); a new
adapter whose results.json is not written yet is counted apart ("adapter only"). Then recovery:
train runs again with ``--resume``, which must finish and give an adapter bit-identical to the clean
run's; the other jobs run again with ``--overwrite``, which must succeed whatever the kill left (a
stale lock, a staging directory). Leftovers (staging directories, ``.deltatune-replaced``, locks)
are counted after the recovery run.

RLIMIT_FSIZE cases run each job with the largest file it may write limited to a few sizes below its
largest output file (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk): the job must
exit non-zero with a one-line ``error:`` and no traceback, and leave the output absent or old.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"  # the deltatune under test (--src: e.g. a `git archive` of a commit)
CLI = [sys.executable, "-m", "deltatune.cli.app"]
TRAIN_ARGS = [
    "--model",
    "small-cnn",
    "--data",
    "mnist",
    "--limit",
    "200",
    "--max-steps",
    "30",
    "--save-every",
    "5",
    "--batch-size",
    "4",
    "--seed",
    "0",
]
HIDDEN_OK = {".deltatune.json"}  # the output record: bookkeeping, not output


# -- running a job ---------------------------------------------------------------------------------
def _preexec(fsize: Optional[int]) -> Callable[[], None]:
    def setup() -> None:
        # a write past RLIMIT_FSIZE raises SIGXFSZ, which kills by default: ignored, the write fails
        # with EFBIG, which is what a full disk looks like to the job (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return setup


@dataclass
class Run:
    rc: int
    seconds: float
    killed: bool
    stderr: str


def run_job(argv: list[str], cwd: Path, log: Path, *, kill_after: Optional[float] = None,
            fsize: Optional[int] = None, timeout: float = 900) -> Run:
    """Run one CLI job; with ``kill_after`` SIGKILL its process group after that many seconds."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(SRC)}
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(CLI + argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True, preexec_fn=_preexec(fsize))
        killed = False
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return Run(rc, time.perf_counter() - t0, killed, log.read_text(errors="replace"))


# -- what a job's output looks like ----------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, names: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """relative path -> SHA-256 of every file of the final output (hidden bookkeeping left out)."""
    if not root.is_dir():
        return {}
    tops = (
        [root / n for n in names]
        if names
        else [p for p in root.iterdir() if not p.name.startswith(".")]
    )
    snap = {}
    for top in tops:
        files = (
            [top]
            if top.is_file()
            else sorted(p for p in top.rglob("*") if p.is_file())
            if top.is_dir()
            else []
        )
        for f in files:
            snap[str(f.relative_to(root))] = _sha(f)
    return snap


def _json_ok(path: Path) -> Optional[str]:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path.name} unreadable ({exc})"
    return None


def _adapter_ok(adapter: Path) -> Optional[str]:
    from deltatune.cli.train import load_trained

    try:
        load_trained(None, adapter)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"{adapter.name} does not load ({str(exc).splitlines()[0][:120]})"
    return None


def _shards_ok(out: Path, keys: set[str]) -> Optional[str]:
    from safetensors import safe_open

    found: set[str] = set()
    for f in sorted(out.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    fh.get_tensor(k)
                    found.add(k)
        except Exception as exc:  # noqa: BLE001
            return f"{f.name} does not load ({str(exc).splitlines()[0][:120]})"
    return (
        None
        if found == keys
        else f"tensors differ from the clean run's ({len(found)} vs {len(keys)})"
    )


@dataclass
class Job:
    name: str
    argv: Callable[[Path, bool, bool], list[str]]  # (out, overwrite, resume) -> CLI arguments
    check: Callable[[Path], Optional[str]]  # None when the output is complete
    finals: Optional[tuple[str, ...]] = None  # the final entries of --out (None: all of it)
    resumable: bool = False
    clean_files: set[str] = field(default_factory=set)
    clean_snap: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    largest: int = 0


def classify(job: Job, out: Path, old: Optional[dict[str, str]]) -> tuple[str, str]:
    """(outcome, detail): absent / old / new / adapter only / VIOLATION."""
    snap = snapshot(out, job.finals)
    if not snap:
        return "absent", ""
    if old is not None and snap == old:
        return "old", ""
    if job.name == "train":
        adapter = {k: v for k, v in snap.items() if k.startswith("adapter/")}
        if {k for k in adapter} != {k for k in job.clean_files if k.startswith("adapter/")}:
            return "VIOLATION", f"adapter/ holds {sorted(adapter)}"
        problem = _adapter_ok(out / "adapter")
        if problem:
            return "VIOLATION", problem
        if "results.json" not in snap:
            return "adapter only", ""
        problem = _json_ok(out / "results.json")
        return ("VIOLATION", problem) if problem else ("new", "")
    if set(snap) != job.clean_files:
        return (
            "VIOLATION",
            f"files {sorted(set(snap) ^ job.clean_files)} differ from the clean run's",
        )
    problem = job.check(out)
    return ("VIOLATION", problem) if problem else ("new", "")


def leftovers(out: Path) -> list[str]:
    """What an interrupted job left that the recovery run did not clear: staging directories beside
    --out, and bookkeeping inside it other than the record."""
    found = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    if out.is_dir():
        found += [
            f"{out.name}/{p.name}"
            for p in out.iterdir()
            if p.name.startswith(".") and p.name not in HIDDEN_OK
        ]
    return found


# -- inputs ----------------------------------------------------------------------------------------
def make_checkpoints(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(512, 512, generator=g) for i in range(4)}
    for name, state in (
        ("base", base),
        *(
            (f"ft{j}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
            for j in (1, 2)
        ),
    ):
        (work / name).mkdir(exist_ok=True)
        save_file(state, str(work / name / "model.safetensors"))
    for cfg, weights in (("ties.yaml", (1.0, 1.0)), ("ties-old.yaml", (0.5, 0.3))):
        text = (
            "merge_method: ties\nbase_model: base\nparameters:\n  normalize: true\nmodels:\n"
            + "".join(
                f"  - model: ft{j}\n    parameters:\n      weight: {w}\n      density: 0.5\n"
                for j, w in zip((1, 2), weights)
            )
        )
        (work / cfg).write_text(text)


def build_jobs(work: Path, train_args: list[str] = TRAIN_ARGS) -> dict[str, Job]:
    def train(out, overwrite, resume):
        return ["train", *train_args, "--out", str(out), *(["--overwrite"] if overwrite else []),
                *(["--resume"] if resume else [])]

    def merge(out, overwrite, resume, cfg="ties.yaml"):
        return [
            "merge",
            str(work / cfg),
            "--out",
            str(out),
            "--shard-size",
            "1MB",
            "--seed",
            "0",
            "-q",
            *(["--overwrite"] if overwrite else []),
        ]

    def compress(out, overwrite, resume, density="0.1"):
        return [
            "compress",
            str(work / "trained" / "adapter"),
            "--codec",
            "compeft",
            "--density",
            density,
            "--out",
            str(out),
            *(["--overwrite"] if overwrite else []),
        ]

    def export(out, overwrite, resume):
        return ["export", "--adapter", str(work / "trained" / "adapter"), "--out", str(out),
                *(["--overwrite"] if overwrite else [])]

    def merge_ok(out):
        merge_keys = {f"layers.{i}.weight" for i in range(4)}
        return _json_ok(out / "results.json") or _json_ok(out / "model.safetensors.index.json") \
            or _shards_ok(out, merge_keys)

    def compress_ok(out):
        return _json_ok(out / "results.json") or _adapter_ok(out)

    def export_ok(out):
        from deltatune.models import load_model

        keys = set(load_model("small-cnn", num_labels=10).model.state_dict())
        return (_json_ok(out / "results.json") or _json_ok(out / "deltatune_export.json")
                or _shards_ok(out, keys))

    return {
        "train": Job(
            "train", train, lambda out: None, finals=("adapter", "results.json"), resumable=True
        ),
        "merge": Job("merge", merge, merge_ok),
        "compress": Job("compress", compress, compress_ok),
        "export": Job("export", export, export_ok),
    }


def old_output(job: Job, work: Path) -> Path:
    """A complete earlier output of the job (what --overwrite replaces), kept as a template."""
    tpl = work / "old" / job.name
    if tpl.exists():
        return tpl
    tpl.parent.mkdir(exist_ok=True)
    if job.name == "train":
        shutil.copytree(
            work / "trained", tpl
        )  # the same run: --resume must still reach the clean adapter
    else:
        args = job.argv(tpl, False, False)
        if job.name == "merge":
            args[1] = str(work / "ties-old.yaml")
        elif job.name == "compress":
            args[args.index("--density") + 1] = "0.3"
        r = run_job(args, work, work / "logs" / f"{job.name}-old.log")
        if r.rc != 0:
            raise SystemExit(f"{job.name}: making the old output failed:\n{r.stderr[-2000:]}")
    return tpl


# -- the experiment --------------------------------------------------------------------------------
@dataclass
class Tally:
    runs: int = 0
    kills: int = 0
    finished_first: int = 0
    outcomes: Counter = field(default_factory=Counter)
    recovered: int = 0
    recoveries: int = 0
    identical: int = 0
    leftovers: Counter = field(default_factory=Counter)
    fsize: int = 0
    fsize_ok: int = 0
    fsize_outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def recover(job: Job, out: Path, work: Path, tally: Tally, tag: str) -> None:
    """--resume (train) or a plain rerun with --overwrite: must finish with a complete new
    output."""
    tally.recoveries += 1
    r = run_job(
        job.argv(out, not job.resumable, job.resumable), work, work / "logs" / f"{tag}-recover.log"
    )
    outcome, detail = classify(job, out, None)
    if r.rc != 0 or outcome != "new":
        tally.violations.append(f"{tag}: recovery rc={r.rc} {outcome} {detail} {_last(r.stderr)}")
        return
    tally.recovered += 1
    if job.resumable:
        diff = adapter_diff(out / "adapter", work / "trained" / "adapter")
        if not diff:
            tally.identical += 1
        else:
            tally.violations.append(
                f"{tag}: resumed adapter differs from the clean run's in {diff}"
            )
    for name in leftovers(out):
        tally.leftovers[name] += 1
        tally.violations.append(f"{tag}: left behind {name}")


def adapter_diff(a: Path, b: Path) -> list[str]:
    """Files in which two adapter directories differ: tensors compared bit for bit, JSON by value,
    other files byte for byte. (Not the files' bytes: safetensors writes its metadata in a random
    order per process, so two saves of equal tensors differ in the header, and delta.json records
    that file's hash.)"""
    import torch
    from safetensors.torch import load_file

    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    diff = []
    for name in names:
        fa, fb = a / name, b / name
        if not (fa.is_file() and fb.is_file()):
            diff.append(name)
        elif name.endswith(".safetensors"):
            ta, tb = load_file(str(fa)), load_file(str(fb))
            bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
            if ta.keys() != tb.keys() or any(
                ta[k].dtype != tb[k].dtype
                or ta[k].shape != tb[k].shape
                or not torch.equal(bits(ta[k]), bits(tb[k]))
                for k in ta
            ):
                diff.append(name)
        elif name.endswith(".json"):
            ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
            for j in (ja, jb):
                j.pop("checksums", None)
            if ja != jb:
                diff.append(name)
        elif fa.read_bytes() != fb.read_bytes():
            diff.append(name)
    return diff


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_case(job: Job, work: Path, tally: Tally, i: int, delay: Optional[float], with_old: bool,
             fsize: Optional[int] = None) -> None:
    out = work / "out" / job.name
    tag = f"{job.name}-{'fsize' if fsize else 'kill'}{i}"
    tpl = old_output(job, work) if with_old else None
    shutil.rmtree(out, ignore_errors=True)
    old = None
    if tpl is not None:
        shutil.copytree(tpl, out)
        old = snapshot(out, job.finals)
    tally.runs += fsize is None
    r = run_job(
        job.argv(out, with_old, False),
        work,
        work / "logs" / f"{tag}.log",
        kill_after=delay,
        fsize=fsize,
    )
    outcome, detail = classify(job, out, old)
    if fsize is not None:
        tally.fsize += 1
        tally.fsize_outcomes[outcome] += 1
        one_line = (
            r.rc != 0 and "Traceback" not in r.stderr and _last(r.stderr).startswith("error:")
        )
        if outcome not in ("absent", "old") or not one_line:
            tally.violations.append(
                f"{tag} (limit {fsize} B): rc={r.rc} {outcome} {detail} | {_last(r.stderr)}"
            )
        else:
            tally.fsize_ok += 1
        if job.resumable:
            recover(job, out, work, tally, tag)
        return
    if r.killed:
        tally.kills += 1
    else:
        tally.finished_first += 1
        if r.rc != 0:
            tally.violations.append(
                f"{tag}: finished before the kill with rc={r.rc}: {_last(r.stderr)}"
            )
    tally.outcomes[outcome] += 1
    if outcome == "VIOLATION":
        tally.violations.append(f"{tag} (killed at {delay:.2f}s, old={with_old}): {detail}")
    recover(job, out, work, tally, tag)


def clean_run(job: Job, work: Path) -> None:
    out = work / "out" / job.name
    shutil.rmtree(out, ignore_errors=True)
    r = run_job(job.argv(out, False, False), work, work / "logs" / f"{job.name}-clean.log")
    if r.rc != 0:
        raise SystemExit(f"{job.name}: the clean run failed:\n{r.stderr[-3000:]}")
    # the shortest of two clean runs: a load spike in one would put kill points after the job's end
    again = run_job(job.argv(work / "out" / f"{job.name}-timing", False, False), work,
                    work / "logs" / f"{job.name}-timing.log")
    shutil.rmtree(work / "out" / f"{job.name}-timing", ignore_errors=True)
    job.seconds = min(r.seconds, again.seconds) if again.rc == 0 else r.seconds
    job.clean_snap = snapshot(out, job.finals)
    job.clean_files = set(job.clean_snap)
    job.largest = max(p.stat().st_size for p in out.rglob("*") if p.is_file())
    problem = job.check(out) if job.name != "train" else _adapter_ok(out / "adapter")
    if problem:
        raise SystemExit(f"{job.name}: the clean run's output is incomplete: {problem}")
    if job.name == "train":
        shutil.rmtree(work / "trained", ignore_errors=True)
        shutil.copytree(out, work / "trained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a few cases per job; RESULTS.md untouched"
    )
    ap.add_argument("--kills", type=str, default="train=20,merge=30,compress=30,export=30",
                    help="kill points per job (JOB=N,...)")
    ap.add_argument("--fsize", type=int, default=3, help="RLIMIT_FSIZE cases per job")
    ap.add_argument("--jobs", default="train,merge,compress,export")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work", type=Path, default=None, help="working directory (default: a new temp dir)"
    )
    ap.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    ap.add_argument(
        "--src",
        type=Path,
        default=None,
        help="the deltatune source tree to test (default: src/ "
        "here; a snapshot keeps a long run away from edits in progress)",
    )
    args = ap.parse_args()
    if args.src is not None:
        global SRC
        SRC = args.src.resolve()
        sys.path.insert(0, str(SRC))  # the checks in this process load adapters with the same code
    kills = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.kills.split(",")))
    if args.quick:
        kills = {k: min(v, 3) for k, v in kills.items()}
        args.fsize = min(args.fsize, 1)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="dt-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    make_checkpoints(work)
    jobs = build_jobs(work)
    names = args.jobs.split(",")
    if any(n in names for n in ("compress", "export")) and "train" not in names:
        clean_run(jobs["train"], work)  # only the adapter they read

    rng = random.Random(args.seed)
    t_all = time.perf_counter()
    tallies: dict[str, Tally] = {}
    for name in names:
        job, tally = jobs[name], Tally()
        tallies[name] = tally
        t0 = time.perf_counter()
        clean_run(job, work)
        n = kills.get(name, 0)
        # stratified: one uniform point in each of n equal slices of the clean run's duration
        points = [(k + rng.random()) / n * job.seconds for k in range(n)]
        rng.shuffle(points)
        for i, delay in enumerate(points):
            run_case(job, work, tally, i, delay, with_old=i % 2 == 1)
        for i in range(args.fsize):
            limit = max(512, int(job.largest * (i + 1) / (args.fsize + 1)))
            run_case(job, work, tally, i, None, with_old=i % 2 == 1, fsize=limit)
        print(
            f"{name}: clean {job.seconds:.1f}s, {tally.kills} killed of {tally.runs}, "
            f"{dict(tally.outcomes)}, recovered {tally.recovered}/{tally.recoveries}, fsize "
            f"{tally.fsize_ok}/{tally.fsize} [{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
        for v in tally.violations:
            print("  VIOLATION", v, flush=True)
    minutes = (time.perf_counter() - t_all) / 60
    body = table(jobs, tallies, minutes, args)
    print(body)
    if not args.quick and not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section("Reliability: fault injection (issue 25)", body)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if any(t.violations for t in tallies.values()):
        sys.exit(1)


def table(jobs: dict[str, Job], tallies: dict[str, Tally], minutes: float, args) -> str:
    cmd = "    .venv/bin/python bench/bench_reliability.py" + (" --quick" if args.quick else "")
    rows = [
        "| job | clean run | runs | killed (finished first) | absent | old | new | adapter only | "
        "VIOLATION | recovered | resume bit-identical | leftovers | RLIMIT_FSIZE: one-line error, "
        "no partial output |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = Counter()
    for name, t in tallies.items():
        o = t.outcomes
        ident = f"{t.identical}/{t.recoveries}" if jobs[name].resumable else "-"
        rows.append(
            f"| {name} | {jobs[name].seconds:.1f} s | {t.runs} | {t.kills} ({t.finished_first}) | "
            f"{o['absent']} | {o['old']} | {o['new']} | "
            f"{o['adapter only'] if name == 'train' else '-'} | {o['VIOLATION']} | "
            f"{t.recovered}/{t.recoveries} | {ident} | {sum(t.leftovers.values())} | "
            f"{t.fsize_ok}/{t.fsize} |"
        )
        total.update(runs=t.runs, kills=t.kills, violations=len(t.violations))
    return (
        f"{cmd}\n\nSIGKILL of the job's process group at {total['kills']} points (stratified "
        f"uniform over each job's clean duration, seed {args.seed}; every other run replaces an "
        "old output with --overwrite), then recovery (train: --resume; others: the same job "
        "again). Outcome of the final output after the kill: absent, byte-identical old, or "
        "complete new (adapter only: train's new adapter complete, its results.json not yet "
        f"written). RLIMIT_FSIZE at k/{args.fsize + 1} (k = 1..{args.fsize}) of the job's largest "
        f"output file, every other case over an old output. {total['violations']} violations; "
        f"{minutes:.1f} min on 2 shared CPU cores.\n\n"
        + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
