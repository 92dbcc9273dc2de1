"""The communicator interface: what the optimizer, trainer, scoring and batch growth need from
an engine (Horovod or torch.distributed), and nothing more.

Collectives that carry gradients are asynchronous and return a `Work` (poll with `done()`, get
the result with `wait()`). Every rank must start the same collectives in the same order:
torch.distributed matches them by order; Horovod by name, which the names passed here give it.
Object and scalar collectives block.

The gradient collectives take an optional `group`: a subset of the ranks (a Horovod
`ProcessSet` on the Horovod engine, a `torch.distributed` process group on the torch engine);
None is every rank. Only the members of the group call them; `group_ranks` lists the members.
`new_group` creates a group (every rank calls it, members or not), `broadcast_async` sends one
rank's tensor to a group, and `node_groups` holds the groups of the hierarchical exchange
(`hpctrain.comm.nodes`), created once per communicator.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

if TYPE_CHECKING:        # torch is imported lazily: `hpctrain jobs` must start fast
    import torch

    from hpctrain.comm.nodes import NodeGroups


class Work(Protocol):
    """A collective in flight."""

    def done(self) -> bool:
        """Whether `wait()` would return at once."""

    def wait(self) -> Any:
        """Block until complete; the result tensor (or list of tensors for a grouped allreduce)."""


class Communicator(abc.ABC):
    """One engine's collectives. Subclasses set `engine` and `backend` and the rank layout."""

    engine: str          # "horovod" or "torch"
    backend: str         # the transport under it: "mpi", "gloo", "nccl"
    rank: int
    size: int
    local_rank: int
    local_size: int
    # Bytes of gradient allreduces the optimizer fuses into one collective, in launch order
    # (`hpctrain.optimizer.buckets`); 0 where the engine fuses on its own (Horovod's cycle).
    bucket_bytes: int = 0

    @property
    def fusion_bytes(self) -> int:
        """The most gradient bytes one fused collective carries (the cost model's `Fusion`): the
        optimizer's buckets here, the engine's own buffer where it fuses (Horovod)."""
        return self.bucket_bytes

    @abc.abstractmethod
    def allreduce_async(self, tensor: torch.Tensor, name: str, average: bool = True, group: Any = None) -> Work:
        """Sum (or mean) over ranks into a new tensor; `tensor` is left as it is."""

    @abc.abstractmethod
    def grouped_allreduce_async(self, tensors: Sequence[torch.Tensor], name: str, average: bool = True,
                                group: Any = None) -> Work:
        """One fused reduction of several tensors; `wait()` gives the list of results."""

    @abc.abstractmethod
    def allgather_async(self, tensor: torch.Tensor, name: str, group: Any = None) -> Work:
        """Concatenate along dim 0 in rank order; ranks may contribute different lengths."""

    @abc.abstractmethod
    def grouped_allgather_async(self, tensors: Sequence[torch.Tensor], name: str, group: Any = None) -> Work:
        """One fused `allgather_async` of several tensors; `wait()` gives the list of results."""

    def broadcast_async(self, tensor: torch.Tensor, root: int, name: str, group: Any = None) -> Work:
        """The tensor of global rank `root` (a member of `group`), on every member; `tensor` is
        this rank's buffer of the same shape and dtype (left as it is)."""
        raise NotImplementedError(f"the {self.engine} engine has no asynchronous broadcast")

    def new_group(self, ranks: list[int]) -> Any:
        """A new group of these global ranks, for the `group=` of the collectives. Every rank must
        call it, in the same order, member or not; on a non-member the result is not to be used."""
        raise NotImplementedError(f"the {self.engine} engine cannot create process groups")

    def node_groups(self) -> NodeGroups | None:
        """The node layout and the groups of a hierarchical exchange, created on first call
        (a collective: every rank must call it at the same point); None when the ranks do not
        form several nodes of several ranks each (see `hpctrain.comm.nodes`)."""
        if not hasattr(self, "_node_groups"):
            from hpctrain.comm.nodes import build_node_groups
            self._node_groups = build_node_groups(self)
        return self._node_groups

    def simulate_nodes(self) -> None:
        """Apply HPCTRAIN_RANKS_PER_NODE (testing on one machine) to `local_rank` / `local_size`."""
        from hpctrain.comm.nodes import simulated_local
        local = simulated_local(self.rank, self.size)
        if local is not None:
            self.local_rank, self.local_size = local

    @abc.abstractmethod
    def broadcast_(self, tensors: Iterable[torch.Tensor], root: int = 0) -> None:
        """Overwrite `tensors` in place with the root's."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0, name: str | None = None) -> Any:
        """The root's picklable object, on every rank."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any, name: str | None = None) -> list[Any]:
        """Every rank's picklable object, in rank order."""

    @abc.abstractmethod
    def allreduce_scalars(self, values: Sequence[float], name: str, average: bool = True) -> list[float]:
        """Reduce a few Python floats (statistics, not gradients) in float64."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def group_ranks(self, group: Any = None) -> list[int]:
        """The global ranks of `group` (None: every rank), in order; this rank must be one of them
        (InvalidArgument otherwise, or when `group` is not of this engine's kind)."""
        if group is not None:
            from hpctrain.errors import InvalidArgument
            raise InvalidArgument(f"the {self.engine} engine takes no process group ({group!r})")
        return list(range(self.size))

    def sendable(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or a copy in a dtype the engine can carry (the receiver casts back)."""
        return tensor

    def shutdown(self) -> None:
        """Release the engine at exit (every collective has completed)."""

    def describe(self) -> str:
        return f"{self.engine} ({self.backend})"
