"""HDF5 shard directories: written in parallel from any source, verified, and read lazily by training.

Layout of a shard directory DIR (schema `SCHEMA_VERSION`):

  shard-00000.h5 ...  each holds samples of one split: `x` [n, *sample_shape] in the source dtype
                      (chunked in blocks of whole samples, optional gzip/lzf, fletcher32 so a
                      corrupt chunk fails on read), `y` int64 [n] (classification) or float32
                      [n, *target_shape] (regression, chunked like x), `sample_id` int64 [n];
                      attrs schema_version, split, index, count, sample_shape, x_dtype.
  index.h5            labels, sample ids and split of every sample, in shard order, so opening
                      the set reads one small file instead of touching every shard (regression:
                      labels are all 0, one stratum; the targets stay in the shards).
  manifest.json       written LAST and atomically: counts, shapes, dtypes, and bytes/SHA-256 of
                      every shard and of index.h5. A directory without it is an unfinished write.

The manifest's `task` is "classification" (schema 1; a manifest without `task` is one) or
"regression" (schema 2, with `target_shape` and `target_range` [min, max] over every target, the
PSNR peak). A file's y is read as class labels unless `hpctrain shard --task regression` (or
`--task auto`: integer or whole-number 1-D y is class labels, anything else regression).

Every file is written under a temporary name and renamed, so a crash never leaves a file that
looks complete. Under mpirun rank r writes shards r, r+size, ...; rank 0 writes index and manifest.
Opening for training checks sizes and structure (cheap); `hpctrain shard verify` checks SHA-256.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from hpctrain.data import Splits, holdout_positions
from hpctrain.atomic import replacing, write_atomic
from hpctrain.errors import UserError

SCHEMA_VERSION = 1                 # classification shards (readable by every hpctrain)
REGRESSION_SCHEMA_VERSION = 2      # float targets: an hpctrain without regression refuses them
READABLE_SCHEMAS = (SCHEMA_VERSION, REGRESSION_SCHEMA_VERSION)
MANIFEST = "manifest.json"
INDEX = "index.h5"
SPLITS = ("train", "val")
CHUNK_KIB = 64                     # default uncompressed KiB per chunk: small enough for random access
MAX_OPEN_FILES = 16                # shard handles kept open per process
CACHE_BYTES = 64 * 1024 * 1024     # decoded chunks kept per dataset per process
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "none": {}, "lzf": {"compression": "lzf"}, "gzip": {"compression": "gzip", "compression_opts": 4},
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


# -- sources ---------------------------------------------------------------------------------

@dataclass
class SourceSplit:
    """One split of a source: `x` is any array-like that slices (ndarray, memmap, h5py dataset)."""
    split: str
    x: Any
    y: np.ndarray
    sample_ids: np.ndarray


def _checked(split: str, x: Any, y: Any, ids: np.ndarray, where: str, task: str | None = None) -> SourceSplit:
    from hpctrain.data.builtin import infer_task, regression_targets

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
    from hpctrain.data.builtin import infer_task

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
    from hpctrain.data import builtin

    path = Path(src)
    if src in builtin.BUILTINS:
        from hpctrain.config import DataConfig
        splits = builtin.BUILTINS[src](DataConfig(name=src, num_samples=num_samples), 0)
        out = []
        for split, ds in zip(SPLITS, (splits.train, splits.val)):
            x, y = ds.get(np.arange(len(ds)))
            out.append(_checked(split, x, y, ds.sample_ids, src, splits.task))
        yield out
    elif not path.is_file():
        raise UserError(f"--input {src!r} is neither a built-in dataset ({', '.join(builtin.BUILTINS)}) "
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


# -- writing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardPlan:
    index: int
    source: int          # which SourceSplit
    start: int
    stop: int


def plan_shards(sources: list[SourceSplit], shard_size: int) -> list[ShardPlan]:
    """Cut every split into shards of `shard_size` samples; the plan is the same on every rank."""
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size} must be a positive number of samples")
    plans: list[ShardPlan] = []
    for s, source in enumerate(sources):
        for start in range(0, len(source.y), shard_size):
            plans.append(ShardPlan(len(plans), s, start, min(start + shard_size, len(source.y))))
    return plans


def _chunk_rows(sample_shape: tuple[int, ...], dtype: np.dtype, count: int, chunk_kib: int) -> int:
    sample_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * dtype.itemsize)
    return int(min(count, max(1, chunk_kib * 1024 // sample_bytes)))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_shard(out: Path, plan: ShardPlan, source: SourceSplit, compression: str, chunk_kib: int) -> dict[str, Any]:
    """Write one shard (temp name, then rename) and return its manifest entry."""
    count = plan.stop - plan.start
    sample_shape = tuple(source.x.shape[1:])
    dtype = np.dtype(source.x.dtype)
    rows = _chunk_rows(sample_shape, dtype, count, chunk_kib)
    path = out / shard_name(plan.index)
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        x = f.create_dataset("x", shape=(count, *sample_shape), dtype=dtype, chunks=(rows, *sample_shape),
                             fletcher32=True, **COMPRESSIONS[compression])
        for lo in range(0, count, rows):        # one chunk at a time: memory stays one chunk
            hi = min(lo + rows, count)
            x[lo:hi] = source.x[plan.start + lo:plan.start + hi]
        if source.y.dtype == np.int64:
            f.create_dataset("y", data=source.y[plan.start:plan.stop], dtype=np.int64)
        else:                                   # regression targets: chunked like x, read like x
            target_shape = tuple(source.y.shape[1:])
            f.create_dataset("y", data=source.y[plan.start:plan.stop], dtype=np.float32,
                             chunks=(rows, *target_shape), fletcher32=True, **COMPRESSIONS[compression])
        f.create_dataset("sample_id", data=source.sample_ids[plan.start:plan.stop], dtype=np.int64)
        f.attrs.update(schema_version=SCHEMA_VERSION, split=source.split, index=plan.index, count=count,
                       sample_shape=np.asarray(sample_shape, dtype=np.int64), x_dtype=dtype.str)
    return {"file": path.name, "split": source.split, "count": count, "chunk_rows": rows,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_shards(sources: list[SourceSplit], out: Path, shard_size: int, compression: str,
                 rank: int = 0, size: int = 1, chunk_kib: int = CHUNK_KIB) -> list[dict[str, Any]]:
    """Write this rank's shards (r, r+size, ...); returns their manifest entries."""
    plans = plan_shards(sources, shard_size)[rank::size]
    return [write_shard(out, plan, sources[plan.source], compression, chunk_kib)
            for plan in tqdm(plans, desc="shards", unit="shard", disable=rank != 0)]


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Make `out` an empty shard directory; an old one is removed only with --overwrite, manifest first."""
    out.mkdir(parents=True, exist_ok=True)
    ours = [out / MANIFEST, out / INDEX, out / "scores.h5", *out.glob("shard-*.h5"), *out.glob(".*.tmp*")]
    ours = [p for p in ours if p.exists()]
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if others:
        raise UserError(f"--out {out} holds other files ({', '.join(others[:3])}); choose an empty or new directory")
    if ours and not overwrite:
        raise UserError(f"--out {out} already holds shards; pass --overwrite to replace them (and their scores)")
    for p in ours:                  # ours[0] is the manifest: the directory stops looking complete first
        p.unlink()


def write_index_and_manifest(out: Path, sources: list[SourceSplit], entries: list[dict[str, Any]],
                             source_name: str, shard_size: int, compression: str) -> dict[str, Any]:
    """Rank 0, after every shard exists: index.h5, then manifest.json (the commit point)."""
    entries = sorted(entries, key=lambda e: int(e["file"][6:11]))
    plans = plan_shards(sources, shard_size)
    if [e["file"] for e in entries] != [shard_name(p.index) for p in plans]:
        raise RuntimeError(f"gathered shard entries do not match the plan of {len(plans)} shards")
    order = [sources[p.source] for p in plans]
    index_path = out / INDEX
    regression = first_task(sources) == "regression"
    with replacing(index_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("y", data=np.concatenate([
            np.zeros(p.stop - p.start, np.int64) if regression else s.y[p.start:p.stop] for s, p in zip(order, plans)]))
        f.create_dataset("sample_id", data=np.concatenate([s.sample_ids[p.start:p.stop] for s, p in zip(order, plans)]))
        f.create_dataset("shard_count", data=np.array([e["count"] for e in entries], dtype=np.int64))
    first = sources[0]
    manifest = {
        "format": "hpctrain-shards", "schema_version": REGRESSION_SCHEMA_VERSION if regression else SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "source": source_name,
        "sample_shape": list(first.x.shape[1:]), "x_dtype": np.dtype(first.x.dtype).str,
        "num_classes": 0 if regression else int(max(s.y.max() for s in sources)) + 1,
        **({"task": "regression", "target_shape": list(first.y.shape[1:]),
            "target_range": [float(min(s.y.min() for s in sources)), float(max(s.y.max() for s in sources))]}
           if regression else {"task": "classification"}),
        "counts": {s.split: len(s.y) for s in sources}, "shard_size": shard_size, "compression": compression,
        "index": {"file": INDEX, "bytes": index_path.stat().st_size, "sha256": sha256_file(index_path)},
        "shards": entries,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def first_task(sources: list[SourceSplit]) -> str:
    return "classification" if sources[0].y.dtype == np.int64 else "regression"


def check_consistent_sources(sources: list[SourceSplit], where: str) -> None:
    shapes = {tuple(s.x.shape[1:]) for s in sources}
    if len(shapes) > 1:
        raise UserError(f"{where}: train and val samples have different shapes {sorted(shapes)}; they must match")
    targets = {(str(s.y.dtype), tuple(s.y.shape[1:])) for s in sources}
    if len(targets) > 1:
        raise UserError(f"{where}: train and val targets differ in kind or shape {sorted(targets)}; they must match")
    ids = np.concatenate([s.sample_ids for s in sources])
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"{where}: sample ids repeat; every sample needs its own id")


# -- reading ---------------------------------------------------------------------------------

def _fix(root: Path, manifest: dict[str, Any] | None = None) -> str:
    source = (manifest or {}).get("source", "SRC")
    return f"re-create it with `hpctrain shard --input {source} --out {root} --overwrite`"


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, or one line saying why this is not a complete shard directory."""
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing: {root} is not a shard directory or its write did not finish; {_fix(root)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {_fix(root)}") from None
    if manifest.get("format") != "hpctrain-shards" or manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise UserError(f"{path}: format/schema {manifest.get('format')}/{manifest.get('schema_version')} is not "
                        f"hpctrain-shards/{' or '.join(map(str, READABLE_SCHEMAS))}; {_fix(root, manifest)}")
    return manifest


def manifest_hash(root: Path) -> str:
    """SHA-256 of the manifest: names this exact set of shards (scores record it as provenance)."""
    return sha256_file(root / MANIFEST)


def _check_file(root: Path, manifest: dict[str, Any], entry: dict[str, Any], full: bool) -> None:
    path = root / entry["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing (listed in {MANIFEST}); restore it or {_fix(root, manifest)}")
    actual = path.stat().st_size
    if actual != entry["bytes"]:
        raise UserError(f"{path} has {actual} bytes but {MANIFEST} says {entry['bytes']}: truncated or replaced; "
                        f"{_fix(root, manifest)}")
    if full and sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path}: SHA-256 checksum mismatch with {MANIFEST} (the file is corrupt); {_fix(root, manifest)}")


