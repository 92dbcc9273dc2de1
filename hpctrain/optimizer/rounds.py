"""How one gradient is exchanged: the rounds its compressor runs, scaled for Horovod's arguments.

`Compressor.exchange(grad, state)` is a generator: it yields a `Collective` per round of
communication, receives what all ranks contributed, and returns the averaged gradient (error
feedback inside). `gradient_rounds` wraps it for one parameter and step: dense during the policy's
warm-up, the gradient prescaled by 1/gradient_predivide_factor, the average postscaled (op=Sum,
predivide) and made sparse again if it came sparse and was sent dense. A sparse gradient that is
not sent dense is allgathered (indices and values) instead, as Horovod does. With node groups
(`Policy.hierarchical` on a multi-node layout) a one-round allgather compressor runs the
hierarchical exchange of `hierarchical.py` instead of its flat allgather.
"""
from __future__ import annotations

import torch

# The type of one gradient's rounds (the generator `Compressor.exchange` returns).
from hpctrain.compression.base import Collective, Compressor, ParamState
from hpctrain.compression.base import Rounds
from hpctrain.compression.policy import Policy
from hpctrain.comm.nodes import NodeGroups
from hpctrain.optimizer import hierarchical
from hpctrain.optimizer.reduction import Reduction


def gradient_rounds(grad: torch.Tensor, compressor: Compressor, state: ParamState, policy: Policy,
                    reduction: Reduction, sparse_dim: int | None, nodes: NodeGroups | None = None) -> Rounds:
    """The rounds that turn this rank's `grad` into the reduced gradient (`sparse_dim`: the
    parameter's gradients come sparse with this many sparse dimensions; None: they are dense;
    `nodes`: run allgather compressors hierarchically over these groups)."""
    if grad.is_sparse:
        return sparse_rounds(grad, reduction)
    compressor = policy.compressor_now(compressor, state)
    if reduction.prescale != 1.0:
        grad = grad * reduction.prescale
    if nodes is not None and hierarchical.applies(compressor):
        rounds = hierarchical.hierarchical_rounds(grad, compressor, state, nodes)
    else:
        rounds = compressor.exchange(grad, state)
    if reduction.postscale == 1.0 and sparse_dim is None:
        return rounds
    return _finished(rounds, reduction.postscale, sparse_dim)


def _finished(rounds: Rounds, postscale: float, sparse_dim: int | None) -> Rounds:
    averaged = yield from rounds
    if postscale != 1.0:
        averaged = averaged * postscale
    return resparsify(averaged, sparse_dim)


def resparsify(averaged: torch.Tensor, sparse_dim: int | None) -> torch.Tensor:
    """A gradient that came sparse and was sent dense goes back sparse (SparseAdam needs it)."""
    return averaged.to_sparse(sparse_dim) if sparse_dim is not None else averaged


def sparse_rounds(grad: torch.Tensor, reduction: Reduction) -> Rounds:
    """As Horovod: allgather every rank's (index, value) rows, then the averaged (or summed)
    sparse gradient, coalesced (the same on every rank: the gather is in rank order)."""
    indices, values = yield Collective("allgather", [grad.indices().t().contiguous(), grad.values()])
    return torch.sparse_coo_tensor(indices.t(), values * reduction.gather_scale, grad.shape,
                                   check_invariants=True).coalesce()
