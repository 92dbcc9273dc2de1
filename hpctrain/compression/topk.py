"""Top-k sparsification with error feedback (the classic baseline, e.g. Lin et al. 2018)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpctrain.compression.base import ParamState
from hpctrain.compression.sparse import SparseCompressor
from hpctrain.errors import UserError


@dataclass(frozen=True)
class TopK(SparseCompressor):
    """Send the `ratio` largest-magnitude entries of gradient + residual; keep the rest."""

    name = "topk"
    ratio: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"TopK(ratio={self.ratio}): ratio must be in (0, 1]")

    def select(self, flat: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        k = max(1, int(self.ratio * flat.numel()))
        return flat.abs().topk(k, sorted=False).indices
