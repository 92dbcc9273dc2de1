"""Shared by tests and benchmarks: launch real `hpctrain` processes (one process, or a real
`mpirun -np N`), and synthetic gradients for the codecs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HPCTRAIN = [sys.executable, "-m", "hpctrain.cli"]
# The communication engines every multi-rank behaviour is tested on (HPCTRAIN_BACKEND picks one).
ENGINES = ("horovod", "torch")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Open MPI chooses its transports (shared memory between ranks of one machine).
MPIRUN_LOCAL = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
# TCP over loopback only: runs anywhere, and inside a throttled network namespace.
MPIRUN = MPIRUN_LOCAL + ["--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
                         "--mca", "oob_tcp_if_include", "lo"]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.update(extra or {})
    return env


def run_cli(args: list[str], cwd: Path | str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`hpctrain ARGS` as one plain process (no launcher)."""
    proc = subprocess.run(HPCTRAIN + [str(a) for a in args], cwd=cwd or REPO, env=_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpctrain {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_mpi(np: int, args: list[str], cwd: Path | str | None = None, timeout: float = 180,
            env: dict[str, str] | None = None, check: bool = True, program: list[str] | None = None,
            engine: str | None = None) -> subprocess.CompletedProcess:
    """`mpirun -np NP hpctrain ARGS` (or `program ARGS`), over TCP loopback so it runs anywhere;
    `engine` ("horovod", "torch") overrides the engine `auto` would choose (Horovod)."""
    cmd = MPIRUN + ["-np", str(np)] + (program or HPCTRAIN) + [str(a) for a in args]
    return _run(cmd, f"mpirun -np {np}", args, cwd, timeout, env, check, engine)


def run_torchrun(np: int, args: list[str], cwd: Path | str | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None, check: bool = True,
                 program: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NP -m hpctrain ARGS` (or `program ARGS`): the torch engine."""
    cmd = TORCHRUN + ["--nproc-per-node", str(np)] + (program[1:] if program else ["-m", "hpctrain"])
    return _run(cmd + [str(a) for a in args], f"torchrun -np {np}", args, cwd, timeout, env, check, None)


def _run(cmd: list[str], what: str, args: list, cwd: Path | str | None, timeout: float,
         env: dict[str, str] | None, check: bool, engine: str | None) -> subprocess.CompletedProcess:
    env = dict(env or {}, **({"HPCTRAIN_BACKEND": engine} if engine else {}))
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def heavy_tailed_grads(shape: tuple[int, ...], steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Gradient-like data: Gaussian noise times a fixed per-weight magnitude e^N(0,1), as real
    layers have quiet and busy weights side by side (AdaComp sends about what it sends in
    training from these: ~45× on conv kernels, ~290× on fc layers; from plain noise 20×, 127×)."""
    magnitude = torch.exp(torch.randn(shape, generator=generator))
    return [magnitude * torch.randn(shape, generator=generator) for _ in range(steps)]
