"""Fault injection: real processes, real files, real launchers (mpirun, torchrun), both engines where
the engine matters. Every case checks that nothing hangs, that the failure is said in one line, and
that no data is lost: the checkpoints and the log stay readable, and `--resume=auto` continues.

The seconds from the fault until every rank has exited are measured; with HPCTRAIN_FAULT_TIMES=FILE
each case appends {"fault", "outcome", "seconds", "data_lost"} to FILE (benchmarks/faults.py prints
the table in docs/reliability.md from it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain import checkpoint
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.preempt import REQUEUE_EXIT_CODE
from hpctrain.rundir import LOCK_NAME
from hpctrain.local_launch import HPCTRAIN, MPIRUN, TORCHRUN, local_env, run_cli
from tests.helpers import REPO

psutil = pytest.importorskip("psutil")

DIGITS = str(REPO / "configs" / "digits.toml")
# -q: no launcher banner (one message per failure). Open MPI's SIGTERM → SIGKILL delay stays at its
# default (odls_base_sigkill_timeout = 1 s): mpirun waits twice that long after any rank exits non-zero.
MPIRUN_Q = MPIRUN + ["-q"]
pytestmark = pytest.mark.mpi


def train_args(tmp_path: Path, *sets: str, name: str = "digits") -> list[str]:
    args = ["train", "--config", DIGITS, "--set", f"run.out_dir={tmp_path}", "--set", f"run.name={name}",
            "--set", "train.progress=false"]
    for s in sets:
        args += ["--set", s]
    return [str(a) for a in args]


def record(fault: str, outcome: str, seconds: float | None, data_lost: str = "no") -> None:
    print(f"FAULT | {fault} | {outcome} | {seconds if seconds is None else f'{seconds:.1f}'} | {data_lost}")
    path = os.environ.get("HPCTRAIN_FAULT_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, "outcome": outcome, "seconds": seconds, "data_lost": data_lost}) + "\n")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hpctrain: error:")]


def one_line(proc: subprocess.CompletedProcess | tuple[int, str]) -> str:
    rc, stderr = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else proc
    assert rc != 0
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "mpirun" not in stderr and "MPI_ABORT" not in stderr, stderr
    return lines[0]


class Job:
    """A launched job: its launcher process, its rank processes, its output."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, run_dir: Path | None = None):
        self.log_inode = inode(run_dir / "log.h5") if run_dir else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=local_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.stdout = self.stderr = ""

    def ranks(self) -> list[psutil.Process]:
        """The hpctrain processes under the launcher (the ranks)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if _is_rank(c)]

    def wait(self, timeout: float = 120) -> int:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.stdout, self.stderr = self.proc.communicate()
            raise AssertionError(f"job hung for {timeout} s:\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}")
        return self.proc.returncode


def _is_rank(p: psutil.Process) -> bool:
    try:
        return "hpctrain" in " ".join(p.cmdline()) and "mpirun" not in p.name() and "torch.distributed.run" not in " ".join(p.cmdline())
    except psutil.Error:
        return False


def mpirun_job(np_: int, args: list[str], engine: str, run_dir: Path | None = None) -> Job:
    return Job(MPIRUN_Q + ["-np", str(np_)] + HPCTRAIN + args, {"HPCTRAIN_BACKEND": engine}, run_dir)


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def wait_for_steps(run_dir: Path, steps: int, job: Job, timeout: float = 120) -> None:
    """Until this job's log (a resume rewrites it: a new inode) has `steps` rows."""
    log = run_dir / "log.h5"
    before = job.log_inode
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.proc.poll() is None, job.proc.communicate()
        try:
            if inode(log) != before and len(read_log(log)["steps"]["step"]) >= steps:
                return
        except (UserError, OSError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps logged in {timeout} s")


def seconds_until_gone(processes: list[psutil.Process], since: float, timeout: float = 90) -> float:
    """Seconds from `since` until every process in the list has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"ranks {[p.pid for p in processes]} still running after {timeout} s")


def assert_intact(run_dir: Path) -> tuple[int, list[int]]:
    """The newest checkpoint loads and the log reads with contiguous steps; (checkpoint step, log steps)."""
    last = checkpoint.list_checkpoints(run_dir)[-1]
    state = checkpoint.load(last)
    steps = read_log(run_dir / "log.h5")["steps"]["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    return state["step"], steps


# --- a run directory belongs to one run -------------------------------------------------------------

def test_fresh_run_refuses_overwrite_moves_aside_stale_lock_taken_over(tmp_path):
    run_dir = tmp_path / "digits"
    run_cli(train_args(tmp_path, "train.max_steps=3"))
    start = time.monotonic()
    proc = run_cli(train_args(tmp_path, "train.max_steps=3"), check=False)
    line = one_line(proc)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert proc.returncode == 2 and checkpoint.list_checkpoints(run_dir)
    record("fresh run into a directory holding a run", "refused, one line", time.monotonic() - start)

    # A lock left by a pid that is gone (same host) is stale: taken over, saying so.
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job_id": "",
                                                 "time": "2020-01-01T00:00:00+00:00"}))
    proc = run_cli(train_args(tmp_path, "train.max_steps=3", "checkpoint.keep=5") + ["--overwrite"])
    assert "took over the stale lock" in proc.stdout and "moved the old run" in proc.stdout
    (old,) = tmp_path.glob("digits.old-*")
    assert read_log(old / "log.h5")["steps"]["step"].tolist() == [1, 2, 3]
    assert checkpoint.list_checkpoints(old) and not (run_dir / LOCK_NAME).exists()
    record("stale lock (dead pid, same host)", "taken over, said so", None)


def test_second_job_on_the_run_dir_refuses_and_sigusr1_to_launcher_checkpoints(tmp_path, engine):
    run_dir = tmp_path / "digits"
    first = mpirun_job(2, train_args(tmp_path, "train.epochs=200", "checkpoint.every_epochs=0"), engine)
    wait_for_steps(run_dir, 5, first)
    start = time.monotonic()
    second = mpirun_job(2, train_args(tmp_path, "train.epochs=1") + ["--resume=auto"], engine)
    rc = second.wait(120)
    line = one_line((rc, second.stderr))
    assert "is in use by another job" in line and "--resume" not in line
    record(f"second job on the same run directory ({engine})", "refused, one line", time.monotonic() - start)
    lock = json.loads((run_dir / LOCK_NAME).read_text())
    assert lock["pid"] in [p.pid for p in first.ranks()]        # the first job's lock is untouched

    ranks = first.ranks()
    start = time.monotonic()
    first.proc.send_signal(signal.SIGUSR1)                     # mpirun forwards it to every rank
    assert first.wait(120) == REQUEUE_EXIT_CODE, first.stderr
    seconds = seconds_until_gone(ranks, start)
    assert "SIGUSR1 received: every rank stopped after step" in first.stderr
    step, steps = assert_intact(run_dir)
    assert step == steps[-1]                                   # checkpoint of the last step logged: nothing lost
    assert not (run_dir / LOCK_NAME).exists()
    record(f"SIGUSR1 to mpirun ({engine})", f"checkpoint at step {step}, exit {REQUEUE_EXIT_CODE}", seconds)
    run_cli(train_args(tmp_path, f"train.max_steps={step + 2}", "train.epochs=200", "checkpoint.every_epochs=0")
            + ["--resume=auto"])
    assert read_log(run_dir / "log.h5")["steps"]["step"].tolist() == list(range(1, step + 3))


def test_sigterm_to_one_rank_and_to_torchrun(tmp_path):
    """SIGTERM to rank 1 alone: the request rides the loss allreduce, every rank stops at the same step.
    Then SIGTERM to torchrun's agent, which forwards it to every worker."""
    run_dir = tmp_path / "digits"
    job = mpirun_job(2, train_args(tmp_path, "train.epochs=200", "checkpoint.every_epochs=0"), "torch")
    wait_for_steps(run_dir, 5, job)
    ranks = sorted(job.ranks(), key=lambda p: p.pid)
    start = time.monotonic()
    ranks[-1].send_signal(signal.SIGTERM)
    assert job.wait(120) == REQUEUE_EXIT_CODE, job.stderr
    record("SIGTERM to one rank (torch engine, mpirun)", "all ranks checkpoint at the same step, exit 75",
           seconds_until_gone(ranks, start))
    step, steps = assert_intact(run_dir)
    assert step == steps[-1]

    job = Job(TORCHRUN + ["--nproc-per-node", "2", "-m", "hpctrain"]
              + train_args(tmp_path, "train.epochs=200", "checkpoint.every_epochs=0") + ["--resume=auto"],
              run_dir=run_dir)
    wait_for_steps(run_dir, step + 5, job)
    ranks = job.ranks()
    start = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    job.wait(120)
    seconds = seconds_until_gone(ranks, start)
    step2, steps = assert_intact(run_dir)
    assert step2 == steps[-1] and step2 > step
    assert "SIGTERM received" in job.stderr
    record("SIGTERM to torchrun", "checkpoint at the step in flight, workers exit 75", seconds)


def test_sigterm_to_mpirun_and_kill_9_of_rank_0_and_rank_1(tmp_path, engine):
    run_dir = tmp_path / "digits"
    args = train_args(tmp_path, "train.epochs=200", "checkpoint.every_steps=10", "checkpoint.every_epochs=0")
    job = mpirun_job(2, args, engine)
    wait_for_steps(run_dir, 5, job)
    ranks = job.ranks()
    start = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)    # mpirun: SIGTERM to every rank, SIGKILL 1 s later
    rc = job.wait(120)
    seconds = seconds_until_gone(ranks, start)
    assert len(error_lines(job.stderr)) <= 1, job.stderr
    step, steps = assert_intact(run_dir)
    outcome = ("checkpoint at the step in flight, exit 75" if rc == REQUEUE_EXIT_CODE and step == steps[-1]
               else "killed after Open MPI's 1 s grace; last checkpoint intact")
    record(f"SIGTERM to mpirun ({engine})", outcome, seconds)

    for victim in (0, 1):
        job = mpirun_job(2, args + ["--resume=auto"], engine, run_dir)
        wait_for_steps(run_dir, step + 12, job)
        ranks = job.ranks()
        target = sorted(ranks, key=lambda p: int(p.environ().get("OMPI_COMM_WORLD_RANK", "0")))[victim]
        start = time.monotonic()
        target.send_signal(signal.SIGKILL)
        job.wait(120)
        seconds = seconds_until_gone(ranks, start)
        assert job.proc.returncode != 0
        assert len(error_lines(job.stderr)) <= 1, job.stderr
        step, steps = assert_intact(run_dir)           # a checkpoint every 10 steps; the log goes on past it
        if victim == 0:                                # rank 0 held the lock: the next job takes it over
            assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == target.pid
        record(f"kill -9 of rank {victim} ({engine})", "job ends; resume from the last checkpoint", seconds)
    job = mpirun_job(2, args + ["--set", f"train.max_steps={steps[-1] + 1}", "--resume=auto"], engine)
    assert job.wait(120) == 0, job.stderr
    assert read_log(run_dir / "log.h5")["steps"]["step"].tolist() == list(range(1, steps[-1] + 2))


