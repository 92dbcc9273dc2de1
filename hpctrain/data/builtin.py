"""Built-in datasets that need no download: MNIST-1D (generated) and sklearn's digits, plus x/y HDF5 files."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import numpy as np

from hpctrain.data import ArrayDataset, Splits, split_holdout
from hpctrain.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("HPCTRAIN_CACHE", Path.home() / ".cache" / "hpctrain"))


def _cached_npz(name: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Generate once per machine: ranks that start together wait on a file lock, not on each other's CPU."""
    path = cache_dir() / "datasets" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            arrays = make()
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def mnist1d(data_cfg, seed: int = 0) -> Splits:
    """MNIST-1D (Greydanus 2020), generated offline with the `mnist1d` package's own recipe."""
    def make() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.num_samples = data_cfg.num_samples
        d = make_dataset(args)
        return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}

    d = _cached_npz(f"mnist1d-{data_cfg.num_samples}", make)
    n_train = len(d["y"])
    train = ArrayDataset(d["x"], d["y"])
    val = ArrayDataset(d["x_test"], d["y_test"], np.arange(n_train, n_train + len(d["y_test"]), dtype=np.int64))
    return Splits(train, val, num_classes=10, input_shape=tuple(d["x"].shape[1:]))


def digits(data_cfg, seed: int = 0) -> Splits:
    """sklearn's 8x8 digits (1797 samples, shipped with sklearn), flattened to 64 features in [0, 1]."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    train, val = split_holdout((x / 16.0).astype(np.float32), y, data_cfg.val_fraction, seed)
    return Splits(train, val, num_classes=10, input_shape=(64,))


def load_hdf5_file(path: Path, data_cfg, seed: int = 0) -> Splits:
    """An HDF5 file with datasets `x` [N, ...] and `y` [N] (optionally `x_val`/`y_val`)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("x", "y") if k not in f]
            if missing:
                raise UserError(f"{path}: HDF5 file lacks dataset(s) {missing}; it needs x [N, ...] and y [N]")
            x, y = f["x"][:], f["y"][:]
            val = (f["x_val"][:], f["y_val"][:]) if "x_val" in f and "y_val" in f else None
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({exc}); re-create it or point data.name elsewhere") from None
    if len(x) != len(y):
        raise UserError(f"{path}: x has {len(x)} samples but y has {len(y)}; they must match")
    y = _class_labels(path, "y", y)
    if val is not None:
        val = (val[0], _class_labels(path, "y_val", val[1]))
    if val is None:
        train_ds, val_ds = split_holdout(x, y, data_cfg.val_fraction, seed)
    else:
        train_ds = ArrayDataset(x, y)
        val_ds = ArrayDataset(val[0], val[1], np.arange(len(y), len(y) + len(val[1]), dtype=np.int64))
    return Splits(train_ds, val_ds, num_classes=int(max(y.max(), val_ds.labels.max())) + 1,
                  input_shape=tuple(x.shape[1:]))


def _class_labels(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    """Class labels must be whole numbers 0..C-1: fractions (soft or regression targets) are one line,
    never truncated silently."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{path}: {name} has shape {y.shape}; classification needs one integer label per sample")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0]) if np.issubdtype(y.dtype, np.number) else 0
            raise UserError(f"{path}: {name} holds non-integer labels (dtype {y.dtype}, e.g. {name}[{bad}] = "
                            f"{y[bad]!r}); classification needs integer class labels 0..C-1")
    if len(y) and y.min() < 0:
        raise UserError(f"{path}: {name} has negative labels (min {y.min()}); classes must be 0..C-1")
    return y.astype(np.int64)


BUILTINS: dict[str, Callable[..., Splits]] = {"mnist1d": mnist1d, "digits": digits}
