"""Output directories that never lose a user's files.

Every job that writes a directory (``--out``) runs inside :func:`output_job` and claims its
directory with :func:`claim`. The claim:

* refuses a directory that is, or holds, the current directory, the home directory, the file-system
  root, or any of the job's inputs (and one that lies inside an input directory);
* takes a lock (``.deltatune.lock``, with the owner's pid): a second job on the same directory is
  refused with one line while the first is alive; a lock left by a killed job is taken over;
* with ``overwrite``, replaces only what an earlier deltatune job recorded as written there (the
  record is ``.deltatune.json``); a non-empty directory without such a record is refused, and files
  deltatune did not write are kept. What is replaced is moved aside first and put back if the new
  job fails, so a failed ``--overwrite`` leaves the old output as it was.

When the job ends the record is updated. When it fails, whatever it created is removed (except the
names it asked to keep, e.g. training checkpoints, so ``--resume`` can continue) and a directory it
created and left empty is removed too: a failed job leaves no half-written output.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import DeltaError

LOCK = ".deltatune.lock"
RECORD = ".deltatune.json"
REPLACED = ".deltatune-replaced"
CONTROL = frozenset({LOCK, RECORD, REPLACED})

F = TypeVar("F", bound=Callable[..., Any])


class OutputError(DeltaError):
    """An output directory that must not be written (one line, names the fix)."""


@dataclass
class _Claim:
    path: Path
    job: str
    created: bool  # the directory did not exist before this job
    before: set[str]  # entries present when the job started (after any replacement was moved aside)
    written: list[str]  # what the record said earlier deltatune jobs wrote
    replaced: list[str]  # earlier outputs moved aside into REPLACED (put back if the job fails)
    keep_on_error: tuple[str, ...]


@dataclass
class _Job:
    name: str
    claims: list[_Claim] = field(default_factory=list)
    staged: list[Path] = field(
        default_factory=list
    )  # staging directories (see stage), removed on failure


_CURRENT: contextvars.ContextVar[_Job | None] = contextvars.ContextVar(
    "deltatune_output_job", default=None
)


def output_job(name: str) -> Callable[[F], F]:
    """Decorate a job function: the directories it claims are finished when it returns, rolled back
    when it raises. Nested jobs (the demo runs ``train``) share the outermost job's claims."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if _CURRENT.get() is not None:
                return fn(*args, **kwargs)
            job = _Job(name)
            token = _CURRENT.set(job)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                for claim in reversed(job.claims):
                    _roll_back(claim)
                for tmp in job.staged:
                    _remove(tmp)
                raise
            finally:
                _CURRENT.reset(token)
            for claim in job.claims:
                _finish(claim)
            return result

        return inner  # type: ignore[return-value]

    return wrap


def claim(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
          inputs: Iterable[Any] = (), keep_on_error: Iterable[str] = ()) -> Path:
    """Check, lock and prepare ``out`` for the running :func:`output_job`; returns the directory.

    ``inputs`` are the job's input paths (anything that is not an existing path is ignored).
    ``resume`` continues the directory as it is; ``overwrite`` replaces what deltatune wrote there.
    """
    job = _CURRENT.get()
    if job is None:
        raise RuntimeError("claim() must run inside a function decorated with @output_job")
    out = Path(out)
    for held in job.claims:
        if _same(held.path, out):
            return held.path  # a nested job writing into its parent's directory
    check_out(out, inputs)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _lock(out / LOCK, out, job.name)
    except BaseException:
        if created:
            _remove_empty(out)
        raise
    try:
        record = read_record(out)
        written = list(record.get("written", [])) if record else []
        present = _entries(out)
        replaced: list[str] = []
        if present and not resume:
            if not overwrite:
                raise OutputError(
                    f"--out {out} exists and is not empty; pass --overwrite to replace it, "
                    "--resume to continue it, or choose another directory"
                )
            if record is None:
                raise OutputError(
                    f"--out {out} holds files deltatune did not write (no {RECORD} there); "
                    "--overwrite replaces only a deltatune output: empty it yourself or choose "
                    "another directory"
                )
            replaced = [e for e in written if e in present]
            _move_aside(out, replaced)
        c = _Claim(
            out, job.name, created, set(_entries(out)), written, replaced, tuple(keep_on_error)
        )
    except BaseException:
        _unlock(out)
        if created:
            _remove_empty(out)
        raise
    job.claims.append(c)
    return out


