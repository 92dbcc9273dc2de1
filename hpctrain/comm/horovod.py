"""The Horovod engine: the only module that imports horovod.

Horovod runs collectives on its own background thread, matched across ranks by name, and
fuses small ones (HOROVOD_FUSION_THRESHOLD, HOROVOD_CYCLE_TIME). Process sets can be added
after init (HOROVOD_DYNAMIC_PROCESS_SETS=1, set here unless the job exported it): the
hierarchical exchange creates its node and leader sets when an optimizer asks for them.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch

from hpctrain.comm.base import Communicator
from hpctrain.errors import InvalidArgument, UserError


class _Handle:
    def __init__(self, hvd: Any, handle: int):
        self._hvd, self._handle = hvd, handle

    def done(self) -> bool:
        return bool(self._hvd.poll(self._handle))

    def wait(self) -> Any:
        return self._hvd.synchronize(self._handle)


class HorovodCommunicator(Communicator):
    engine = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd

        os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
        hvd.init()
        self.hvd = hvd
        self.backend = "mpi" if hvd.mpi_enabled() else "gloo"
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.simulate_nodes()

    @property
    def fusion_bytes(self) -> int:
        """Horovod's fusion buffer: HOROVOD_FUSION_THRESHOLD (`horovod.fusion_threshold_mb`), 64 MiB unset."""
        return int(os.environ.get("HOROVOD_FUSION_THRESHOLD", 64 * 2**20))

    def _op(self, average: bool) -> Any:
        return self.hvd.Average if average else self.hvd.Sum

    def _set(self, group: Any) -> Any:
        """The Horovod process set for `group` (None: the global one)."""
        if group is None:
            return self.hvd.global_process_set
        self.group_ranks(group)          # checks it
        return group

    def group_ranks(self, group: Any = None) -> list[int]:
        if group is None or group is self.hvd.global_process_set or getattr(group, "process_set_id", None) == 0:
            return list(range(self.size))
        if not isinstance(group, self.hvd.ProcessSet):
            raise InvalidArgument(f"process_set={group!r}: on the Horovod engine pass a horovod ProcessSet "
                                  "(a torch.distributed group needs HPCTRAIN_BACKEND=torch)")
        if group.process_set_id is None or group.ranks is None:
            raise InvalidArgument(f"process_set {group} is not registered with Horovod: pass it to "
                                  "hvd.init(process_sets=[...]) or hvd.add_process_set() on every rank first")
        ranks = list(group.ranks)
        if self.rank not in ranks:
            raise InvalidArgument(f"process_set with ranks {ranks} does not include this rank ({self.rank})")
        return ranks

    def allreduce_async(self, tensor: torch.Tensor, name: str, average: bool = True, group: Any = None) -> _Handle:
        return _Handle(self.hvd, self.hvd.allreduce_async(tensor, name=name, op=self._op(average),
                                                          process_set=self._set(group)))

    def grouped_allreduce_async(self, tensors: Sequence[torch.Tensor], name: str, average: bool = True,
                                group: Any = None) -> _Handle:
        return _Handle(self.hvd, self.hvd.grouped_allreduce_async_(list(tensors), name=name, op=self._op(average),
                                                                   process_set=self._set(group)))

    def allgather_async(self, tensor: torch.Tensor, name: str, group: Any = None) -> _Handle:
        return _Handle(self.hvd, self.hvd.allgather_async(tensor, name=name, process_set=self._set(group)))

    def grouped_allgather_async(self, tensors: Sequence[torch.Tensor], name: str, group: Any = None) -> _Handle:
        return _Handle(self.hvd, self.hvd.grouped_allgather_async(list(tensors), name=name,
                                                                  process_set=self._set(group)))

    def broadcast_async(self, tensor: torch.Tensor, root: int, name: str, group: Any = None) -> _Handle:
        return _Handle(self.hvd, self.hvd.broadcast_async(tensor, root_rank=root, name=name,
                                                          process_set=self._set(group)))

    def new_group(self, ranks: list[int]) -> Any:
        try:
            return self.hvd.add_process_set(list(ranks))
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"Horovod cannot add the process set {ranks} ({exc}); hierarchical exchange needs "
                            "HOROVOD_DYNAMIC_PROCESS_SETS=1 at hvd.init (set it in the job, or let hpctrain "
                            "initialise Horovod)") from None

    def broadcast_(self, tensors: Iterable[torch.Tensor], root: int = 0) -> None:
        handles = [self.hvd.broadcast_async_(t, root_rank=root, name=f"hpctrain.broadcast.{i}")
                   for i, t in enumerate(tensors)]
        for handle in handles:
            self.hvd.synchronize(handle)

    def broadcast_object(self, obj: Any, root: int = 0, name: str | None = None) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=root, name=name)

    def allgather_object(self, obj: Any, name: str | None = None) -> list[Any]:
        return self.hvd.allgather_object(obj, name=name)

    def allreduce_scalars(self, values: Sequence[float], name: str, average: bool = True) -> list[float]:
        out = self.hvd.allreduce(torch.tensor(values, dtype=torch.float64), name=name, op=self._op(average))
        return out.tolist()

    def barrier(self) -> None:
        self.hvd.barrier()

    def sendable(self, tensor: torch.Tensor) -> torch.Tensor:
        """Horovod 0.28 cannot carry bfloat16: such payloads travel as fp32."""
        return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def apply_environment(fusion_threshold_mb: float, cycle_time_ms: float) -> None:
    """Horovod reads its tuning knobs from the environment at init; a job script's exports win."""
    os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(int(fusion_threshold_mb * 1024 * 1024)))
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cycle_time_ms))
