"""A run directory belongs to one run, and to one job at a time.

* `RunLock`: `<run_dir>/run.lock` (JSON: host, pid, job id, time, command) is created
  atomically (written under a temp name, then hard-linked to its real name, so it never exists
  half-written) by rank 0 before anything in the directory is touched, and removed when the job
  ends. A second job on the same directory refuses at once. A lock is *stale*, and taken over
  with a note, when it was left on this host by a pid that no longer runs, or by an earlier run
  of the same scheduler job id (a requeued Slurm/LSF job keeps its id).
* `holds_run` / `move_aside`: a fresh run (no `--resume`) into a directory that holds a run
  (checkpoints or a log) refuses; `--overwrite` renames the old directory to
  `<name>.old-<UTC time>` next to it (nothing is deleted).
* `AgreedError` (hpctrain.errors): an error every rank raises together, because rank 0 broadcast the decision:
  printed once (by rank 0), and every rank exits with it without aborting the launcher.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpctrain.atomic import rename_aside
from hpctrain.errors import UserError

LOCK_NAME = "run.lock"
_HELD: list["RunLock"] = []       # released by the CLI before an abort ends the process


def job_id() -> str:
    """The scheduler's job id (Slurm, LSF), or '' outside a batch job."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("LSB_JOBID") or ""


def _host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """The run directory's lock, held by rank 0 of the job that trains in it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.info: dict[str, Any] = {"host": _host(), "pid": os.getpid(), "job_id": job_id(), "time": _now(),
                                     "command": " ".join(sys.argv[:3])}
        self.held = False
        self.note = ""           # said when a stale lock was taken over

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.info) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _stale(self, other: dict[str, Any]) -> str | None:
        """Why the lock `other` is stale, or None when its job may still run."""
        if not other:
            return "it is unreadable"
        if other.get("host") == self.info["host"] and isinstance(other.get("pid"), int):
            if other["pid"] == os.getpid():
                return "it is this process's own"
            if not pid_alive(other["pid"]):
                return f"pid {other['pid']} on {other['host']} is gone"
        if other.get("job_id") and other.get("job_id") == self.info["job_id"]:
            return f"job {other['job_id']} was requeued"
        if other.get("job_id") and _job_finished(str(other["job_id"])):
            return f"job {other['job_id']} has ended"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise a UserError naming the job that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                _HELD.append(self)
                return
            other = self._read()
            if other is None:            # removed between our attempt and the read: try again
                continue
            why = self._stale(other)
            if why is None:
                job = f"job {other.get('job_id')}, " if other.get("job_id") else ""
                raise UserError(
                    f"run directory {self.path.parent} is in use by another job ({job}pid {other.get('pid')} "
                    f"on {other.get('host')}, since {other.get('time')}); wait for it to end, use another "
                    f"run.name, or delete {self.path} if that job is gone")
            self.note = (f"took over the stale lock {self.path} ({why}; it was taken "
                         f"{other.get('time', 'at an unknown time')})")
            self.path.unlink(missing_ok=True)
        raise UserError(f"cannot take the lock {self.path}: another job keeps taking it; use another run.name")

    def release(self) -> None:
        if not self.held:
            return
        other = self._read()
        if other and other.get("pid") == self.info["pid"] and other.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)
        self.held = False
        if self in _HELD:
            _HELD.remove(self)


def release_all() -> None:
    """Release every lock this process holds (before an abort ends it without unwinding)."""
    for lock in list(_HELD):
        try:
            lock.release()
        except OSError:
            pass


def _job_finished(job: str) -> bool:
    """Whether the scheduler says job `job` is no longer running (False when it cannot tell)."""
    try:
        if shutil.which("squeue"):
            proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
            state = proc.stdout.strip()
            if proc.returncode == 0:
                return state in ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
            return "Invalid job id" in proc.stderr
        if shutil.which("bjobs"):
            proc = subprocess.run(["bjobs", "-noheader", "-o", "stat", job], capture_output=True, text=True,
                                  timeout=10)
            state = proc.stdout.strip()
            return state in ("DONE", "EXIT") or "not found" in (proc.stdout + proc.stderr)
    except (OSError, subprocess.SubprocessError):
        pass
    return False


def holds_run(run_dir: Path) -> bool:
    """Whether the directory holds a run's results (a log or checkpoints)."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    return (run_dir / "log.h5").exists() or (ckpts.is_dir() and any(ckpts.glob("step-*.pt")))


def move_aside(run_dir: Path) -> Path:
    """Rename `run_dir` to a new sibling `<name>.old-<UTC time>` (never deletes); returns it."""
    run_dir = Path(run_dir)
    target = rename_aside(run_dir, "old")
    run_dir.mkdir(parents=True)
    return target


def move_log_aside(log: Path) -> Path:
    """Rename a log that no checkpoint continues to `<stem>.before-<UTC time>.h5` (never deletes)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = log.with_name(f"{log.stem}.before-{stamp}{log.suffix}")
    os.rename(log, target)
    return target


def fresh_run_refusal(run_dir: Path) -> str:
    return (f"run directory {run_dir} already holds a run (log.h5 or checkpoints); continue it with "
            f"--resume, start another one with --set run.name=OTHER, or pass --overwrite to move the old "
            f"run aside (renamed, not deleted)")
