"""The only module that talks to Horovod/MPI directly.

Everything else asks this module for rank/size, the device, and the few collectives it
needs, so the rest of the code stays testable on one process and the MPI glue stays thin.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:        # torch is imported lazily: `hpctrain jobs` must start fast
    import torch

_LAUNCHER_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                       "SLURM_PROCID", "JSM_NAMESPACE_RANK")

_hvd = None


def launcher_rank() -> int:
    """This process's rank as the launcher (mpirun, srun, jsrun, horovodrun) set it, before init."""
    for var in _LAUNCHER_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def init() -> None:
    """Start Horovod once, and give each rank its share of the CPU cores."""
    global _hvd
    if _hvd is not None:
        return
    import horovod.torch as hvd

    import torch

    hvd.init()
    _hvd = hvd
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))


def hvd():
    """The initialised `horovod.torch` module."""
    if _hvd is None:
        init()
    return _hvd


def rank() -> int:
    return hvd().rank()


def size() -> int:
    return hvd().size()


def local_rank() -> int:
    return hvd().local_rank()


def is_root() -> bool:
    return rank() == 0


def pick_device(preference: str = "auto") -> torch.device:
    """cuda:<local_rank> when CUDA is available (or asked for), else cpu."""
    import torch

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from hpctrain.errors import UserError
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    index = local_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def abort(message: str, code: int = 1) -> None:
    """Print `message` from this rank and take the whole job down (no hang in the other ranks)."""
    prefix = f"[rank {launcher_rank()}] " if _world_size_hint() > 1 else ""
    print(f"hpctrain: error: {prefix}{message}", file=sys.stderr, flush=True)
    if _world_size_hint() > 1:
        try:
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(code)
        except Exception:  # not an MPI launch (e.g. horovodrun --gloo): the launcher reaps us
            pass
    os._exit(code)


def _world_size_hint() -> int:
    if _hvd is not None and _hvd.is_initialized():
        return _hvd.size()
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "JSM_NAMESPACE_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def broadcast_object(obj: Any, root: int = 0, name: str | None = None) -> Any:
    return hvd().broadcast_object(obj, root_rank=root, name=name)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    return hvd().allgather_object(obj, name=name)


def broadcast_parameters(params: Any, root: int = 0) -> None:
    hvd().broadcast_parameters(params, root_rank=root)



def allreduce_async(tensor: torch.Tensor, name: str, average: bool = True) -> int:
    """The result comes from `synchronize`; `tensor` is left as it is (a compressor may reuse it)."""
    h = hvd()
    return h.allreduce_async(tensor, name=name, op=h.Average if average else h.Sum)


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], name: str, average: bool = True) -> int:
    h = hvd()
    return h.grouped_allreduce_async_(list(tensors), name=name, op=h.Average if average else h.Sum)


def allgather_async(tensor: torch.Tensor, name: str) -> int:
    """Gather along dim 0; ranks may contribute different lengths (sparse payloads)."""
    return hvd().allgather_async(tensor, name=name)


def synchronize(handle: int) -> Any:
    return hvd().synchronize(handle)


def sendable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or an fp32 copy where Horovod cannot carry its dtype (0.28 has no bfloat16)."""
    import torch

    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def allreduce_scalars(values: Sequence[float], name: str, average: bool = True) -> list[float]:
    """Reduce a few Python floats across ranks (statistics, not gradients)."""
    import torch

    h = hvd()
    out = h.allreduce(torch.tensor(values, dtype=torch.float64), name=name,
                      op=h.Average if average else h.Sum)
    return out.tolist()


def barrier() -> None:
    hvd().barrier()