def _open_h5(path: Path) -> h5py.File:
    # locking=None leaves HDF5_USE_FILE_LOCKING (e.g. FALSE on Lustre/GPFS) in charge.
    return h5py.File(path, "r")


def _check_structure(root: Path, manifest: dict[str, Any], entry: dict[str, Any], f: h5py.File) -> None:
    """What training relies on: the datasets exist with the manifest's count, shape and dtype."""
    shape = (entry["count"], *manifest["sample_shape"])
    problems = [k for k in ("x", "y", "sample_id") if k not in f]
    if not problems:
        if f["x"].shape != shape or f["x"].dtype.str != manifest["x_dtype"]:
            problems.append(f"x is {f['x'].dtype.str}{f['x'].shape}, expected {manifest['x_dtype']}{shape}")
        problems += [f"{k} has {len(f[k])} rows" for k in ("y", "sample_id") if len(f[k]) != entry["count"]]
        if manifest.get("task") == "regression" and f["y"].shape[1:] != tuple(manifest["target_shape"]):
            problems.append(f"y targets have shape {f['y'].shape[1:]}, expected {tuple(manifest['target_shape'])}")
    if problems:
        raise UserError(f"{root / entry['file']}: does not match {MANIFEST} ({'; '.join(problems)}); {_fix(root, manifest)}")


