"""The torch.distributed engine beside Horovod: launcher detection, every launcher it runs under
(torchrun, mpirun, one plain process; srun is tests/test_jobs.py's real Slurm), and a killed
rank taking the whole job down."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hpctrain.comm import choose_engine, launcher
from hpctrain.errors import UserError
from hpctrain.local_launch import HPCTRAIN, MPIRUN, TORCHRUN, local_env, run_cli, run_torchrun
from tests.helpers import REPO

DIGITS = str(REPO / "configs" / "digits.toml")

LAUNCHES = {
    "torchrun": ({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                  "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"},
                 launcher.Launch("torchrun", 3, 8, 1, 4, "node7", 29500)),
    "srun": ({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "12",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3,1",
              "SLURM_STEP_NODELIST": "nid[001234-001236,001300]", "PMIX_RANK": "5"},
             launcher.Launch("srun", 5, 12, 1, 4, "nid001234", launcher.SLURM_PORT_BASE + 1234 * 16)),
    "mpirun": ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, launcher.Launch("mpirun", 2, 4, 0, 2)),
    "jsrun": ({"JSM_NAMESPACE_RANK": "7", "JSM_NAMESPACE_SIZE": "12", "JSM_NAMESPACE_LOCAL_RANK": "1",
               "JSM_NAMESPACE_LOCAL_SIZE": "6", "OMPI_COMM_WORLD_RANK": "7"}, launcher.Launch("jsrun", 7, 12, 1, 6)),
    "none": ({}, launcher.Launch("none")),
}


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launcher_layout_from_its_environment(name, monkeypatch):
    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "PMI", "JSM_", "HOROVOD_", "TORCHELASTIC", "MASTER_")) or \
                var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", "/nonexistent")            # no scontrol: the node list is parsed here
    env, expected = LAUNCHES[name]
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launcher.detect() == expected
    assert choose_engine("auto", expected) == ("horovod" if name in ("mpirun", "jsrun") else "torch")
    assert choose_engine("torch", expected) == "torch"


@pytest.mark.parametrize("nodelist, first", [("nid001234", "nid001234"), ("a[3-5],b1", "a3"),
                                             ("gpu[07,09-12]", "gpu07"), ("h1,h2", "h1")])
def test_first_host_of_a_slurm_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert launcher.first_host(nodelist) == first


def test_an_unknown_backend_is_one_line(monkeypatch):
    monkeypatch.setenv("HPCTRAIN_BACKEND", "nccl")
    with pytest.raises(UserError, match="HPCTRAIN_BACKEND.*'nccl'.*auto, horovod, torch"):
        choose_engine("auto", launcher.Launch("none"))


def _train_args(tmp_path, *sets: str) -> list[str]:
    return ["train", "--config", DIGITS, "--set", f"run.out_dir={tmp_path}", "--set", "train.epochs=1",
            *[a for s in sets for a in ("--set", s)]]


def test_one_plain_process_runs_the_torch_engine(tmp_path):
    proc = run_cli(_train_args(tmp_path))
    assert "hpctrain: engine torch.distributed (gloo), 1 rank(s)" in proc.stdout


def test_torchrun_launches_the_torch_engine(tmp_path):
    proc = run_torchrun(2, _train_args(tmp_path, 'compression.name="lowrank"', "compression.min_numel=256"))
    assert proc.stdout.count("hpctrain: engine torch.distributed (gloo), 2 rank(s)") == 1, proc.stdout
    assert "val_accuracy" in proc.stdout


EXIT_PROBE = """
import atexit, os, sys
sys.path.insert(0, {repo!r})
def threads_left():      # registered first, so it runs after hpctrain's own shutdown
    names = sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    os.write(1, f"threads left at exit: {{' '.join(names)}}\\n".encode())
atexit.register(threads_left)
import torch
import hpctrain
hpctrain.init()
model = torch.nn.Linear(8, 8)
opt = hpctrain.DistributedOptimizer(torch.optim.Adam(model.parameters()), named_parameters=model.named_parameters())
model(torch.ones(2, 8)).sum().backward()
opt.step()
"""


def test_the_torch_engine_ends_gloos_threads_before_the_interpreter_exits(tmp_path):
    """A Gloo worker thread still alive when Python finalizes aborts the process now and then
    (it frees a finished collective's tensors and needs the GIL): hpctrain's shutdown must free the
    process group, even after torch.optim has imported torch._dynamo, which holds on to it."""
    probe = tmp_path / "exit_probe.py"
    probe.write_text(EXIT_PROBE.format(repo=str(REPO)))
    proc = run_torchrun(2, [], program=[sys.executable, str(probe)])
    assert proc.stdout.count("threads left at exit:") == 2 and "gloo" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("how", ["torchrun", "mpirun"])
def test_a_killed_rank_takes_the_torch_engine_job_down_within_60s(tmp_path, how):
    """kill -9 of rank 1 mid-training: no rank is left waiting in a collective."""
    args = [str(a) for a in _train_args(tmp_path, "train.epochs=500", "checkpoint.every_epochs=0")]
    cmd = (TORCHRUN + ["--nproc-per-node", "2", "-m", "hpctrain"] if how == "torchrun"
           else MPIRUN + ["-np", "2"] + HPCTRAIN) + args
    job = subprocess.Popen(cmd, cwd=REPO, env=local_env({"HPCTRAIN_BACKEND": "torch"}), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        for line in job.stdout:                          # wait until training runs
            seen.append(line)
            if "val_accuracy" in line:
                break
        assert job.poll() is None, "".join(seen)
        victim = _rank_pid(job.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=90)
        assert job.returncode != 0
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def _rank_pid(root: int, rank: int) -> int:
    """The pid of the training process of `rank` below the launcher `root` (from /proc)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            ranks = {e.split(b"=", 1)[1] for e in environ if e.startswith((b"RANK=", b"OMPI_COMM_WORLD_RANK="))}
            if b"hpctrain" in cmdline and b"torch.distributed.run" not in cmdline and str(rank).encode() in ranks \
                    and _descends_from(pid, root):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process found under {root}")


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
