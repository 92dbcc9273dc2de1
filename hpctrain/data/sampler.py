"""The distributed sampler: which samples each rank trains on, step by step.

Each epoch is a permutation of the training positions, seeded by (seed, epoch) so every rank
computes the same one without talking. A cursor counts the samples consumed this epoch; each
optimizer step takes the next `global_batch` positions and rank r takes its contiguous slice.
Because the cursor is global, the batch size may change mid-epoch (adaptive batch growth) and
each sample is still seen exactly once per epoch; the cursor is all a checkpoint needs.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class GlobalBatchSampler:
    def __init__(self, positions: np.ndarray, seed: int, rank: int, world_size: int):
        self.positions = np.asarray(positions, dtype=np.int64)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.positions[np.random.default_rng((self.seed, epoch)).permutation(len(self.positions))]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless resuming inside it (same epoch: keep the cursor)."""
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0
            self._order = self._permutation(epoch)

    def set_positions(self, positions: np.ndarray) -> None:
        """Train on another subset from the next epoch on (dynamic pruning); call before set_epoch."""
        self.positions = np.asarray(positions, dtype=np.int64)
        self._order = self._permutation(self.epoch)

    def steps_left(self, global_batch: int) -> int:
        """Steps to the end of this epoch at this batch size (for the progress bar)."""
        return -(-self._usable() // global_batch)

    def _usable(self) -> int:
        return len(self._order) - self.cursor

    def exhausted(self) -> bool:
        """True when this epoch has no step left (fewer than world_size samples remain)."""
        return self._usable() < self.world_size

    def next_batch(self, global_batch: int) -> np.ndarray | None:
        """This rank's positions for the next step, or None when the epoch is used up.

        The last batch of an epoch may be smaller; it is split evenly, and the fewer than
        `world_size` samples that cannot be split evenly are left out of that epoch.
        """
        if self.exhausted():
            return None
        local = min(global_batch, self._usable()) // self.world_size
        start = self.cursor + self.rank * local
        self.cursor += local * self.world_size
        return self._order[start:start + local]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
