"""Where samples to shard come from: an .npz, an x/y .npy pair, an HDF5 file with x/y, or a
built-in dataset, each checked and opened as train (and val) splits with stable sample ids."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from hpctrain.config import DataConfig
from hpctrain.data.builtin import BUILTINS, infer_task, regression_targets
from hpctrain.data.shards.layout import SPLITS
from hpctrain.errors import UserError


@dataclass
class SourceSplit:
    """One split of a source: `x` is any array-like that slices (ndarray, memmap, h5py dataset)."""
    split: str
    x: Any
    y: np.ndarray
    sample_ids: np.ndarray


def _checked(split: str, x: Any, y: Any, ids: np.ndarray, where: str, task: str | None = None) -> SourceSplit:
    y = np.asarray(y)
    if len(x) != len(y):
        raise UserError(f"{where}: {split} x has {len(x)} samples but y has {len(y)}; they must match")
    if len(y) == 0:
        raise UserError(f"{where}: the {split} split is empty; give at least one sample")
    if not np.issubdtype(np.dtype(x.dtype), np.number):
        raise UserError(f"{where}: x has dtype {x.dtype}; shards need numeric samples")
    if (task or infer_task(y)) == "regression":
        return SourceSplit(split, x, regression_targets(where, "y" if split == "train" else "y_val", y),
                           np.asarray(ids, dtype=np.int64))
    if y.ndim != 1:
        raise UserError(f"{where}: y has shape {y.shape}; class labels are one integer per sample "
                        f"(for targets of any shape use --task regression)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.array_equal(y, np.round(y)):
            raise UserError(f"{where}: y must hold integer class labels, got dtype {y.dtype} with fractions "
                            f"(for float targets use --task regression)")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise UserError(f"{where}: y has negative labels (min {y.min()}); classes must be 0..C-1")
    return SourceSplit(split, x, y, np.asarray(ids, dtype=np.int64))


def _pair(arrays: Any, where: str, task: str | None = None) -> list[SourceSplit]:
    """x/y (and optional x_val/y_val) from an npz or HDF5 file; val ids follow the train ids,
    as `hpctrain.data.builtin.load_hdf5_file` numbers them."""
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UserError(f"{where}: lacks {missing}; it needs x [N, ...] and y [N] (optionally x_val, y_val)")
    n = len(arrays["y"])
    y = arrays["y"][:]
    task = task or infer_task(y)          # train decides for val: one task per shard set
    out = [_checked("train", arrays["x"], y, np.arange(n), where, task)]
    if "x_val" in arrays and "y_val" in arrays:
        m = len(arrays["y_val"])
        out.append(_checked("val", arrays["x_val"], arrays["y_val"][:], np.arange(n, n + m), where, task))
    return out


@contextmanager
def open_source(src: str, labels: str | None = None, num_samples: int = 10000,
                task: str | None = None) -> Iterator[list[SourceSplit]]:
    """Open SRC (.npz, x .npy + labels .npy, HDF5 with x/y, or a built-in dataset name) as splits;
    `task` None decides by y (built-in datasets know theirs)."""
    path = Path(src)
    if src in BUILTINS:
        splits = BUILTINS[src](DataConfig(name=src, num_samples=num_samples), 0)
        out = []
        for split, ds in zip(SPLITS, (splits.train, splits.val)):
            x, y = ds.get(np.arange(len(ds)))
            out.append(_checked(split, x, y, ds.sample_ids, src, splits.task))
        yield out
    elif not path.is_file():
        raise UserError(f"--input {src!r} is neither a built-in dataset ({', '.join(BUILTINS)}) "
                        f"nor an existing .npz/.npy/.h5 file; fix the path")
    elif path.suffix == ".npz":
        with np.load(path) as f:
            yield _pair({k: f[k] for k in f.files}, src, task)
    elif path.suffix == ".npy":
        label_path = Path(labels) if labels else path.with_name("y" + path.name[1:])
        if not labels and not path.name.startswith("x"):
            raise UserError(f"--input {src}: name the labels file with --labels Y.npy "
                            f"(only x*.npy finds its y*.npy sibling by itself)")
        if not label_path.is_file():
            raise UserError(f"labels file {label_path} not found; pass --labels Y.npy next to --input {src}")
        x = np.load(path, mmap_mode="r")
        yield [_checked("train", x, np.load(label_path), np.arange(len(x)), src, task)]
    else:
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise UserError(f"--input {src}: not a readable .npz, .npy or HDF5 file ({exc})") from None
        with f:
            yield _pair(f, src, task)


def check_consistent_sources(sources: list[SourceSplit], where: str) -> None:
    """One shard set holds one sample shape, one kind of target, and unique sample ids."""
    shapes = {tuple(s.x.shape[1:]) for s in sources}
    if len(shapes) > 1:
        raise UserError(f"{where}: train and val samples have different shapes {sorted(shapes)}; they must match")
    targets = {(str(s.y.dtype), tuple(s.y.shape[1:])) for s in sources}
    if len(targets) > 1:
        raise UserError(f"{where}: train and val targets differ in kind or shape {sorted(targets)}; they must match")
    ids = np.concatenate([s.sample_ids for s in sources])
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"{where}: sample ids repeat; every sample needs its own id")


def first_task(sources: list[SourceSplit]) -> str:
    """The task of a checked source: int64 targets are class labels, anything else regression."""
    return "classification" if sources[0].y.dtype == np.int64 else "regression"
