"""Hard-threshold sparsification, Dynamic Communication Thresholding style (Gupta et al. 2021).

Choosing the top-k entries exactly every step costs a selection over the whole tensor. DCT
instead picks a threshold with one such selection now and then, and in between only
compares |gradient + residual| against it. Error feedback keeps what was not sent.

The threshold is recomputed at the first step, every `refresh_every` steps, and whenever the
number of entries that passed drifts more than `drift` times away from the target: with error
feedback the residual grows after a refresh, so a threshold taken from the first raw gradient
would otherwise let through tens of times the intended density until the next refresh. The
count is the payload's length, known on the host anyway, so the check costs nothing.

A tensor whose share at `density` would be fewer than `min_entries` entries per step is left
to the dense bypass: its weights would each be sent about once in a thousand steps, which
starves them (measured on the MNIST-1D CNN: its 1280-entry classifier and 3072-entry conv
kernels thresholded at 0.1%, 1–3 entries per step, cost 3.6 pt; sent dense, Threshold is at
parity), for a saving of a few kilobytes per step.
"""
from __future__ import annotations

import torch

from hpctrain.compression import kernels, sparse
from hpctrain.compression.base import ParamState
from hpctrain.errors import UserError


class Threshold(sparse.SparseCompressor):
    """Send entries with |gradient + residual| >= a threshold tuned to pass ≈ `density` of them."""

    name = "threshold"

    def __init__(self, density: float = 0.001, refresh_every: int = 1000, drift: float = 2.0, min_entries: int = 8):
        if not 0 < density <= 1:
            raise UserError(f"Threshold(density={density}): density must be in (0, 1]")
        if refresh_every < 1:
            raise UserError(f"Threshold(refresh_every={refresh_every}): must be a positive number of steps")
        if drift <= 1:
            raise UserError(f"Threshold(drift={drift}): must be > 1 (a factor around the target count)")
        if min_entries < 1:
            raise UserError(f"Threshold(min_entries={min_entries}): must be a positive number of entries")
        self.density = density
        self.refresh_every = refresh_every
        self.drift = drift
        self.min_entries = min_entries

    def applies_to(self, shape: torch.Size) -> bool:
        """Only tensors of which `density` is at least `min_entries` entries (else: dense)."""
        return super().applies_to(shape) and self.density * shape.numel() >= self.min_entries

    def target_count(self, numel: int) -> int:
        return max(1, round(self.density * numel))

    def select(self, flat: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        if self._needs_refresh(state, flat.numel()):
            kth_largest = flat.abs().topk(self.target_count(flat.numel()), sorted=False).values.min()
            state.extra["threshold"] = kth_largest.clamp_min(kernels.FLOOR)
        indices = kernels.at_least(flat, state.extra["threshold"])
        state.extra["last_count"] = indices.numel()
        return indices

    def _needs_refresh(self, state: ParamState, numel: int) -> bool:
        if "threshold" not in state.extra or state.steps % self.refresh_every == 0:
            return True
        ratio = max(state.extra["last_count"], 1) / self.target_count(numel)
        return not 1 / self.drift <= ratio <= self.drift