# --- resume checks, damaged checkpoints and logs --------------------------------------------------

def test_resume_checks_config_and_falls_back_past_a_corrupt_checkpoint(tmp_path):
    run_dir = tmp_path / "digits"
    run_cli(train_args(tmp_path, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5"))
    proc = run_cli(train_args(tmp_path, "model.args.width=64", "run.seed=3", "train.max_steps=9") + ["--resume"],
                   check=False)
    line = one_line(proc)
    assert "model.args" in line and "run.seed: 0 -> 3" in line and "cannot resume" in line
    ckpts = checkpoint.list_checkpoints(run_dir)
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:2000])           # the newest checkpoint is truncated
    proc = run_cli(train_args(tmp_path, "train.max_steps=9", "checkpoint.every_steps=3", "checkpoint.keep=5",
                              "log.layers_every=0") + ["--resume=auto"])
    assert f"resuming from the previous intact checkpoint {ckpts[-2].name}" in proc.stdout
    assert "resume: train.max_steps 6 -> 9 (applied)" in proc.stdout
    log = read_log(run_dir / "log.h5")
    assert log["steps"]["step"].tolist() == list(range(1, 10))    # steps 4..6 trained again, logged once
    assert any("train.max_steps 6 -> 9" in r for r in log["events"]["reason"])
    assert json.loads(log["attrs"]["config"])["train"]["max_steps"] == 9
    record("truncated newest checkpoint", "resumes from the previous one, saying so", None)
    record("resume with a different model or seed", "refused, one line listing each difference", None)


