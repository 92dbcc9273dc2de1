"""Hierarchical exchange of a sparse (allgather) gradient: reduce in the node, gather among leaders, broadcast back.

A flat allgather hands every rank the payloads of all P ranks: (P−1)·k entries arrive per rank,
most of them over the slow inter-node link, so a sparse compressor of ratio c loses to a dense
ring allreduce once P > ~2c. With `compression.hierarchical = true` (`Policy(hierarchical=True)`)
an allgather compressor's exchange runs in three rounds instead, over the groups of
`hpctrain.comm.nodes.NodeGroups`:

    1. allreduce (mean) of the dense gradient among the ranks of a node   fast link
    2. the leader compresses the node mean and runs the compressor's own   slow link, fan-in N−1
       allgather among the N leaders (one per node), then decodes it
    3. the leader broadcasts the decoded average to its node               fast link

The result is the mean over nodes of the leaders' decoded payloads — the mean over all ranks of
what was sent, as in the flat exchange, with N senders instead of P. Every rank receives the same
bits (the leader's decode, broadcast), so replicas cannot drift.

Error feedback: the residual belongs to the leader and holds what the compression of its node
*mean* left out (the same units as a flat rank's residual, so thresholds mean the same); a
non-leader's residual stays empty. Nothing is lost: after any number of steps, the sum of the
results plus the mean over nodes of the leaders' residuals equals the sum of the means over all
ranks of their gradients (tests/test_hierarchical.py checks this on a simulated world).

Every rank runs the same three rounds, so the `ExchangeQueue` launches them in the same order on
every rank: a non-leader's round 2 is a `GroupCollective` it is not a `member` of (it sends and
waits for nothing). Compressors with several rounds of their own (low rank) and allreduce
compressors stay flat: an allreduce already receives ~2·N bytes whatever P.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from hpctrain.comm.nodes import NodeGroups
from hpctrain.compression.base import Collective, Compressor, ParamState, Rounds, advance


@dataclass
class GroupCollective(Collective):
    """A `Collective` over a subset of the ranks: `group` (an engine group; None: the optimizer's
    own), skipped where this rank is not a `member`; "broadcast" sends global rank `root`'s payloads.
    `crosses_nodes`: its traffic uses the inter-node link (for the byte counts)."""
    group: Any = None
    member: bool = True
    root: int | None = None
    crosses_nodes: bool = False


def applies(compressor: Compressor) -> bool:
    """Whether this compressor's exchange can run hierarchically: one allgather round."""
    return compressor.kind == "allgather" and type(compressor).exchange is Compressor.exchange


def hierarchical_rounds(grad: torch.Tensor, compressor: Compressor, state: ParamState, nodes: NodeGroups) -> Rounds:
    """The three rounds above, for this rank's `grad`; returns the average over all ranks."""
    (node_mean,) = yield GroupCollective("allreduce", [grad], group=nodes.node)
    if nodes.is_leader:
        averaged = yield from _among_leaders(compressor.exchange(node_mean, state), nodes.leaders)
    else:
        yield GroupCollective(compressor.kind, [], group=nodes.leaders, member=False, crosses_nodes=True)
        averaged = torch.empty_like(grad)
    (averaged,) = yield GroupCollective("broadcast", [averaged], group=nodes.node, root=nodes.leader)
    return averaged


def _among_leaders(rounds: Rounds, leaders: Any) -> Rounds:
    """The compressor's own rounds, each run in the leaders' group."""
    request = next(rounds)
    while True:
        received = yield GroupCollective(request.kind, request.payloads, group=leaders, crosses_nodes=True)
        try:
            request = rounds.send(received)
        except StopIteration as finished:
            return finished.value


# -- one process standing in for a world of P ranks (tests, benchmarks, the cost model's table) -----
@dataclass
class Traffic:
    """Payload bytes of one simulated exchange: handed to collectives over the inter-node link
    (by all ranks together), and received over it per node (payloads of ranks on other nodes)."""
    sent_inter: int = 0
    received_inter_per_node: list[int] = field(default_factory=list)


def simulated_nodes(size: int, per_node: int) -> list[NodeGroups]:
    """Each rank's NodeGroups for `size` ranks in nodes of `per_node`, groups as tuples of ranks."""
    nodes = tuple(tuple(range(first, first + per_node)) for first in range(0, size, per_node))
    leaders = tuple(n[0] for n in nodes)
    return [NodeGroups(nodes, rank // per_node, rank, nodes[rank // per_node],
                       leaders if rank in leaders else None) for rank in range(size)]


def simulate_hierarchical(compressor: Compressor, grads: Sequence[torch.Tensor], states: Sequence[ParamState],
                          per_node: int, traffic: Traffic | None = None) -> list[torch.Tensor]:
    """`hierarchical_rounds` for len(grads) simulated ranks on one process (as
    `hpctrain.compression.simulate` for the flat exchange): allreduce is the mean over the group,
    allgather the concatenation in rank order, broadcast the root's tensors."""
    views = simulated_nodes(len(grads), per_node)
    gens = [hierarchical_rounds(g, compressor, s, v) for g, s, v in zip(grads, states, views)]
    requests: list[Any] = [next(gen) for gen in gens]
    node_of = {r: v.index for v in views for r in v.nodes[v.index]}
    while True:
        received: list[list[torch.Tensor]] = []
        for rank, request in enumerate(requests):
            if not request.member:
                received.append([])
                continue
            members = request.group if request.group is not None else tuple(range(len(grads)))
            columns = list(zip(*(requests[m].payloads for m in members)))
            if request.kind == "allreduce":
                received.append([torch.stack(col).mean(dim=0) for col in columns])
            elif request.kind == "allgather":
                received.append([torch.cat(col, dim=0) for col in columns])
            else:
                received.append(list(requests[request.root].payloads))
            if traffic is not None and request.crosses_nodes:
                traffic.sent_inter += request.nbytes
        if traffic is not None:
            _count_received(requests, node_of, traffic)
        results = advance(gens, received)
        if all(isinstance(r, torch.Tensor) for r in results):
            return results
        requests = results


def _count_received(requests: list[Any], node_of: dict[int, int], traffic: Traffic) -> None:
    """Per node, the payload bytes of the round's inter-node allgather that came from other nodes."""
    count = max(node_of.values()) + 1
    if not traffic.received_inter_per_node:
        traffic.received_inter_per_node = [0] * count
    senders = [r for r, q in enumerate(requests) if q.member and q.crosses_nodes and q.kind == "allgather"]
    for node in range(count):
        traffic.received_inter_per_node[node] += sum(requests[r].nbytes for r in senders if node_of[r] != node)
