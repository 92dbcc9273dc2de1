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
from dataclasses import dataclass

import torch

from hpctrain.compression.base import Collective, Compressor, ParamState, Rounds, compensate, like_grad
from hpctrain.errors import UserError


@dataclass(slots=True)
class LowRankMemory:
    """Per parameter: last step's Q, which seeds the next power iteration (warm start)."""
    q: torch.Tensor | None = None


@dataclass(frozen=True)
class LowRank(Compressor):
    """Rank-`rank` approximation P Qᵀ with error feedback; P and Q are allreduced.

    Tuning (as torch's PowerSGD): raise `rank` before `power_iterations`; with `warm_start`
    one iteration per step tracks the gradient's subspace. Rank 4 was within 0.15 pt of dense
    on the MNIST-1D CNN (6× on conv kernels, 18× on fc layers: small layers compress little),
    and at 1 Gbit/s matched torch PowerSGD's accuracy 1.08× faster per step on a 10.7M MLP.
    """

    name = "lowrank"
    kind = "allreduce"
    error_feedback = True
    memory_type = LowRankMemory
    rank: int = 4
    power_iterations: int = 1
    warm_start: bool = True

    def __post_init__(self) -> None:
        for key in ("rank", "power_iterations"):
            if getattr(self, key) < 1:
                raise UserError(f"LowRank({key}={getattr(self, key)}): must be a positive integer")

    def applies_to(self, shape: torch.Size) -> bool:
        """Matrices (and conv kernels) where P and Q are smaller than the gradient itself."""
        if len(shape) < 2:
            return False
        rows, cols = _as_matrix(shape)
        return self.rank * (rows + cols) < rows * cols

    def exchange(self, grad: torch.Tensor, state: ParamState) -> Rounds:
        matrix = compensate(grad, state).view(_as_matrix(grad.shape))
        memory = self.memory(state)
        q = memory.q if self.warm_start else None
        if q is None:
            q = self._initial_q(state, matrix.shape[1], matrix.device)
        for _ in range(self.power_iterations):
            (p,) = yield Collective("allreduce", [matrix @ q])
            p = torch.linalg.qr(p).Q
            local_q = matrix.T @ p
            (q,) = yield Collective("allreduce", [local_q])
        matrix.addmm_(p, local_q.T, alpha=-1)      # residual: what this rank's P Qᵀ missed
        if self.warm_start:
            memory.q = q
        return like_grad(p @ q.T, grad)

    def _initial_q(self, state: ParamState, cols: int, device: torch.device) -> torch.Tensor:
        """A random [cols, rank] start, the same on every rank (seeded by name, and step if cold)."""
        key = state.name if self.warm_start else f"{state.name}@{state.steps}"
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.randn(cols, self.rank, generator=generator).to(device)


def _as_matrix(shape: torch.Size) -> tuple[int, int]:
    """[out, rest]: how a weight of this shape is seen as a matrix."""
    return shape[0], shape[1:].numel()