class ShardedDataset:
    """A split backed by shard files: labels and ids in memory, samples read on demand.

    Files are opened lazily in the process that reads (after fork, per rank) and at most
    `MAX_OPEN_FILES` stay open. `get` sorts the requested samples, groups them by shard and
    HDF5 chunk, and reads each chunk whole, once: decoded chunks stay in an LRU cache of
    `CACHE_BYTES`, so later batches touching the same chunk cost a memory copy.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], starts: np.ndarray, positions: np.ndarray,
                 labels: np.ndarray, sample_ids: np.ndarray):
        self.root = root
        self.manifest = manifest
        self.sample_shape = tuple(manifest["sample_shape"])
        self._entries = manifest["shards"]
        self._starts = starts                        # global position of each shard's first sample
        self._chunk_rows = np.array([e["chunk_rows"] for e in self._entries], dtype=np.int64)
        self._positions = positions                  # this split's samples, as global positions
        self._labels = labels
        self._ids = sample_ids
        self._files: OrderedDict[int, h5py.File] = OrderedDict()         # shard → its open file
        self.regression = manifest.get("task") == "regression"
        self.target_shape = tuple(manifest.get("target_shape", ()))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._checked: set[int] = set()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._positions)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def sample_ids(self) -> np.ndarray:
        return self._ids

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _files=OrderedDict(), _cache=OrderedDict(), _cached_bytes=0, _pid=None)

    def _x(self, shard: int, name: str = "x") -> h5py.Dataset:
        if self._pid != os.getpid():                 # forked (e.g. a loader worker): never share handles
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            entry = self._entries[shard]
            path = self.root / entry["file"]
            _check_file(self.root, self.manifest, entry, full=False)
            try:
                f = _open_h5(path)
            except OSError as exc:
                raise UserError(f"{path} cannot be opened as HDF5 ({exc}); {_fix(self.root, self.manifest)}") from None
            if shard not in self._checked:
                _check_structure(self.root, self.manifest, entry, f)
                self._checked.add(shard)
            self._files[shard] = f
            if len(self._files) > MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return f[name]

    def _chunk(self, shard: int, index: int, name: str = "x") -> np.ndarray:
        """Chunk `index` of a shard's `x` (or regression `y`), decoded, from the LRU cache or the file."""
        key = (shard, index, name)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        rows = int(self._chunk_rows[shard])
        try:
            block = self._x(shard, name)[index * rows:(index + 1) * rows]
        except OSError as exc:
            raise UserError(f"{self.root / self._entries[shard]['file']}: read failed ({exc}); the shard is corrupt — "
                            f"run `hpctrain shard verify {self.root}`, then {_fix(self.root, self.manifest)}") from None
        self._cache[key] = block
        self._cached_bytes += block.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return block

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        positions = self._positions[indices]
        order = np.argsort(positions, kind="stable")
        pos = positions[order]
        shard = np.searchsorted(self._starts, pos, side="right") - 1
        local = pos - self._starts[shard]
        chunk = local // self._chunk_rows[shard]
        cuts = np.flatnonzero((np.diff(shard) != 0) | (np.diff(chunk) != 0)) + 1
        x = np.empty((len(pos), *self.sample_shape), dtype=np.float32)
        y = np.empty((len(pos), *self.target_shape), dtype=np.float32) if self.regression else None
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pos)]):
            if a == b:
                continue
            s, c = int(shard[a]), int(chunk[a])
            x[order[a:b]] = self._chunk(s, c)[local[a:b] - c * self._chunk_rows[s]]
            if y is not None:
                y[order[a:b]] = self._chunk(s, c, "y")[local[a:b] - c * self._chunk_rows[s]]
        return x, (y if y is not None else self._labels[indices])