def test_each_rank_writes_its_own_file_and_a_missing_one_falls_back(tmp_path):
    """Residuals (a model's worth per rank) go to one file per rank, never through rank 0; a
    checkpoint missing a rank's file is passed over, and a killed save's files are cleared."""
    run_dir, sets = tmp_path / "digits", ["compression.name=topk", "checkpoint.every_steps=3", "checkpoint.keep=5"]
    job = mpirun_job(2, train_args(tmp_path, "train.max_steps=6", *sets), "horovod")
    assert job.wait(120) == 0, job.stderr
    older, newest = checkpoint.list_checkpoints(run_dir)
    state = checkpoint.load(newest)
    assert "compression" not in state and len(state["rank_bytes"]) == 2
    parts = [torch.load(checkpoint.rank_parts_path(newest, r), weights_only=False)["compression"] for r in (0, 1)]
    held = [torch.cat([s["residual"].flatten() for s in part.values() if s["residual"] is not None]) for part in parts]
    assert held[0].abs().sum() > 0 and not torch.equal(held[0], held[1])        # each rank's own residuals
    checkpoint.rank_parts_path(newest, 1).unlink()
    interrupted = checkpoint.rank_parts_path(checkpoint.checkpoint_path(run_dir, 8), 0)
    interrupted.parent.mkdir()
    interrupted.write_bytes(b"killed before its checkpoint was written")
    job = mpirun_job(2, train_args(tmp_path, "train.max_steps=9", *sets) + ["--resume=auto"], "horovod")
    assert job.wait(120) == 0, job.stderr
    assert (f"rank 1's file rank-000001.pt is missing; resuming from the previous intact checkpoint {older.name}"
            in job.stdout), job.stdout
    assert f"removed {interrupted.parent.name}, left by an interrupted checkpoint write" in job.stdout
    assert not interrupted.parent.exists()
    assert read_log(run_dir / "log.h5")["steps"]["step"].tolist() == list(range(1, 10))
    record("a rank's checkpoint file missing", "resumes from the previous checkpoint, saying so", None)


