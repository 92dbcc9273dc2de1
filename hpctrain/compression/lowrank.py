"""Low-rank gradient compression by power iteration (PowerSGD, Vogels et al. 2019).

A matrix-shaped gradient M (n × m; conv kernels as [out, in·k…]) is approximated by P Qᵀ of
rank r, found by power iteration with two small allreduces per round:

    P = M Q  → allreduce (mean) → orthonormalise;   Q = Mᵀ P → allreduce (mean);   M ≈ P Qᵀ

Because P is the same on every rank after its allreduce, the mean of the ranks' local
approximations P (Mᵢᵀ P)ᵀ is exactly P Qᵀ with the averaged Q, so each rank keeps
Mᵢ − P (Mᵢᵀ P)ᵀ as its error-feedback residual and nothing is lost in aggregate. With
`warm_start`, last step's Q seeds the next step (one power iteration per step then tracks
the gradient's dominant subspace). The first Q is drawn from a seed derived from the
parameter's name — identical on every rank, and the global RNG streams are left untouched.
"""
from __future__ import annotations

import zlib

import torch

from hpctrain.compression.base import Collective, Compressor, Exchange, ParamState, compensate, like_grad
from hpctrain.errors import UserError


class LowRank(Compressor):
    """Rank-`rank` approximation P Qᵀ with error feedback; P and Q are allreduced."""

    name = "lowrank"
    kind = "allreduce"
    error_feedback = True

    def __init__(self, rank: int = 4, power_iterations: int = 1, warm_start: bool = True):
        for key, value in (("rank", rank), ("power_iterations", power_iterations)):
            if value < 1:
                raise UserError(f"LowRank({key}={value}): must be a positive integer")
        self.rank = rank
        self.power_iterations = power_iterations
        self.warm_start = warm_start

    def applies_to(self, shape: torch.Size) -> bool:
        """Matrices (and conv kernels) where P and Q are smaller than the gradient itself."""
        if len(shape) < 2:
            return False
        rows, cols = _as_matrix(shape)
        return self.rank * (rows + cols) < rows * cols

    def exchange(self, grad: torch.Tensor, state: ParamState) -> Exchange:
        matrix = compensate(grad, state).view(_as_matrix(grad.shape))
        q = state.extra.get("q") if self.warm_start else None
        if q is None:
            q = self._initial_q(state, matrix.shape[1], matrix.device)
        for _ in range(self.power_iterations):
            (p,) = yield Collective("allreduce", [matrix @ q])
            p = torch.linalg.qr(p).Q
            local_q = matrix.T @ p
            (q,) = yield Collective("allreduce", [local_q])
        matrix.addmm_(p, local_q.T, alpha=-1)      # residual: what this rank's P Qᵀ missed
        if self.warm_start:
            state.extra["q"] = q
        return like_grad(p @ q.T, grad)

    def _initial_q(self, state: ParamState, cols: int, device: torch.device) -> torch.Tensor:
        """A random [cols, rank] start, the same on every rank (seeded by name, and step if cold)."""
        key = state.name if self.warm_start else f"{state.name}@{state.steps}"
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.randn(cols, self.rank, generator=generator).to(device)


def _as_matrix(shape: torch.Size) -> tuple[int, int]:
    """[out, rest]: how a weight of this shape is seen as a matrix."""
    return shape[0], shape[1:].numel()