@dataclass
class ShardDirectory:
    """A verified-at-open shard directory: manifest, and labels/ids/split of every sample."""
    root: Path
    manifest: dict[str, Any]
    labels: np.ndarray
    sample_ids: np.ndarray
    split: np.ndarray            # "train"/"val" per global position
    starts: np.ndarray

    def view(self, positions: np.ndarray) -> ShardedDataset:
        return ShardedDataset(self.root, self.manifest, self.starts, positions,
                              self.labels[positions], self.sample_ids[positions])


def open_directory(root: str | Path) -> ShardDirectory:
    """Read manifest and index, and check every shard's size (no shard is opened here)."""
    root = Path(root)
    manifest = read_manifest(root)
    # index.h5 holds every label and sample id training uses: its SHA-256 is checked at every open
    # (it is small), so a flipped byte never trains on a wrong label.
    _check_file(root, manifest, manifest["index"], full=True)
    for entry in manifest["shards"]:
        _check_file(root, manifest, entry, full=False)
    try:
        with _open_h5(root / INDEX) as f:
            labels, ids, counts = f["y"][:], f["sample_id"][:], f["shard_count"][:]
    except (OSError, KeyError) as exc:
        raise UserError(f"{root / INDEX} is unreadable ({exc}); {_fix(root, manifest)}") from None
    entries = manifest["shards"]
    if list(counts) != [e["count"] for e in entries] or len(labels) != sum(counts):
        raise UserError(f"{root / INDEX} does not match {MANIFEST}; {_fix(root, manifest)}")
    starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    split = np.repeat(np.array([e["split"] for e in entries]), counts)
    return ShardDirectory(root, manifest, labels, ids, split, starts)