def test_damaged_log_never_hangs_report_or_resume(tmp_path):
    run_dir = tmp_path / "digits"
    run_cli(train_args(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2"))
    log = run_dir / "log.h5"
    log.write_bytes(log.read_bytes()[: log.stat().st_size // 2])
    start = time.monotonic()
    proc = run_cli(["report", log, "--out", tmp_path / "report"], check=False, timeout=60)
    seconds = time.monotonic() - start
    assert "is damaged" in one_line(proc) and seconds < 30
    record("truncated log: hpctrain report", "one line", seconds)
    start = time.monotonic()
    proc = run_cli(train_args(tmp_path, "train.max_steps=6", "checkpoint.every_steps=2") + ["--resume=auto"],
                   timeout=120)
    (aside,) = run_dir.glob("log.damaged-*.h5")
    assert aside.stat().st_size > 0 and "set aside as" in proc.stdout
    assert read_log(log)["steps"]["step"].tolist() == [5, 6]        # continues from the checkpoint's step
    record("truncated log: --resume", "set aside, new log from the checkpoint's step", time.monotonic() - start)


# --- full disks -----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_is_one_line_and_resume_continues_after_space_is_freed(small_disk):
    run_dir = small_disk / "digits"
    args = train_args(small_disk, "train.epochs=50", "checkpoint.every_steps=5", "checkpoint.keep=100",
                      "checkpoint.every_epochs=0", "log.layers_every=0")
    start = time.monotonic()
    proc = run_cli(args, check=False, timeout=120)
    line = one_line(proc)
    assert "disk full writing" in line and str(small_disk) in line and "free there" in line
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    step, steps = assert_intact(run_dir)
    record("disk full while checkpointing", "one line (path, free space); temp file removed", time.monotonic() - start)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    run_cli(train_args(small_disk, f"train.max_steps={step + 3}", "train.epochs=50", "checkpoint.every_steps=5",
                       "checkpoint.every_epochs=0", "log.layers_every=0") + ["--resume=auto"], timeout=120)
    assert read_log(run_dir / "log.h5")["steps"]["step"].tolist() == list(range(1, step + 4))


# --- data integrity, divergence -------------------------------------------------------------------

def test_data_integrity_fractional_labels_and_a_shard_truncated_mid_run(tmp_path):
    from hpctrain.config import DataConfig
    from hpctrain.data import load_splits

    soft = tmp_path / "soft.h5"
    with h5py.File(soft, "w") as f:
        f["x"], f["y"] = np.zeros((40, 4), np.float32), np.linspace(0, 3, 40)
    with pytest.raises(UserError, match=r"non-integer labels .*y\[1\]"):
        load_splits(DataConfig(name=str(soft)))
    shards = tmp_path / "shards"
    run_cli(["shard", "--input", "digits", "--out", shards, "--shard-size", "200"])
    index = shards / "index.h5"
    with h5py.File(index, "a") as f:             # one label changed, size unchanged
        f["y"][5] = (f["y"][5] + 1) % 10
    with pytest.raises(UserError, match="SHA-256 checksum mismatch"):
        load_splits(DataConfig(name=str(shards)))
    shutil.rmtree(shards)
    run_cli(["shard", "--input", "digits", "--out", shards, "--shard-size", "200"])
    val_shard = max(shards.glob("shard-*.h5"))   # a validation shard: first read at the first evaluation
    job = Job(HPCTRAIN + train_args(tmp_path, f"data.name='{shards}'", "batch.initial=4", "train.epochs=3"))
    wait_for_steps(tmp_path / "digits", 2, job)
    start = time.monotonic()
    with open(val_shard, "r+b") as f:
        f.truncate(val_shard.stat().st_size // 2)
    job.wait(120)
    line = one_line((job.proc.returncode, job.stderr))
    assert val_shard.name in line and "truncated" in line
    record("shard truncated mid-run", "one line naming the shard", time.monotonic() - start)


def test_divergence_stops_before_a_checkpoint_one_message(tmp_path):
    start = time.monotonic()
    job = mpirun_job(2, train_args(tmp_path, "train.optimizer='adam'", "train.lr=1e6", "train.epochs=2"), "torch")
    rc = job.wait(120)
    line = one_line((rc, job.stderr))
    assert "exploded" in line or "non-finite loss" in line, line
    assert "[rank" not in line and not checkpoint.list_checkpoints(tmp_path / "digits")
    record("loss explodes (Adam, lr 1e6), 2 ranks", "one line, no checkpoint of the diverged model",
           time.monotonic() - start)

    data = tmp_path / "nanval.h5"
    rng = np.random.default_rng(0)
    with h5py.File(data, "w") as f:
        f["x"], f["y"] = rng.normal(size=(128, 8)).astype(np.float32), np.arange(128) % 4
        x_val = rng.normal(size=(32, 8)).astype(np.float32)
        x_val[3] = np.nan
        f["x_val"], f["y_val"] = x_val, np.arange(32) % 4
    proc = run_cli(train_args(tmp_path, f"data.name='{data}'", "batch.initial=32", name="nanval"), check=False)
    assert "non-finite validation loss" in one_line(proc)
    assert not checkpoint.list_checkpoints(tmp_path / "nanval")
    record("non-finite validation loss", "one line, no checkpoint", None)

    proc = subprocess.run(MPIRUN_Q + ["-np", "2"] + HPCTRAIN + train_args(tmp_path, "train.epoch=3"), cwd=REPO,
                          env=local_env({"HPCTRAIN_BACKEND": "horovod"}), capture_output=True, text=True, timeout=120)
    assert "unknown key 'train.epoch'" in one_line(proc) and "[rank" not in proc.stderr
