"""Fixed blocks of samples: why scores do not depend on the number of ranks.

Samples are cut into fixed blocks whose contents never change with the world size, ranks take
contiguous runs of blocks, and results are gathered in block order. The short training run stays
rank-invariant the same way: each rank computes the gradients of its fixed blocks, all block
gradients are gathered and summed in block order, so every world size takes exactly the same
optimizer steps.
"""
from __future__ import annotations

import numpy as np
import torch

from hpctrain.data import Dataset

SCORE_BLOCK = 256        # samples per evaluation block (fixed: results never depend on world size)
GRAD_BLOCK = 32          # samples per gradient block in the short training run


def rank_blocks(n: int, block: int, rank: int, size: int) -> list[tuple[int, int]]:
    """This rank's contiguous run of the fixed [lo, hi) blocks covering range(n)."""
    bounds = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
    return bounds[rank * len(bounds) // size:(rank + 1) * len(bounds) // size]


def to_device(dataset: Dataset, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's samples and labels as tensors on `device`."""
    x, y = dataset.get(rows)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
