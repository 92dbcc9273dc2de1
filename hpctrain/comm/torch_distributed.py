"""The torch.distributed engine (NCCL on CUDA, RCCL on ROCm, Gloo on CPU): the only module
that imports torch.distributed for training.

Every collective runs on one background thread, in the order the training thread submitted
it, so the training thread never blocks on the network (as Horovod's background thread) and
every rank issues the same collectives in the same order, which torch.distributed requires.
Nothing fuses collectives here (unlike Horovod's cycle): the optimizer fills buckets of
`bucket_bytes` itself, in the same order on every rank. A variable-length allgather, of one
tensor or of a bucket's, is two collectives on that thread: the lengths, then the payloads as
bytes, padded to the longest. With Gloo, CUDA tensors are staged through host memory.
"""
from __future__ import annotations

import atexit
import itertools
import math
import os
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import torch
import torch._dynamo  # noqa: F401  before init_process_group: see `TorchCommunicator.shutdown`
import torch.distributed as td

from hpctrain.comm.base import Communicator
from hpctrain.comm.launcher import Launch
from hpctrain.errors import InvalidArgument, UserError

TORCH_BACKENDS = ("auto", "nccl", "gloo")
# torch 2.13 renamed all_gather_into_tensor (older releases, e.g. 2.11 on GPU nodes, lack the new name).
_all_gather_single = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's entries as raw bytes (a view where its memory is laid out densely)."""
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:          # e.g. one value expanded, or an empty tensor (stride 0)
        flat = torch.empty(flat.numel(), dtype=flat.dtype, device=flat.device).copy_(flat)
    return flat.view(torch.uint8)


class _Future:
    """`Work` over a concurrent future: errors on the comm thread surface in `wait()`."""

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Any:
        return self._future.result()


