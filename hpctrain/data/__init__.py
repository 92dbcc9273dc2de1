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


class Dataset(Protocol):
    """What training needs from a split: its size, labels, stable ids, and batches by index."""

    def __len__(self) -> int: ...

    @property
    def labels(self) -> np.ndarray: ...           # int64 [N], cheap (used by filtering/stratification)

    @property
    def sample_ids(self) -> np.ndarray: ...       # int64 [N], stable across shardings (scores key on these)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...   # (x float32 [B, ...], y int64 [B])


@dataclass
class ArrayDataset:
    """An in-memory split."""
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        if self.ids is None:
            self.ids = np.arange(len(self.y), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> np.ndarray:
        return self.y

    @property
    def sample_ids(self) -> np.ndarray:
        return self.ids

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[indices], self.y[indices]


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]     # one sample's shape, e.g. (40,) for mnist1d


def load_splits(data_cfg, seed: int = 0) -> Splits:
    """Resolve `data.name`: a built-in dataset, an HDF5 file with x/y, or a shard directory."""
    from hpctrain.data import builtin

    name = data_cfg.name
    if name in builtin.BUILTINS:
        return builtin.BUILTINS[name](data_cfg, seed)
    path = Path(name)
    if path.is_dir():
        from hpctrain.data import shards
        return shards.load_shard_splits(path, data_cfg, seed)
    if path.is_file():
        return builtin.load_hdf5_file(path, data_cfg, seed)
    raise UserError(f"data.name = {name!r} is neither a built-in dataset ({', '.join(builtin.BUILTINS)}) "
                    f"nor an existing HDF5 file or shard directory; fix the path or the name")


def holdout_positions(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) positions of a seeded, stratification-free random split of `n` samples."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_holdout(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded, stratification-free random split; ids are positions in the source."""
    train, val = holdout_positions(len(y), val_fraction, seed)
    return ArrayDataset(x[train], y[train], train), ArrayDataset(x[val], y[val], val)