def check_out(out: str | os.PathLike, inputs: Iterable[Any] = ()) -> None:
    """Refuse an output directory that is or holds something a job must never replace."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory path")
    if out.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link; give the real directory")
    real = _real(out)
    protected = {
        Path.cwd().resolve(): "the current directory",
        Path.home().resolve(): "your home directory",
        Path(real.anchor): "the file-system root",
    }
    for path, what in protected.items():
        if real == path or _inside(path, real):
            holds = "is" if real == path else "holds"
            raise OutputError(
                f"--out {out} {holds} {what}; give a new or dedicated directory, e.g. runs/NAME"
            )
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        path = Path(item)
        if not path.exists():
            continue
        src = path.resolve()
        if src == real:
            raise OutputError(
                f"--out {out} is the input {item}; write the output to another directory"
            )
        if _inside(src, real):
            raise OutputError(
                f"--out {out} holds the input {item}; write the output to a directory that holds "
                "none of the job's inputs"
            )
        if src.is_dir() and _inside(real, src):
            raise OutputError(
                f"--out {out} lies inside the input directory {item}; write the output elsewhere"
            )


def check_replace(out: str | os.PathLike, overwrite: bool, inputs: Iterable[Any] = ()) -> None:
    """For jobs that build their output in a temporary directory and :func:`publish` it whole:
    refuse, before any work, an output they must not write or replace."""
    out = Path(out)
    check_out(out, inputs)
    if entries(out):
        if not overwrite:
            raise OutputError(
                f"--out {out} exists and is not empty; pass --overwrite to replace it or choose "
                "another directory"
            )
        if read_record(out) is None:
            raise OutputError(
                f"--out {out} holds files deltatune did not write (no {RECORD} there); "
                "--overwrite replaces only a deltatune output: empty it yourself or choose "
                "another directory"
            )


def stage(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = ()) -> Path:
    """For a job that builds its whole output before showing it: refuse ``out`` as
    :func:`check_replace` does, and return a new staging directory beside it to :func:`publish`; the
    running :func:`output_job` removes the staging directory if the job fails."""
    check_replace(out, overwrite, inputs)
    tmp = staging_dir(out)
    job = _CURRENT.get()
    if job is not None:
        job.staged.append(tmp)
    return tmp


def staging_dir(out: str | os.PathLike) -> Path:
    """A new empty directory beside ``out`` (``.NAME.tmp-PID-RANDOM``) to build it in. What jobs
    killed while writing ``out`` left beside it is cleared first (see :func:`recover`)."""
    out = Path(os.path.abspath(out))  # "." or "..": the staging directory goes beside the real name
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def swap_in(tmp: str | os.PathLike, out: str | os.PathLike,
            keep: Callable[[Path, Path], None] | None = None) -> Path:
    """Rename the finished directory ``tmp`` to ``out``. An existing ``out`` is renamed aside first
    (``.NAME.old-PID-...``) and deleted after (``keep(old, out)`` may move files out of it first); a
    kill between the two renames leaves it there, and :func:`recover` puts it back, so ``out`` is
    always the whole old directory or the whole new one."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if keep is not None:
            keep(old, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


def recover(out: str | os.PathLike) -> None:
    """Clear what jobs killed while writing ``out`` left beside it: their staging directories, and
    the earlier output a kill caught between the two renames of :func:`publish` / :func:`swap_in`
    (put back when ``out`` is missing, deleted otherwise). Entries of live processes are left
    alone."""
    out = Path(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[^/]*")
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if not m or _alive(int(m.group(2))):
            continue
        path = out.parent / name
        if m.group(1) == "old":
            if not os.path.lexists(out):
                os.replace(path, out)
                continue
            record = read_record(path)  # killed while carrying the user's files over: finish that
            if record is not None and out.is_dir():
                _carry_user_files(path, out, set(record["written"]))
        _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def publish(
    tmp: str | os.PathLike, out: str | os.PathLike, *, job: str, overwrite: bool = False
) -> Path:
    """Move the finished directory ``tmp`` into place as ``out`` in one rename.

    An earlier deltatune output there is swapped out and deleted; files in it that deltatune did not
    write are carried over into the new one. A lock beside ``out`` keeps two jobs from publishing at
    once.
    """
    tmp, out = Path(tmp), Path(out)
    lock = out.parent / f".{out.name}{LOCK}"
    _lock(lock, out, job)  # the same lock as claim()'s, beside the directory it replaces whole
    try:
        recover(out)  # a publish killed between its renames: the old output back first
        check_replace(
            out, overwrite
        )  # again: another job may have written it since the first check
        previous = read_record(out)
        mine = set(previous["written"]) if previous else set()
        new = _entries(tmp)
        _write_record(_Claim(tmp, job, False, set(), [], [], ()), new)
        swap_in(tmp, out, keep=lambda old, new_out: _carry_user_files(old, new_out, mine))
    finally:
        lock.unlink(missing_ok=True)
    return out


def _carry_user_files(old: Path, out: Path, mine: set[str]) -> None:
    for name in _entries(old):
        if name not in mine and not (out / name).exists():
            os.replace(old / name, out / name)  # the user's own file in the old output: kept


def read_record(out: str | os.PathLike) -> dict | None:
    """What earlier deltatune jobs recorded in ``out`` (None when nothing was recorded or it is
    unreadable)."""
    path = Path(out) / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("written"), list) else None


def entries(out: str | os.PathLike) -> list[str]:
    """The directory's entries that are not deltatune's own bookkeeping."""
    return _entries(Path(out))


# -- internals ------------------------------------------------------------------------------------
def _entries(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name not in CONTROL and not p.name.startswith(f"{LOCK}.")
    )


def _real(path: Path) -> Path:
    return path.resolve() if path.exists() else path.absolute().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _same(a: Path, b: Path) -> bool:
    return _real(a) == _real(b)


def _lock(path: Path, out: Path, job: str) -> None:
    """Take the lock file ``path`` for writing ``out`` (its owner's pid, host and job inside)."""
    body = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "since": time.time()}
    )
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is not None:
                raise OutputError(
                    f"--out {out} is in use by another deltatune job ({owner}); wait for it to "
                    "finish or choose another directory"
                ) from None
            # the owner is gone (killed): take the lock over. Rename first so that two jobs racing
            # for a stale lock cannot both remove it and both create a new one.
            stale = path.with_name(f"{path.name}.{os.getpid()}.stale")
            try:
                os.replace(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        return
    raise OutputError(
        f"--out {out}: could not take the lock {path}; remove it if no deltatune job is running"
    )


def _owner(path: Path) -> str | None:
    """A description of the live job holding the lock, or None when its owner is gone."""
    try:
        data = json.loads(path.read_text())
        pid, host = int(data["pid"]), str(data.get("host", ""))
    except (OSError, ValueError, KeyError, TypeError):
        # being written this very moment, or garbage: treat as live only if it is fresh
        try:
            fresh = time.time() - path.stat().st_mtime < 5
        except OSError:
            return None
        return "a job starting now" if fresh else None
    if host and host != socket.gethostname():
        return f"{data.get('job', 'job')} pid {pid} on {host}"
    if pid == os.getpid():
        return None  # a lock this very process left behind (an earlier job that was interrupted)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"{data.get('job', 'job')}, pid {pid}"


def _unlock(out: Path) -> None:
    try:
        (out / LOCK).unlink()
    except FileNotFoundError:
        pass


def _move_aside(out: Path, names: list[str]) -> None:
    aside = out / REPLACED
    if aside.exists():
        shutil.rmtree(
            aside
        )  # left by an overwrite that was killed: the output it kept was replaced since
    if not names:
        return
    aside.mkdir()
    for name in names:
        os.replace(out / name, aside / name)


def _restore(out: Path, skip: list[str]) -> None:
    """Put the outputs an ``--overwrite`` moved aside back (except names the failed job keeps)."""
    aside = out / REPLACED
    if not aside.is_dir():
        return
    for item in aside.iterdir():
        if item.name not in skip and not (out / item.name).exists():
            os.replace(item, out / item.name)
    shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_record(c: _Claim, written: list[str]) -> None:
    from .files import write_json

    write_json(
        c.path / RECORD,
        {
            "format": "deltatune-output",
            "job": c.job,
            "written": sorted(set(written)),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def _finish(c: _Claim) -> None:
    now = _entries(c.path)
    new = [e for e in now if e not in c.before]
    _write_record(c, [e for e in c.written if e in now] + new)
    shutil.rmtree(c.path / REPLACED, ignore_errors=True)
    _unlock(c.path)


def _roll_back(c: _Claim) -> None:
    try:
        kept = []
        for name in _entries(c.path):
            if name in c.before:
                continue
            if name in c.keep_on_error or any(name.startswith(k + ".") for k in c.keep_on_error):
                kept.append(name)  # e.g. a checkpoint that --resume continues from
            else:
                _remove(c.path / name)
        primary = c.keep_on_error[0] if c.keep_on_error else None
        if kept and not any(n == primary or n.startswith(f"{primary}.") for n in kept):
            for (
                name
            ) in kept:  # companions (a random base) without what --resume continues: not kept
                _remove(c.path / name)
            kept = []
        _restore(c.path, kept)
        now = _entries(c.path)
        written = [e for e in c.written if e in now] + kept
        if written:
            _write_record(c, written)
        else:
            (c.path / RECORD).unlink(missing_ok=True)
    finally:
        _unlock(c.path)
        if c.created:
            _remove_empty(c.path)


def _remove_empty(out: Path) -> None:
    try:
        out.rmdir()
    except OSError:
        pass
