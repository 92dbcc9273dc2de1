"""Datasets as seen by training: a train and a validation split, each indexable in batches.

Every dataset (built-in arrays, an HDF5 file, a directory of shards) implements the small
`Dataset` protocol, so the sampler and the training loop never care where samples live.
For one's own loop: `ShardDataset` (a torch Dataset) and `AdaptiveBatchSampler` (a DataLoader
batch sampler following the global batch), imported on first use so this package needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hpctrain.errors import UserError

__all__ = ["ShardDataset", "AdaptiveBatchSampler", "GlobalBatchSampler", "Dataset", "ArrayDataset", "Splits",
           "load_splits"]
_LAZY = {"ShardDataset": "hpctrain.data.dataset", "AdaptiveBatchSampler": "hpctrain.data.sampler",
         "GlobalBatchSampler": "hpctrain.data.sampler"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hpctrain.data' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)


TASKS = ("classification", "regression")


class Dataset(Protocol):
    """What training needs from a split: its size, labels, stable ids, and batches by index.

    Classification: y is the int64 class label [B] and `labels` are those labels. Regression: y is
    float32 [B, *target_shape] (any shape, () for one number per sample) and `labels` are all 0:
    one stratum, so importance filtering selects over the whole split instead of per class.
    """

    def __len__(self) -> int: ...

    @property
    def labels(self) -> np.ndarray: ...           # int64 [N], cheap (used by filtering/stratification)

    @property
    def sample_ids(self) -> np.ndarray: ...       # int64 [N], stable across shardings (scores key on these)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...   # (x float32 [B, ...], y int64 [B] or float32 [B, ...])


@dataclass
class ArrayDataset:
    """An in-memory split."""
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None

    task: str = "classification"

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64 if self.task == "classification" else np.float32)
        if self.ids is None:
            self.ids = np.arange(len(self.y), dtype=np.int64)
        self._labels = self.y if self.task == "classification" else np.zeros(len(self.y), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def sample_ids(self) -> np.ndarray:
        return self.ids

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[indices], self.y[indices]


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int                 # classification: classes; regression: 0
    input_shape: tuple[int, ...]     # one sample's shape, e.g. (40,) for mnist1d
    task: str = "classification"     # or "regression"
    target_shape: tuple[int, ...] = ()          # regression: one target's shape (() = one number)
    target_range: tuple[float, float] | None = None   # regression: (min, max) over every target (PSNR's peak)

    @property
    def num_outputs(self) -> int:
        """What the model must output per sample: a logit per class, or one value per target element."""
        if self.task == "classification":
            return self.num_classes
        return int(np.prod(self.target_shape, dtype=np.int64))


def load_splits(data_cfg, seed: int = 0, task: str | None = "classification") -> Splits:
    """Resolve `data.name`: a built-in dataset, an HDF5 file with x/y, or a shard directory.

    `task` is what the loss needs: "classification" (integer labels; a fraction is a one-line error),
    "regression" (float targets of any shape; integer y is read as numbers), or None: whatever the
    data holds (an integer 1-D y is classification, anything else regression)."""
    from hpctrain.data import builtin

    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {TASKS} or None")
    name = data_cfg.name
    if name in builtin.BUILTINS:
        splits = builtin.BUILTINS[name](data_cfg, seed)
        if task is not None and splits.task != task:
            others = [n for n, t in builtin.BUILTIN_TASKS.items() if t == task]
            raise UserError(f"data.name = {name!r} is a {splits.task} dataset but the loss needs {task} targets; "
                            f"choose a {task} dataset ({', '.join(others)}) or a loss for {splits.task} "
                            f"(train.loss = {'cross_entropy' if splits.task == 'classification' else 'mse or l1'})")
        return splits
    path = Path(name)
    if path.is_dir():
        from hpctrain.data import shards
        return shards.load_shard_splits(path, data_cfg, seed, task)
    if path.is_file():
        return builtin.load_hdf5_file(path, data_cfg, seed, task)
    raise UserError(f"data.name = {name!r} is neither a built-in dataset ({', '.join(builtin.BUILTINS)}) "
                    f"nor an existing HDF5 file or shard directory; fix the path or the name")


def target_range(*arrays: np.ndarray) -> tuple[float, float]:
    """(min, max) over every element of the given target arrays."""
    return (float(min(a.min() for a in arrays if a.size)), float(max(a.max() for a in arrays if a.size)))


def holdout_positions(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) positions of a seeded, stratification-free random split of `n` samples."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_holdout(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int,
                  task: str = "classification") -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded, stratification-free random split; ids are positions in the source."""
    train, val = holdout_positions(len(y), val_fraction, seed)
    return ArrayDataset(x[train], y[train], train, task), ArrayDataset(x[val], y[val], val, task)
