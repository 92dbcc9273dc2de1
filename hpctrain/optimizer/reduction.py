"""Horovod's reduction arguments, checked once: over which ranks gradients are combined, and how.

`op` (hvd.Average / hvd.Sum), `gradient_predivide_factor` and `process_set` become one frozen
`Reduction`: the set's members, this rank's place in it, and the scales the gradient path applies
(1/f before the sum, f/n after: Horovod's semantics). `groups` / `num_groups` are only checked:
hpctrain does its own grouping (see `DistributedOptimizer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpctrain.comm.base import Communicator
from hpctrain.errors import InvalidArgument

# Horovod's reduction constants (hvd.Average, hvd.Sum, ...: the same ints since 0.21) and hpctrain's names.
_HOROVOD_OPS = {0: "average", 1: "sum", 2: "adasum", 3: "min", 4: "max", 5: "product"}


def reduce_op(op: Any) -> str:
    """'average' or 'sum', from Horovod's constants (hvd.Average, hvd.Sum) or hpctrain's names."""
    name = _HOROVOD_OPS.get(op) if isinstance(op, int) and not isinstance(op, bool) else \
        op.lower() if isinstance(op, str) else None
    if name == "adasum":
        raise InvalidArgument("op=Adasum is not supported by hpctrain.DistributedOptimizer (its compressors average); "
                              "use op=hvd.Average or hvd.Sum, or Horovod's own optimizer for Adasum")
    if name not in ("average", "sum"):
        raise InvalidArgument(f"op={op!r}: choose hvd.Average / 'average' or hvd.Sum / 'sum'")
    return name


def check_predivide(factor: float, op: str) -> float:
    if not factor > 0:
        raise InvalidArgument(f"gradient_predivide_factor={factor}: must be > 0")
    if factor != 1.0 and op != "average":
        raise InvalidArgument("gradient_predivide_factor is only supported with op=Average (as in Horovod)")
    return float(factor)


def check_groups(groups: Any, params: list[torch.Tensor]) -> None:
    """Horovod's `groups`: None, a positive int, or lists of this optimizer's parameters, each once."""
    if groups is None:
        return
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1:
            raise InvalidArgument(f"groups={groups}: must be a positive integer or a list of lists of parameters")
        return
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
        raise InvalidArgument("groups must be a positive integer or a list of lists of parameters")
    ids = {id(p) for p in params}
    seen: set[int] = set()
    for tensor in (t for g in groups for t in g):
        if not isinstance(tensor, torch.Tensor) or id(tensor) not in ids:
            raise InvalidArgument("groups must consist of parameters of the wrapped optimizer")
        if id(tensor) in seen:
            raise InvalidArgument("a parameter can only appear once in groups")
        seen.add(id(tensor))


@dataclass(frozen=True)
class Reduction:
    """How this optimizer's gradients are combined: `op` over the ranks of `process_set`."""
    op: str                        # "average" or "sum"
    predivide: float               # Horovod's gradient_predivide_factor
    process_set: Any               # a Horovod ProcessSet or a torch.distributed group (None: all ranks)
    members: list[int]             # the ranks in the set, in rank order
    rank: int                      # this rank (global)

    @classmethod
    def of(cls, communicator: Communicator, op: str, predivide: float, process_set: Any) -> Reduction:
        return cls(op, predivide, process_set, communicator.group_ranks(process_set), communicator.rank)

    @property
    def size(self) -> int:
        """Ranks in the set."""
        return len(self.members)

    @property
    def index(self) -> int:
        """This rank's place in the set (its slot in the non-finite flags)."""
        return self.members.index(self.rank)

    @property
    def group_kw(self) -> dict[str, Any]:
        """The communicator's keyword for the set."""
        return {} if self.process_set is None else {"group": self.process_set}

    @property
    def prescale(self) -> float:
        """Applied to a gradient before it is sent."""
        return 1.0 / self.predivide

    @property
    def postscale(self) -> float:
        """Applied to a compressor's average: f/n after 1/f (an Average); a Sum is the average times n."""
        return self.predivide * (self.size if self.op == "sum" else 1)

    @property
    def sum_scale(self) -> float:
        """Turns a plain sum of prescaled gradients (the bypass) into the result."""
        return self.predivide / self.size if self.op == "average" else 1.0

    @property
    def gather_scale(self) -> float:
        """Turns the allgathered rows of sparse gradients (not prescaled) into the result."""
        return 1.0 / self.size if self.op == "average" else 1.0
