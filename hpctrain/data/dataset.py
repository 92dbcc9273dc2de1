"""`ShardDataset`: a shard directory (or any source `hpctrain train` reads) as a torch `Dataset`.

Shard files are opened on first read in the process that reads, so a DataLoader worker (forked
or spawned) opens its own HDF5 handles and never uses one that crossed a fork. Labels and
sample ids are in memory (index.h5); samples are read on demand in whole HDF5 chunks.
The importance-filtered subset `hpctrain train` trains on is a view, `kept(...)`: the same
pure function of labels, scores and settings on every rank, so no rank has to send it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hpctrain.data import Dataset as SplitDataset, load_splits
from hpctrain.errors import UserError

SPLITS = ("train", "val")


class ShardDataset(torch.utils.data.Dataset):
    """One split of a shard directory, HDF5 file or built-in dataset, as `(x, y)` tensor pairs.

    The keyword arguments mirror the `[data]` config keys, so `ShardDataset(dir, keep_fraction=0.7)`
    trains on what `hpctrain train` with `data.keep_fraction = 0.7` would (same `seed`, same
    holdout split and kept samples).
    """

    def __init__(self, source: str | Path, split: str = "train", *, keep_fraction: float = 1.0,
                 score: str = "el2n", keep: str = "hardest", scores_file: str | Path = "",
                 val_fraction: float = 0.2, num_samples: int = 10000, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"ShardDataset: split = {split!r}; choose 'train' or 'val'")
        from hpctrain.config import DataConfig

        self._cfg = DataConfig(name=str(source), num_samples=num_samples, val_fraction=val_fraction,
                               scores_file=str(scores_file))
        splits = load_splits(self._cfg, seed, task=None)      # the data says: class labels or float targets
        self._split: SplitDataset = splits.train if split == "train" else splits.val
        self.num_classes: int = splits.num_classes
        self.task: str = splits.task                            # "classification" or "regression"
        self.target_shape: tuple[int, ...] = tuple(splits.target_shape)
        self.sample_shape: tuple[int, ...] = tuple(splits.input_shape)
        self.rows = np.arange(len(self._split), dtype=np.int64)   # rows of the split in this view
        self.rows = self.kept(keep_fraction=keep_fraction, score=score, keep=keep).rows

    # -- views ---------------------------------------------------------------------------
    def view(self, indices: Sequence[int] | np.ndarray) -> "ShardDataset":
        """The samples `indices` (0 .. len - 1) of this dataset (sharing its reader)."""
        new = object.__new__(ShardDataset)
        new.__dict__.update(self.__dict__)
        new.rows = self.rows[self._checked(indices)]
        return new

    def kept(self, keep_fraction: float = 1.0, score: str = "el2n", keep: str = "hardest",
             scores_file: str | Path | None = None) -> "ShardDataset":
        """The importance-filtered view: per class, the `keep` (hardest/easiest/middle or "lo:hi")
        `keep_fraction` by `score` from scores.h5 (`hpctrain score`), as `[data]` selects them."""
        from hpctrain.data import filtering

        cfg = dataclasses.replace(self._cfg, keep_fraction=keep_fraction, score=score, keep=keep,
                                  scores_file=str(scores_file) if scores_file else self._cfg.scores_file)
        return self.view(filtering.training_rows(self, cfg))

    # -- what filtering and samplers read ------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """int64 class label of every sample in this view (cheap: from the index, no sample read);
        all 0 for regression data (one stratum)."""
        return self._split.labels[self.rows]

    @property
    def sample_ids(self) -> np.ndarray:
        """Stable ids (the same across re-shardings): what scores are matched by."""
        return self._split.sample_ids[self.rows]

    # -- reading -------------------------------------------------------------------------
    def _checked(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.rows)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            bad = indices[(indices < -n) | (indices >= n)][0]
            raise IndexError(f"index {bad} is out of range for a ShardDataset of {n} samples")
        return indices % max(n, 1)

    def get(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch, read in one pass: (x float32 [B, *sample_shape], y int64 [B] class labels, or
        float32 [B, *target_shape] regression targets)."""
        x, y = self._split.get(self.rows[self._checked(indices)])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What a DataLoader with a batch sampler calls: one batched read instead of B single ones."""
        x, y = self.get(indices)
        return list(zip(x, y))

    def __repr__(self) -> str:
        kind = (f"{self.num_classes} classes" if self.task == "classification"
                else f"regression targets of shape {self.target_shape}")
        return f"ShardDataset({self._cfg.name!r}, {len(self)} samples of shape {self.sample_shape}, {kind})"
