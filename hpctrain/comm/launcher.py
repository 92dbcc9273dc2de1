"""Who started this process, and where it sits: rank, world size, local rank, rendezvous.

Read from the launcher's environment before any engine starts, so the engine can be chosen
from it and the torch.distributed engine needs no torchrun:

| launcher    | variables                                   | rendezvous address                      |
|-------------|---------------------------------------------|-----------------------------------------|
| torchrun    | RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR   | torchrun's own                          |
| srun        | SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID   | first host of the step's node list, port from the job id |
| mpirun      | OMPI_COMM_WORLD_*, PMI_* / PMIX_RANK        | rank 0's host, sent by MPI              |
| jsrun       | JSM_NAMESPACE_*                             | rank 0's host, sent by MPI              |
| horovodrun  | HOROVOD_RANK, HOROVOD_SIZE, ...             | (Horovod engine)                        |

MASTER_ADDR / MASTER_PORT in the environment win over the derived address.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

# Port range for addresses derived from a Slurm job id (clear of torchrun's 29500 default).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 30000, 20000


@dataclass(frozen=True)
class Launch:
    launcher: str            # "torchrun", "srun", "mpirun", "jsrun", "horovodrun" or "none"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    master_addr: str | None = None     # None: ask MPI (rank 0's host) when size > 1
    master_port: int | None = None

    @property
    def mpi(self) -> bool:
        """Started by an MPI launcher: mpi4py can exchange the address and abort the job."""
        return self.launcher in ("mpirun", "jsrun")


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def detect() -> Launch:
    """The launch this process is part of (torchrun first: it may run under srun or mpirun)."""
    env = os.environ
    addr = env.get("MASTER_ADDR") or None
    port = _int("MASTER_PORT")
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return Launch("torchrun", _int("RANK"), _int("WORLD_SIZE"), _int("LOCAL_RANK"),
                      _int("LOCAL_WORLD_SIZE", 1), addr, port)
    if "HOROVOD_RANK" in env:
        return Launch("horovodrun", _int("HOROVOD_RANK"), _int("HOROVOD_SIZE"), _int("HOROVOD_LOCAL_RANK"),
                      _int("HOROVOD_LOCAL_SIZE", 1), addr, port)
    if "JSM_NAMESPACE_RANK" in env:
        return Launch("jsrun", _int("JSM_NAMESPACE_RANK"), _int("JSM_NAMESPACE_SIZE"),
                      _int("JSM_NAMESPACE_LOCAL_RANK"), _int("JSM_NAMESPACE_LOCAL_SIZE", 1), addr, port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:      # inside srun (not just an allocation)
        job, step = _int("SLURM_JOB_ID", 0), _int("SLURM_STEP_ID", 0)
        tasks_here = _tasks_on_this_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"),
                                         _int("SLURM_NODEID", 0))
        return Launch("srun", _int("SLURM_PROCID"), _int("SLURM_NTASKS", _int("SLURM_NPROCS", 1)),
                      _int("SLURM_LOCALID", 0), tasks_here,
                      addr or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")),
                      port or SLURM_PORT_BASE + (job * 16 + step) % SLURM_PORT_SPAN)
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("mpirun", _int("OMPI_COMM_WORLD_RANK"), _int("OMPI_COMM_WORLD_SIZE"),
                      _int("OMPI_COMM_WORLD_LOCAL_RANK", 0), _int("OMPI_COMM_WORLD_LOCAL_SIZE", 1), addr, port)
    for prefix in ("PMI", "PMIX"):                          # MPICH / Intel MPI hydra, PMIx launchers
        if f"{prefix}_RANK" in env:
            return Launch("mpirun", _int(f"{prefix}_RANK"), _int(f"{prefix}_SIZE", 1),
                          _int("MPI_LOCALRANKID", 0), _int("MPI_LOCALNRANKS", 1), addr, port)
    return Launch("none", master_addr=addr, master_port=port)


def _tasks_on_this_node(spec: str, node_index: int) -> int:
    """Slurm's tasks-per-node spec ("4(x2),3") → how many tasks run on node `node_index`."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if node_index < len(counts) else (counts[-1] if counts else 1)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("nid[001234-001240,001300]" → "nid001234")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"([^,\[]+)(?:\[([^\],]+))?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(2)
    return prefix + ranges.split("-")[0] if ranges else prefix