def choose_backend(requested: str, local_size: int, device: str = "auto") -> tuple[str, str | None]:
    """(backend, why) for `dist.torch_backend`: NCCL where each local rank has its own GPU and
    trains on it (`device`: "auto", "cuda" or "cpu", as `train.device`)."""
    if requested not in TORCH_BACKENDS:
        raise UserError(f"dist.torch_backend = {requested!r}; choose one of {', '.join(TORCH_BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and device != "cpu" else 0
    if requested == "nccl":
        if not gpus:
            raise UserError("dist.torch_backend = 'nccl' but no GPU is visible (or train.device = 'cpu'); "
                            "use 'gloo' or 'auto'")
        if local_size > gpus:
            raise UserError(f"dist.torch_backend = 'nccl' with {local_size} ranks on a node with {gpus} GPU(s): NCCL "
                            "refuses two ranks on one GPU; launch one rank per GPU or use 'gloo'")
        return "nccl", None
    if requested == "gloo" or not gpus:
        return "gloo", None
    if local_size > gpus:
        return "gloo", f"{local_size} ranks share {gpus} GPU(s), which NCCL refuses: using Gloo"
    return "nccl", None


def _rendezvous(launch: Launch, timeout: timedelta) -> td.Store:
    """A TCPStore every rank reaches: the launcher's address, or rank 0's host sent over MPI."""
    addr, port = launch.master_addr, launch.master_port
    if addr is None or port is None:
        if not launch.mpi:
            raise UserError(f"{launch.launcher} started {launch.size} ranks without a rendezvous address; "
                            "set MASTER_ADDR and MASTER_PORT")
        from mpi4py import MPI

        host = "127.0.0.1" if launch.local_size == launch.size else socket.gethostname()
        store = td.TCPStore(host, port or 0, launch.size, is_master=True, timeout=timeout,
                            wait_for_workers=False) if launch.rank == 0 else None
        addr, port = MPI.COMM_WORLD.bcast((addr or host, store.port) if store is not None else None, root=0)
        if store is not None:
            return store
    return td.TCPStore(addr, port, launch.size, is_master=launch.rank == 0, timeout=timeout, wait_for_workers=False)


class TorchCommunicator(Communicator):
    engine = "torch"

    def __init__(self, launch: Launch, torch_backend: str = "auto", timeout_s: float = 600.0, device: str = "auto",
                 bucket_mb: float = 25.0):
        self.rank, self.size = launch.rank, launch.size
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.local_rank, self.local_size = launch.local_rank, launch.local_size
        self.simulate_nodes()
        self.backend, self.note = choose_backend(torch_backend, launch.local_size, device)
        self.device = torch.device("cpu")
        if self.backend == "nccl":
            self.device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")   # a dead peer ends the job, not a hang
        timeout = timedelta(seconds=timeout_s)
        if td.is_initialized():              # the user's own init_process_group (e.g. for DDP): adopt it
            self.rank, self.size, self.backend = td.get_rank(), td.get_world_size(), td.get_backend()
        elif launch.launcher == "torchrun":      # its agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)
            td.init_process_group(self.backend, init_method="env://", rank=self.rank, world_size=self.size,
                                  timeout=timeout)
        else:
            store = td.HashStore() if launch.size == 1 else _rendezvous(launch, timeout)
            td.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size, timeout=timeout)
        # One thread: collectives leave in submission order. It must see this rank's GPU as current.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hpctrain-comm", initializer=self._bind_device)
        atexit.register(self.shutdown)

    def _bind_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def describe(self) -> str:
        name = "rccl" if self.backend == "nccl" and torch.version.hip else self.backend
        return f"torch.distributed ({name})"

    # -- running on the comm thread ----------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> _Future:
        """Run `fn(*args)` on the comm thread after everything submitted before it; `fn` may
        call the blocking `reduce` and `allgather` below (and torch.distributed itself)."""
        return _Future(self._thread.submit(fn, *args))

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._thread.submit(fn, *args).result()

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where the backend reads from: Gloo takes CUDA tensors through host memory."""
        if self.backend == "gloo" and tensor.is_cuda:
            return tensor.detach().to("cpu")
        return tensor.detach()

    def reduce(self, tensors: list[torch.Tensor], average: bool, group: Any = None) -> list[torch.Tensor]:
        """Sum (or mean) of tensors over `group` (None: every rank), fused into one flat buffer
        per dtype (on the comm thread)."""
        size = self.size if group is None else td.get_world_size(group)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for indices in by_dtype.values():
            flat = torch.cat([self._wire(tensors[i]).reshape(-1) for i in indices]) if len(indices) > 1 \
                else self._wire(tensors[indices[0]]).reshape(-1).clone()
            td.all_reduce(flat, group=group)
            if average:
                flat.mul_(1.0 / size)       # as Horovod's Average: sum, then scale by 1/size
            for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                out[i] = part.view(tensors[i].shape).to(tensors[i].device)
        return out

    def allgather(self, tensors: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
        """Variable-length allgathers along dim 0 of several tensors over `group` (None: every
        rank), as two collectives (on the comm thread): every tensor's length, then all payloads
        as bytes, each rank's padded to the longest."""
        size = self.size if group is None else td.get_world_size(group)
        wires = [self._wire(t) for t in tensors]
        device = wires[0].device
        counts = torch.zeros(size * len(wires), dtype=torch.int64, device=device)
        _all_gather_single(counts, torch.tensor([w.shape[0] for w in wires], dtype=torch.int64, device=device),
                           group=group)
        rows = counts.view(size, len(wires)).tolist()             # rows[rank][tensor]
        row_bytes = [math.prod(w.shape[1:]) * w.element_size() for w in wires]
        sent = [[n * b for n, b in zip(its_rows, row_bytes)] for its_rows in rows]   # sent[rank][tensor]: bytes
        longest = max(sum(s) for s in sent)
        flat = torch.cat([_as_bytes(w) for w in wires])
        flat = torch.cat([flat, flat.new_zeros(longest - flat.numel())]) if flat.numel() < longest else flat
        gathered = flat.new_empty(size * longest)
        _all_gather_single(gathered, flat, group=group)
        starts = [[r * longest + offset for offset in itertools.accumulate(s, initial=0)] for r, s in enumerate(sent)]
        return [torch.cat([gathered[starts[r][i]: starts[r][i] + sent[r][i]] for r in range(size)])   # a copy: aligned
                .view(w.dtype).view(-1, *w.shape[1:]).to(t.device)
                for i, (w, t) in enumerate(zip(wires, tensors))]

    # -- the interface -----------------------------------------------------------------
    def group_ranks(self, group: Any = None) -> list[int]:
        if group is None or group is td.group.WORLD:
            return list(range(self.size))
        if group is td.GroupMember.NON_GROUP_MEMBER:        # what new_group() gives a rank outside it
            raise InvalidArgument(f"process group does not include this rank ({self.rank})")
        if not isinstance(group, td.ProcessGroup):
            raise InvalidArgument(f"process_set={group!r}: on the torch engine pass a torch.distributed process "
                                  "group (torch.distributed.new_group(ranks)); a Horovod ProcessSet needs "
                                  "HPCTRAIN_BACKEND=horovod")
        ranks = td.get_process_group_ranks(group)
        if self.rank not in ranks:
            raise InvalidArgument(f"process group with ranks {ranks} does not include this rank ({self.rank})")
        return ranks

    def allreduce_async(self, tensor: torch.Tensor, name: str, average: bool = True, group: Any = None) -> _Future:
        return self.submit(lambda: self.reduce([tensor], average, group)[0])

    def grouped_allreduce_async(self, tensors: Sequence[torch.Tensor], name: str, average: bool = True,
                                group: Any = None) -> _Future:
        return self.submit(self.reduce, list(tensors), average, group)

    def allgather_async(self, tensor: torch.Tensor, name: str, group: Any = None) -> _Future:
        return self.submit(lambda: self.allgather([tensor], group)[0])

    def grouped_allgather_async(self, tensors: Sequence[torch.Tensor], name: str, group: Any = None) -> _Future:
        return self.submit(self.allgather, list(tensors), group)

    def broadcast_async(self, tensor: torch.Tensor, root: int, name: str, group: Any = None) -> _Future:
        def broadcast() -> torch.Tensor:
            wire = self._wire(tensor).clone()
            td.broadcast(wire, src=root, group=group)      # src: a global rank
            return wire.to(tensor.device)
        return self.submit(broadcast)

    def new_group(self, ranks: list[int]) -> Any:
        return self._run(td.new_group, list(ranks))      # on the comm thread: after what is in flight

    def broadcast_(self, tensors: Iterable[torch.Tensor], root: int = 0) -> None:
        def broadcast() -> None:
            for t in tensors:
                wire = self._wire(t)
                td.broadcast(wire, src=root)
                if wire.data_ptr() != t.data_ptr():
                    with torch.no_grad():
                        t.copy_(wire)
        self._run(broadcast)

    def broadcast_object(self, obj: Any, root: int = 0, name: str | None = None) -> Any:
        box = [obj if self.rank == root else None]
        self._run(td.broadcast_object_list, box, root)
        return box[0]

    def allgather_object(self, obj: Any, name: str | None = None) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._run(td.all_gather_object, out, obj)
        return out

    def allreduce_scalars(self, values: Sequence[float], name: str, average: bool = True) -> list[float]:
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        (out,) = self._run(self.reduce, [torch.tensor(values, dtype=torch.float64, device=device)], average)
        return out.tolist()

    def barrier(self) -> None:
        self._run(td.barrier)

    def shutdown(self) -> None:
        """Free the process group while the interpreter is whole, so Gloo's worker threads end here:
        one still releasing a finished collective's tensors at interpreter exit aborts the process
        ("terminate called without an active exception"). torch.optim imports torch._dynamo, which,
        imported after init_process_group, keeps references to the default group that
        destroy_process_group cannot drop: this module imports it first."""
        if td.is_initialized():
            self._thread.shutdown(wait=True)
            td.destroy_process_group()
