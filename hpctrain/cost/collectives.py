"""α-β costs of the collectives the optimizer runs, flat and hierarchical.

Every function returns a `Cost`: latency (α terms) and bandwidth (β terms) seconds, the
algorithm chosen, and the bytes that cross the bottleneck link per edge. Like NCCL and Open MPI,
allreduce takes the cheapest for the size of a ring (bandwidth-optimal: 2(P−1)/P·N, but 2(P−1)
steps), recursive doubling (⌈log₂P⌉ steps, but ⌈log₂P⌉·N bytes: small messages) and NCCL's
pipelined double binary tree (2⌈log₂P⌉ steps, ~2N bytes: large P); allgather the cheaper of a
ring ((P−1) steps) and recursive doubling (⌈log₂P⌉ steps), both moving (P−1)·k.

`contention` multiplies β: how many messages share the bottleneck link at once. A ring crosses
each node boundary once (contention 1); recursive doubling sends every rank of a node over the
NICs (contention = ranks per node); on one shared link all P ranks queue (contention P).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hpctrain.cost.links import Link, Network


@dataclass(frozen=True)
class Cost:
    latency_s: float = 0.0
    bandwidth_s: float = 0.0
    algorithm: str = ""
    wire_bytes: float = 0.0      # bytes over the bottleneck link (per node edge, one direction)
    inter_bytes: float = 0.0     # of which across node boundaries

    @property
    def seconds(self) -> float:
        return self.latency_s + self.bandwidth_s

    def __add__(self, other: "Cost") -> "Cost":
        names = [a for a in (*self.algorithm.split(" + "), *other.algorithm.split(" + ")) if a]
        algorithm = " + ".join(dict.fromkeys(names))
        return Cost(self.latency_s + other.latency_s, self.bandwidth_s + other.bandwidth_s, algorithm,
                    self.wire_bytes + other.wire_bytes, self.inter_bytes + other.inter_bytes)

    def times(self, count: float) -> "Cost":
        return Cost(self.latency_s * count, self.bandwidth_s * count, self.algorithm,
                    self.wire_bytes * count, self.inter_bytes * count)


ZERO = Cost()


def _steps(ranks: int) -> int:
    return math.ceil(math.log2(ranks)) if ranks > 1 else 0


# -- one link ---------------------------------------------------------------------------------
def ring_allreduce(nbytes: float, ranks: int, link: Link, contention: float = 1.0) -> Cost:
    """Reduce-scatter + allgather around a ring: 2(P−1) steps of N/P bytes."""
    if ranks <= 1:
        return ZERO
    moved = 2 * (ranks - 1) / ranks * nbytes * contention
    return Cost(2 * (ranks - 1) * link.latency_s, moved * link.beta, "ring", moved)


def doubling_allreduce(nbytes: float, ranks: int, link: Link, contention: float = 1.0) -> Cost:
    """Recursive doubling: ⌈log₂P⌉ exchanges of the whole buffer (wins for small N)."""
    steps = _steps(ranks)
    moved = steps * nbytes * contention
    return Cost(steps * link.latency_s, moved * link.beta, "doubling", moved)


def tree_allreduce(nbytes: float, ranks: int, link: Link) -> Cost:
    """NCCL's double binary tree, pipelined: reduce up and broadcast down, 2⌈log₂P⌉ steps, each
    node sending ~N each way (every node is a leaf in one of the two trees)."""
    if ranks <= 2:
        return ring_allreduce(nbytes, ranks, link)
    moved = 2 * nbytes
    return Cost(2 * _steps(ranks) * link.latency_s, moved * link.beta, "tree", moved)


def allreduce(nbytes: float, ranks: int, link: Link, ring_contention: float = 1.0,
              doubling_contention: float = 1.0) -> Cost:
    """The cheapest of ring, recursive doubling and tree, as NCCL and MPI pick by size. The tree
    crosses node boundaries as the ring does (contention of the ring)."""
    if ranks <= 1:
        return ZERO
    tree = tree_allreduce(nbytes, ranks, link)
    tree = Cost(tree.latency_s, tree.bandwidth_s * ring_contention, tree.algorithm, tree.wire_bytes * ring_contention)
    return min(ring_allreduce(nbytes, ranks, link, ring_contention),
               doubling_allreduce(nbytes, ranks, link, doubling_contention), tree, key=lambda c: c.seconds)


def allreduce_crossover_bytes(ranks: int, link: Link) -> float:
    """The size above which the ring beats recursive doubling on one link (contention 1)."""
    steps = _steps(ranks)
    ring_bw = 2 * (ranks - 1) / ranks
    return (2 * (ranks - 1) - steps) * link.latency_s / ((steps - ring_bw) * link.beta)


def allgatherv(kbytes: float, ranks: int, link: Link, ring_contention: float = 1.0,
               doubling_contention: float = 1.0) -> Cost:
    """Variable-length allgather of a mean `kbytes` per rank: every rank receives (P−1)·k.

    The sizes travel first (a tiny allgather: ⌈log₂P⌉ α), then the data by ring ((P−1) steps)
    or recursive doubling (⌈log₂P⌉ steps); both move (P−1)·k per rank.
    """
    if ranks <= 1:
        return ZERO
    sizes = _steps(ranks) * link.latency_s
    received = (ranks - 1) * kbytes
    ring = Cost(sizes + (ranks - 1) * link.latency_s, received * ring_contention * link.beta, "ring allgather",
                received * ring_contention)
    tree = Cost(sizes + _steps(ranks) * link.latency_s, received * doubling_contention * link.beta,
                "doubling allgather", received * doubling_contention)
    return min(ring, tree, key=lambda c: c.seconds)


def reduce(nbytes: float, ranks: int, link: Link) -> Cost:
    """To one root: binomial tree, or reduce-scatter + gather for large N."""
    if ranks <= 1:
        return ZERO
    binomial = Cost(_steps(ranks) * link.latency_s, _steps(ranks) * nbytes * link.beta, "binomial reduce",
                    _steps(ranks) * nbytes)
    moved = 2 * (ranks - 1) / ranks * nbytes
    scatter = Cost(2 * (ranks - 1) * link.latency_s, moved * link.beta, "ring reduce", moved)
    return min(binomial, scatter, key=lambda c: c.seconds)


def broadcast(nbytes: float, ranks: int, link: Link) -> Cost:
    """From one root: binomial tree, or scatter + allgather (van de Geijn) for large N."""
    cost = reduce(nbytes, ranks, link)
    return Cost(cost.latency_s, cost.bandwidth_s, cost.algorithm.replace("reduce", "broadcast"), cost.wire_bytes)


# -- over a network of nodes --------------------------------------------------------------------
def _bottleneck(network: Network, ranks: int) -> tuple[Link, float, float, bool]:
    """The link a flat collective over `ranks` is limited by, the ring's and the tree's
    contention on it, and whether it crosses node boundaries."""
    if network.shared:
        return network.inter, ranks, ranks, True
    if network.nodes(ranks) <= 1:
        return network.intra, 1.0, 1.0, False
    slow = Link(min(network.inter.bits_per_s, network.intra.bits_per_s), network.inter.latency_s)
    return slow, 1.0, float(min(network.ranks_per_node, ranks)), True


def _mark_inter(cost: Cost, crosses: bool) -> Cost:
    return Cost(cost.latency_s, cost.bandwidth_s, cost.algorithm, cost.wire_bytes,
                cost.wire_bytes if crosses else 0.0)


def flat_allreduce(nbytes: float, ranks: int, network: Network) -> Cost:
    link, ring_c, doubling_c, crosses = _bottleneck(network, ranks)
    return _mark_inter(allreduce(nbytes, ranks, link, ring_c, doubling_c), crosses)


def flat_allgatherv(kbytes: float, ranks: int, network: Network) -> Cost:
    link, ring_c, doubling_c, crosses = _bottleneck(network, ranks)
    return _mark_inter(allgatherv(kbytes, ranks, link, ring_c, doubling_c), crosses)


def hierarchical_allreduce(nbytes: float, ranks: int, network: Network) -> Cost:
    """Reduce-scatter inside the node, allreduce of the node's shards among nodes, allgather back."""
    per_node, nodes = min(network.ranks_per_node, ranks), network.nodes(ranks)
    if nodes <= 1 or network.shared:
        return flat_allreduce(nbytes, ranks, network)
    inside = ring_allreduce(nbytes, per_node, network.intra)        # reduce-scatter + allgather
    between = _mark_inter(allreduce(nbytes, nodes, network.inter), True)
    return Cost(inside.latency_s, inside.bandwidth_s, "intra ring", inside.wire_bytes) + between


def hierarchical_allgatherv(kbytes: float, dense_bytes: float, ranks: int, network: Network) -> Cost:
    """As `hpctrain.optimizer.hierarchical` runs it: a dense allreduce (mean) inside the node over
    the fast link, the leader's sparse allgather among the nodes (fan-in N−1 instead of P−1),
    then the leader's broadcast of the decoded dense gradient inside the node."""
    per_node, nodes = min(network.ranks_per_node, ranks), network.nodes(ranks)
    if nodes <= 1 or network.shared or per_node <= 1:
        return flat_allgatherv(kbytes, ranks, network)
    up = allreduce(dense_bytes, per_node, network.intra)
    between = _mark_inter(allgatherv(kbytes, nodes, network.inter), True)
    down = broadcast(dense_bytes, per_node, network.intra)
    return up + between + down
