"""Launch hpctrain on this machine the way users do — one process, `mpirun` over TCP loopback,
or `torchrun` — for the tests, the benchmarks and the GPU check (real launchers, no mocks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

HPCTRAIN = [sys.executable, "-m", "hpctrain"]
# The communication engines every multi-rank behaviour is tested on (HPCTRAIN_BACKEND picks one).
ENGINES = ("horovod", "torch")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Open MPI chooses its transports (shared memory between ranks of one machine).
MPIRUN_LOCAL = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
# TCP over loopback only: runs anywhere, and inside a throttled network namespace.
MPIRUN = MPIRUN_LOCAL + ["--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
                         "--mca", "oob_tcp_if_include", "lo"]


def local_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with one torch thread per process (many ranks share few cores; more
    threads only spin-wait), unbuffered output and no progress bars."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **(extra or {}))


def run(cmd: Sequence[str], args: Sequence[object], cwd: Path | str | None = None, timeout: float = 180,
        env: dict[str, str] | None = None, check: bool = True, engine: str | None = None) -> subprocess.CompletedProcess:
    """`cmd ARGS` to completion; with `check`, a failure raises AssertionError with all output.
    `engine` ("horovod", "torch") overrides the engine `auto` would choose."""
    env = dict(env or {}, **({"HPCTRAIN_BACKEND": engine} if engine else {}))
    full = [*cmd, *map(str, args)]
    proc = subprocess.run(full, cwd=cwd, env=local_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(args: Sequence[object], cwd: Path | str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`hpctrain ARGS` as one plain process (no launcher)."""
    return run(HPCTRAIN, args, cwd, timeout, env, check)


def run_mpi(np: int, args: Sequence[object], cwd: Path | str | None = None, timeout: float = 180,
            env: dict[str, str] | None = None, check: bool = True, program: list[str] | None = None,
            engine: str | None = None) -> subprocess.CompletedProcess:
    """`mpirun -np NP hpctrain ARGS` (or `program ARGS`), over TCP loopback so it runs anywhere."""
    return run([*MPIRUN, "-np", str(np), *(program or HPCTRAIN)], args, cwd, timeout, env, check, engine)


def run_torchrun(np: int, args: Sequence[object], cwd: Path | str | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None, check: bool = True,
                 program: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NP -m hpctrain ARGS` (or `program ARGS`, its interpreter dropped)."""
    target = program[1:] if program else ["-m", "hpctrain"]
    return run([*TORCHRUN, "--nproc-per-node", str(np), *target], args, cwd, timeout, env, check)
