"""Nodes: which ranks share a machine (and its fast link), and the groups a hierarchical exchange runs in.

A hierarchical exchange (`compression.hierarchical = true`) needs three kinds of groups:
this node's ranks (a dense reduce over the fast intra-node link, then a broadcast back from
the node's leader), and the leaders, one per node (the sparse allgather over the slow
inter-node link: N−1 payloads arrive instead of P−1). `build_node_groups` creates them once per
communicator, on every rank in the same order (torch `new_group` and Horovod's
`add_process_set` are collective: every rank must call them for every group, member or not).

The layout comes from the ranks themselves: each rank names its node (its host name) and ranks
that name the same node form it, in rank order; its lowest rank is the leader. Only regular
layouts are used (every node the same number of ranks, more than one node, more than one rank
per node): otherwise there is nothing to gain, or node means would weigh unequally, and the
exchange stays flat.

Testing on one machine: `HPCTRAIN_RANKS_PER_NODE=n` makes the communicator pretend that ranks
0..n−1 are one node, n..2n−1 the next, and so on: `local_rank` and `local_size` follow it, and
the node groups are built from it (tests/test_hierarchical.py runs 4 ranks as 2 nodes × 2).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpctrain.errors import UserError

if TYPE_CHECKING:
    from hpctrain.comm.base import Communicator

RANKS_PER_NODE_ENV = "HPCTRAIN_RANKS_PER_NODE"


def simulated_ranks_per_node() -> int | None:
    """The HPCTRAIN_RANKS_PER_NODE override, or None when unset."""
    value = os.environ.get(RANKS_PER_NODE_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{RANKS_PER_NODE_ENV}={value!r}: give a positive number of ranks per simulated node")
    return int(value)


def simulated_local(rank: int, size: int) -> tuple[int, int] | None:
    """(local_rank, local_size) under the override (the last node may be smaller), or None."""
    per_node = simulated_ranks_per_node()
    if per_node is None:
        return None
    first = rank // per_node * per_node
    return rank - first, min(per_node, size - first)


def node_key(rank: int) -> Any:
    """What names this rank's node: its simulated node index, else the host name."""
    per_node = simulated_ranks_per_node()
    return rank // per_node if per_node is not None else socket.gethostname()


@dataclass(frozen=True)
class NodeGroups:
    """This rank's view of the node layout and the engine groups of a hierarchical exchange."""
    nodes: tuple[tuple[int, ...], ...]   # the global ranks of every node, in rank order
    index: int                           # this rank's node
    rank: int                            # this rank (global)
    node: Any                            # the engine group of this node's ranks
    leaders: Any                         # the engine group of the leaders (None on a non-leader)

    @property
    def leader(self) -> int:
        """The global rank of this node's leader (its lowest rank)."""
        return self.nodes[self.index][0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def per_node(self) -> int:
        return len(self.nodes[self.index])

    @property
    def count(self) -> int:
        """How many nodes."""
        return len(self.nodes)


def layout(keys: list[Any]) -> tuple[tuple[int, ...], ...]:
    """Ranks grouped by node key (one key per rank, in rank order), nodes in order of their lowest rank."""
    nodes: dict[Any, list[int]] = {}
    for rank, key in enumerate(keys):
        nodes.setdefault(key, []).append(rank)
    return tuple(tuple(ranks) for ranks in nodes.values())


def worth_it(nodes: tuple[tuple[int, ...], ...]) -> bool:
    """A hierarchy pays and is exact only with several nodes of several ranks, all the same size."""
    return len(nodes) > 1 and len({len(n) for n in nodes}) == 1 and len(nodes[0]) > 1


def build_node_groups(communicator: Communicator) -> NodeGroups | None:
    """Learn the layout (one small allgather) and create the groups, on every rank in the same
    order; None when the layout gives a hierarchy nothing to do (see `worth_it`)."""
    nodes = layout(communicator.allgather_object(node_key(communicator.rank), name="hpctrain.node_keys"))
    if not worth_it(nodes):
        return None
    index = next(i for i, ranks in enumerate(nodes) if communicator.rank in ranks)
    node = None
    for i, ranks in enumerate(nodes):
        group = communicator.new_group(list(ranks))
        if i == index:
            node = group
    leaders = communicator.new_group([ranks[0] for ranks in nodes])
    is_leader = communicator.rank == nodes[index][0]
    return NodeGroups(nodes, index, communicator.rank, node, leaders if is_leader else None)
