"""The communicator in use, and the few calls the rest of hpctrain makes on it.

    from hpctrain import comm
    comm.init(backend="auto")      # or "horovod" / "torch"; HPCTRAIN_BACKEND overrides
    work = comm.get().allreduce_async(tensor, name="x")

Engines live in their own modules (`horovod.py`, `torch_distributed.py`) and are imported only
when chosen. `auto` picks Horovod when it imports and the job was started by mpirun,
horovodrun or jsrun, torch.distributed otherwise (torchrun, srun, one plain process).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Literal

from hpctrain.comm import launcher
from hpctrain.comm.base import Communicator, Work
from hpctrain.errors import UserError

if TYPE_CHECKING:
    import torch

Backend = Literal["auto", "horovod", "torch"]
BACKENDS = ("auto", "horovod", "torch")
# Seconds a rank that did not fail waits, when told to stop quietly, for the failing rank's
# own message and abort to reach it first (one message per failure).
QUIET_EXIT_GRACE_S = 10.0

__all__ = ["Communicator", "Work", "init", "get", "is_initialized", "rank", "size", "local_rank", "local_size",
           "is_root", "pick_device", "abort", "broadcast_parameters", "choose_engine"]

_active: Communicator | None = None


def choose_engine(backend: str, launch: launcher.Launch) -> str:
    """'horovod' or 'torch' for a `dist.backend` value (HPCTRAIN_BACKEND wins over it)."""
    backend = os.environ.get("HPCTRAIN_BACKEND") or backend
    if backend not in BACKENDS:
        raise UserError(f"dist.backend (or HPCTRAIN_BACKEND) = {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    horovod_launch = launch.launcher in ("mpirun", "horovodrun", "jsrun")
    return "horovod" if horovod_launch and importlib.util.find_spec("horovod") is not None else "torch"


def init(backend: str = "auto", torch_backend: str = "auto", timeout_s: float = 600.0,
         device: str = "auto", bucket_mb: float = 25.0) -> Communicator:
    """Start the engine once per process (later calls return it) and give each rank its CPU share;
    `device` ("auto", "cuda", "cpu": where training runs) steers the torch engine's transport,
    `bucket_mb` its gradient buckets (config `dist.bucket_mb`)."""
    global _active
    if _active is not None:
        return _active
    launch = launcher.detect()
    engine = choose_engine(backend, launch)
    if engine == "horovod":
        if importlib.util.find_spec("horovod") is None:
            raise UserError("dist.backend = 'horovod' but Horovod is not installed; run scripts/setup.sh "
                            "or use dist.backend = 'torch'")
        from hpctrain.comm.horovod import HorovodCommunicator
        _active = HorovodCommunicator()
    else:
        from hpctrain.comm.torch_distributed import TorchCommunicator
        _active = TorchCommunicator(launch, torch_backend, timeout_s, device, bucket_mb)
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _active.local_size))
    return _active


def get() -> Communicator:
    """The communicator (started with the defaults if `init` was not called)."""
    return _active if _active is not None else init()


def is_initialized() -> bool:
    return _active is not None


def rank() -> int:
    return get().rank


def size() -> int:
    return get().size


def local_rank() -> int:
    return get().local_rank


def local_size() -> int:
    return get().local_size


def is_root() -> bool:
    return rank() == 0


def pick_device(preference: str = "auto") -> torch.device:
    """This rank's GPU when CUDA is available (or asked for), else the CPU."""
    import torch

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    device = getattr(get(), "device", None)
    if device is None or device.type != "cuda":
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def broadcast_parameters(params: Any, root_rank: int = 0) -> None:
    """Overwrite parameters (a state_dict, `named_parameters()` or a list of tensors) with the root's."""
    items = params.items() if hasattr(params, "items") else params
    tensors = [t[1] if isinstance(t, tuple) else t for t in items]
    get().broadcast_([t for t in tensors if t is not None], root=root_rank)


def _world_size_hint() -> int:
    return _active.size if _active is not None else launcher.detect().size


def abort(message: str | None, code: int = 1) -> None:
    """Print `message` from this rank and take the whole job down (no hang in the other ranks).

    With `message=None` this rank is not the one that failed: it prints nothing and gives the
    failing rank a moment to print its own line and stop the job first.
    """
    launch = launcher.detect()
    many = _world_size_hint() > 1
    if message is None:
        if many:
            time.sleep(QUIET_EXIT_GRACE_S)
    else:
        prefix = f"[rank {launch.rank}] " if many else ""
        print(f"hpctrain: error: {prefix}{message}", file=sys.stderr, flush=True)
    if many and launch.mpi:
        try:
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(code)
        except Exception:  # MPI unusable here: the launcher reaps the others when we exit
            pass
    os._exit(code)
