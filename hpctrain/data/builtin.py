"""Built-in datasets that need no download: MNIST-1D (generated) and sklearn's digits, plus x/y HDF5 files.

Classification: `mnist1d`, `digits`. Regression (denoising, the image-restoration setting of seed
003): `mnist1d-denoise` and `digits-denoise`, whose inputs are the clean samples plus Gaussian
noise of standard deviation `DENOISE_SIGMA` times the clean data's standard deviation, drawn once
with a fixed seed (the same noisy set on every rank and every run), and whose targets are the
clean samples (same shape as the inputs). MNIST-1D's clean signals are its recipe without its own
noise terms (corr_noise_scale = iid_noise_scale = 0); digits' are the 8x8 images in [0, 1].
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import numpy as np

from hpctrain.data import ArrayDataset, Splits, split_holdout, target_range
from hpctrain.atomic import replacing
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
            with replacing(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
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


DENOISE_SIGMA = 0.5
_DENOISE_SEED = 0xD1


def _denoise_splits(clean_train: np.ndarray, clean_val: np.ndarray, n_train: int) -> Splits:
    clean_train, clean_val = clean_train.astype(np.float32), clean_val.astype(np.float32)
    sigma = DENOISE_SIGMA * float(clean_train.std())
    rng = np.random.default_rng(_DENOISE_SEED)
    noisy_train = clean_train + rng.normal(0, sigma, clean_train.shape).astype(np.float32)
    noisy_val = clean_val + rng.normal(0, sigma, clean_val.shape).astype(np.float32)
    train = ArrayDataset(noisy_train, clean_train, task="regression")
    val = ArrayDataset(noisy_val, clean_val, np.arange(n_train, n_train + len(clean_val), dtype=np.int64),
                       task="regression")
    return Splits(train, val, num_classes=0, input_shape=tuple(noisy_train.shape[1:]), task="regression",
                  target_shape=tuple(clean_train.shape[1:]), target_range=target_range(clean_train, clean_val))


def mnist1d_denoise(data_cfg, seed: int = 0) -> Splits:
    """MNIST-1D's 40-sample signals without the recipe's noise (targets), plus Gaussian noise (inputs)."""
    def make() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.num_samples = data_cfg.num_samples
        args.corr_noise_scale = args.iid_noise_scale = 0.0
        d = make_dataset(args)
        return {"x": d["x"], "x_test": d["x_test"]}

    d = _cached_npz(f"mnist1d-clean-{data_cfg.num_samples}", make)
    return _denoise_splits(d["x"], d["x_test"], len(d["x"]))


def digits_denoise(data_cfg, seed: int = 0) -> Splits:
    """sklearn's 8x8 digits in [0, 1] (targets, shape (8, 8)) plus Gaussian noise (inputs); `data.val_fraction` held out."""
    from sklearn.datasets import load_digits
    from hpctrain.data import holdout_positions
    images = (load_digits().images / 16.0).astype(np.float32)
    train, val = holdout_positions(len(images), data_cfg.val_fraction, seed)
    splits = _denoise_splits(images[train], images[val], 0)
    splits.train.ids, splits.val.ids = train, val
    return splits


def load_hdf5_file(path: Path, data_cfg, seed: int = 0, task: str | None = "classification") -> Splits:
    """An HDF5 file with datasets `x` [N, ...] and `y` [N] or [N, ...] (optionally `x_val`/`y_val`).

    Classification needs integer labels 0..C-1 in a 1-D y; regression takes float targets of any
    shape (they must be finite); task None decides by y (integer and 1-D: classification)."""
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
    if task is None:
        task = infer_task(y)
    if task == "regression":
        return _regression_file(path, x, y, val, data_cfg, seed)
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


def infer_task(y: np.ndarray) -> str:
    """What targets `y` hold when the loss does not say: an integer (or whole-number) 1-D y is class labels."""
    y = np.asarray(y)
    if y.ndim == 1 and (np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.number) and np.all(np.isfinite(y)) and np.array_equal(y, np.round(y)))):
        return "classification"
    return "regression"


def regression_targets(where: str, name: str, y: np.ndarray) -> np.ndarray:
    """Float targets must be numbers and finite: a NaN or Inf target is one line, not a NaN loss later."""
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise UserError(f"{where}: {name} has dtype {y.dtype}; regression targets must be numbers")
    y = y.astype(np.float32)
    bad = ~np.isfinite(y)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), y.shape)
        raise UserError(f"{where}: {name} holds {int(bad.sum())} non-finite target value(s) (e.g. {name}"
                        f"{list(first)} = {y[first]!r}); fix or drop those samples")
    return y


def _regression_file(path: Path, x: np.ndarray, y: np.ndarray, val, data_cfg, seed: int) -> Splits:
    y = regression_targets(str(path), "y", y)
    if val is not None:
        val = (val[0], regression_targets(str(path), "y_val", val[1]))
        if val[1].shape[1:] != y.shape[1:]:
            raise UserError(f"{path}: y_val targets have shape {val[1].shape[1:]} but y's have {y.shape[1:]}; they must match")
        train_ds = ArrayDataset(x, y, task="regression")
        val_ds = ArrayDataset(val[0], val[1], np.arange(len(y), len(y) + len(val[1]), dtype=np.int64), task="regression")
    else:
        train_ds, val_ds = split_holdout(x, y, data_cfg.val_fraction, seed, task="regression")
    return Splits(train_ds, val_ds, num_classes=0, input_shape=tuple(x.shape[1:]), task="regression",
                  target_shape=tuple(y.shape[1:]), target_range=target_range(train_ds.y, val_ds.y))


def _class_labels(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    """Class labels must be whole numbers 0..C-1: fractions (soft or regression targets) are one line,
    never truncated silently."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{path}: {name} has shape {y.shape}; classification needs one integer label per sample "
                        f"(for targets of any shape set train.loss = \"mse\" or \"l1\")")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or not np.array_equal(y, np.round(y)):
            bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0]) if np.issubdtype(y.dtype, np.number) else 0
            raise UserError(f"{path}: {name} holds non-integer labels (dtype {y.dtype}, e.g. {name}[{bad}] = "
                            f"{y[bad]!r}); classification needs integer class labels 0..C-1 (for float "
                            f"targets set train.loss = \"mse\" or \"l1\")")
    if len(y) and y.min() < 0:
        raise UserError(f"{path}: {name} has negative labels (min {y.min()}); classes must be 0..C-1")
    return y.astype(np.int64)


BUILTINS: dict[str, Callable[..., Splits]] = {"mnist1d": mnist1d, "digits": digits,
                                               "mnist1d-denoise": mnist1d_denoise, "digits-denoise": digits_denoise}
BUILTIN_TASKS: dict[str, str] = {"mnist1d": "classification", "digits": "classification",
                                 "mnist1d-denoise": "regression", "digits-denoise": "regression"}