def load_shard_splits(path: Path, data_cfg, seed: int = 0, task: str | None = "classification") -> Splits:
    """Train/val of a shard directory: its own val shards, else a seeded `data.val_fraction` holdout.
    `task` (what the loss needs) must be the manifest's; None takes the manifest's."""
    d = open_directory(path)
    stored = d.manifest.get("task", "classification")
    if task is not None and task != stored:
        fix = ("use train.loss = \"mse\" or \"l1\"" if stored == "regression" else
               f"re-shard with `hpctrain shard --input {d.manifest.get('source', 'SRC')} --out {path} --task regression "
               "--overwrite` (class labels become float targets)")
        raise UserError(f"{path} holds {stored} targets but the loss needs {task} ones; {fix}")
    train = np.flatnonzero(d.split == "train")
    val = np.flatnonzero(d.split == "val")
    if len(val) == 0:
        keep, held = holdout_positions(len(train), data_cfg.val_fraction, seed)
        train, val = train[keep], train[held]
    if stored == "regression":
        return Splits(d.view(train), d.view(val), num_classes=0, input_shape=tuple(d.manifest["sample_shape"]),
                      task="regression", target_shape=tuple(d.manifest["target_shape"]),
                      target_range=tuple(d.manifest["target_range"]))
    return Splits(d.view(train), d.view(val), num_classes=int(d.manifest["num_classes"]),
                  input_shape=tuple(d.manifest["sample_shape"]))


