"""The distributed sampler: which samples each rank trains on, step by step.

Each epoch is a permutation of the rows to train on (rows of the train split: what
`Dataset.get` takes), seeded by (seed, epoch) so every rank computes the same one without
talking. A cursor counts the samples consumed this epoch; each optimizer step takes the next
`global_batch` rows and rank r takes its contiguous slice.
Because the cursor is global, the batch size may change mid-epoch (adaptive batch growth) and
each sample is still seen exactly once per epoch; the cursor is all a checkpoint needs.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Sized

import numpy as np

from hpctrain import comm
from hpctrain.errors import UserError


class GlobalBatchSampler:
    def __init__(self, rows: np.ndarray, seed: int, rank: int, world_size: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.rows[np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless resuming inside it (same epoch: keep the cursor)."""
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0
            self._order = self._permutation(epoch)

    def set_rows(self, rows: np.ndarray) -> None:
        """Train on another subset from the next epoch on (dynamic pruning); call before set_epoch."""
        self.rows = np.asarray(rows, dtype=np.int64)
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
        """This rank's rows for the next step, or None when the epoch is used up.

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


class AdaptiveBatchSampler:
    """A DataLoader `batch_sampler` over `GlobalBatchSampler`: each step yields this rank's slice of
    the next global batch, at the size in force when the loader asks for it.

    `batch` is a fixed global batch or anything with a `global_batch` attribute (an
    `hpctrain.AdaptiveBatch`), read for every batch made: the loader is never rebuilt when the
    batch grows, and since every rank applies rank 0's decision at the same step, every rank
    reads the same size. A DataLoader with workers asks `num_workers × prefetch_factor` batches
    ahead, so those keep the size they were made with (on every rank alike).

    Resuming: call `record_batch()` after each step (as with Horovod's `ElasticSampler`); then
    `state_dict()` holds the epoch, the samples consumed, and the sizes of the batches made but not
    yet consumed, and a sampler loaded from it yields exactly the batches the saved one would have.
    """

    def __init__(self, data: int | Sized, batch: int | Any, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        n = data if isinstance(data, (int, np.integer)) else len(data)
        if rank is None or world_size is None:
            rank, world_size = comm.rank() if rank is None else rank, comm.size() if world_size is None else world_size
        if not isinstance(batch, (int, np.integer)) and not hasattr(batch, "global_batch"):
            raise UserError(f"AdaptiveBatchSampler: batch = {batch!r}; give a global batch size or an "
                            "hpctrain.AdaptiveBatch")
        if n < world_size:
            raise UserError(f"AdaptiveBatchSampler: {n} samples cannot be split over {world_size} ranks")
        self.batch = batch
        self.sampler = GlobalBatchSampler(np.arange(n, dtype=np.int64), seed, rank, world_size)
        self._consumed = 0                   # the epoch's samples (all ranks) in batches consumed
        self._made: deque[tuple[int, int]] = deque()    # (global batch, cursor after) made, not consumed
        self._replay: list[int] = []         # sizes to make the next batches with (resume)
        self._check(self.global_batch)

    @property
    def global_batch(self) -> int:
        """The global batch size the next batch is made with."""
        return int(self.batch if isinstance(self.batch, (int, np.integer)) else self.batch.global_batch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _check(self, global_batch: int) -> None:
        if global_batch < 1 or global_batch % self.sampler.world_size:
            raise UserError(f"AdaptiveBatchSampler: global batch {global_batch} must be a positive multiple of "
                            f"the world size {self.sampler.world_size}")

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for `epoch` (as DistributedSampler.set_epoch); the same epoch again keeps a resumed cursor."""
        if epoch != self.sampler.epoch:
            self.sampler.set_epoch(epoch)
            self._consumed, self._made, self._replay = 0, deque(), []

    def __iter__(self) -> Iterator[list[int]]:
        # A new pass starts where consumption stopped: batches made but not consumed (a loop left
        # early, a loader's prefetch) are made again, at the same sizes.
        self._replay = [size for size, _ in self._made] + self._replay
        self._made.clear()
        self.sampler.cursor = self._consumed
        if self.sampler.exhausted():                      # the epoch was used up: go over it again
            self._consumed = self.sampler.cursor = 0
            self._replay = []
        while True:
            size = self._replay.pop(0) if self._replay else self.global_batch
            self._check(size)
            local = self.sampler.next_batch(size)
            if local is None:
                return
            self._made.append((size, self.sampler.cursor))
            yield local.tolist()

    def __len__(self) -> int:
        """Steps left in this epoch at the current size (exact unless the batch grows meanwhile)."""
        return self.sampler.steps_left(self.global_batch) if not self.sampler.exhausted() else 0

    def record_batch(self) -> int:
        """Mark the oldest batch made as consumed (call once per optimizer step); returns its global size."""
        if not self._made:
            raise UserError("AdaptiveBatchSampler.record_batch(): no batch was handed out since the last record; "
                            "call it once per step, after the step's batch came from the loader")
        size, self._consumed = self._made.popleft()
        return size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "cursor": self._consumed,
                "pending": [size for size, _ in self._made] + self._replay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict({"epoch": state["epoch"], "cursor": state["cursor"]})
        self._consumed, self._made, self._replay = int(state["cursor"]), deque(), list(state.get("pending", []))