def verify(root: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Full check: every file's size and SHA-256, every shard's structure and its labels/ids vs the index."""
    d = open_directory(root)
    _check_file(d.root, d.manifest, d.manifest["index"], full=True)
    for i, entry in enumerate(tqdm(d.manifest["shards"], desc="verify", unit="shard", disable=not show_progress)):
        _check_file(d.root, d.manifest, entry, full=True)
        path = d.root / entry["file"]
        try:
            with _open_h5(path) as f:
                _check_structure(d.root, d.manifest, entry, f)
                span = slice(d.starts[i], d.starts[i] + entry["count"])
                labels_match = d.manifest.get("task") == "regression" or np.array_equal(f["y"][:], d.labels[span])
                if not (labels_match and np.array_equal(f["sample_id"][:], d.sample_ids[span])):
                    raise UserError(f"{path}: labels/sample ids differ from {INDEX}; {_fix(d.root, d.manifest)}")
        except OSError as exc:
            raise UserError(f"{path} cannot be read as HDF5 ({exc}); {_fix(d.root, d.manifest)}") from None
    return d.manifest


# -- command line ----------------------------------------------------------------------------

def shard(src: str, out: str | Path, shard_size: int = 10000, compression: str = "none", overwrite: bool = False,
          labels: str | None = None, num_samples: int = 10000, chunk_kib: int = CHUNK_KIB, rank: int = 0, size: int = 1,
          barrier: Callable[[], None] = lambda: None,
          allgather: Callable[[Any], list[Any]] = lambda obj: [obj], task: str | None = None) -> dict[str, Any] | None:
    """Write SRC as a shard directory; with rank/size and the two collectives, ranks share the work.
    Returns the manifest on rank 0."""
    out = Path(out)
    if compression not in COMPRESSIONS:
        raise UserError(f"--compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    if chunk_kib < 1:
        raise UserError(f"--chunk-kib {chunk_kib} must be at least 1")
    if task not in (None, "auto", "classification", "regression"):
        raise UserError(f"--task {task!r}: choose auto, classification or regression")
    # A file's y is class labels unless told otherwise (a fraction stays a one-line error);
    # built-in datasets bring their own task.
    file_task = {None: "classification", "auto": None}.get(task, task)
    with open_source(src, labels, num_samples, file_task) as sources:
        check_consistent_sources(sources, src)
        if rank == 0:
            prepare_out_dir(out, overwrite)
        barrier()
        mine = write_shards(sources, out, shard_size, compression, rank, size, chunk_kib)
        entries = [e for part in allgather(mine) for e in part]
        if rank == 0:
            return write_index_and_manifest(out, sources, entries, src, shard_size, compression)
    return None


def _cmd_write(args: argparse.Namespace) -> int:
    from hpctrain import comm

    if not args.input or not args.out:
        raise UserError("hpctrain shard needs --input SRC and --out DIR (or `hpctrain shard verify DIR`)")
    manifest = shard(args.input, args.out, args.shard_size, args.compression, args.overwrite, args.labels,
                     args.num_samples, args.chunk_kib, comm.rank(), comm.size(), comm.get().barrier,
                     lambda obj: comm.get().allgather_object(obj, name="hpctrain.shard.entries"), args.task)
    if manifest is not None:
        counts = ", ".join(f"{n} {split}" for split, n in manifest["counts"].items())
        print(f"wrote {len(manifest['shards'])} shards ({counts} samples) and {MANIFEST} to {args.out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    manifest = verify(args.dir)
    n = sum(e["count"] for e in manifest["shards"])
    print(f"ok: {args.dir}: {len(manifest['shards'])} shards, {n} samples, all checksums match")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="SRC: .npz (x, y[, x_val, y_val]), x.npy (+ y.npy), HDF5 with x/y, "
                                        "or a built-in dataset (mnist1d, digits)")
    parser.add_argument("--labels", help="labels .npy for an x .npy input (default: the y*.npy sibling)")
    parser.add_argument("--out", help="shard directory to create")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default="none")
    parser.add_argument("--num-samples", type=int, default=10000, help="mnist1d only: samples to generate")
    parser.add_argument("--chunk-kib", type=int, default=CHUNK_KIB,
                        help=f"uncompressed KiB per HDF5 chunk, the unit of reading (default {CHUNK_KIB}); "
                             "smaller suits random access to sets much larger than the read cache")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    parser.add_argument("--task", choices=["auto", "classification", "regression"], default=None,
                        help="what a file's y holds: class labels (int64, 1-D; the default, a fraction is an "
                             "error) or float targets of any shape (regression); auto decides by y (integer or "
                             "whole-number 1-D: class labels). Built-in datasets bring their own")
    parser.set_defaults(func=_cmd_write)
    sub = parser.add_subparsers(dest="action", metavar="[verify DIR]")
    check = sub.add_parser("verify", help="check every shard against the manifest (sizes, SHA-256, structure)")
    check.add_argument("dir", help="shard directory")
    check.set_defaults(func=_cmd_verify)
