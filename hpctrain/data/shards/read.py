"""Opening a shard directory for training: the manifest and index are read and every shard's size
checked at open (cheap); samples are then read lazily, chunk by chunk, through a bounded cache.
`hpctrain shard verify` (`integrity.py`) does the full, SHA-256 check.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpctrain.config import DataConfig
from hpctrain.data import Splits, holdout_positions
from hpctrain.data.shards.layout import FORMAT, INDEX, MANIFEST, READABLE_SCHEMAS, sha256_file
from hpctrain.errors import UserError

MAX_OPEN_FILES = 16                # shard handles kept open per process
CACHE_BYTES = 64 * 1024 * 1024     # decoded chunks kept per dataset per process


def fix_hint(root: Path, manifest: dict[str, Any] | None = None) -> str:
    """The remedy every damaged-directory error ends with."""
    source = (manifest or {}).get("source", "SRC")
    return f"re-create it with `hpctrain shard --input {source} --out {root} --overwrite`"


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, or one line saying why this is not a complete shard directory."""
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing: {root} is not a shard directory or its write did not finish; {fix_hint(root)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {fix_hint(root)}") from None
    if manifest.get("format") != FORMAT or manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise UserError(f"{path}: format/schema {manifest.get('format')}/{manifest.get('schema_version')} is not "
                        f"{FORMAT}/{' or '.join(map(str, READABLE_SCHEMAS))}; {fix_hint(root, manifest)}")
    return manifest


def manifest_hash(root: Path) -> str:
    """SHA-256 of the manifest: names this exact set of shards (scores record it as provenance)."""
    return sha256_file(root / MANIFEST)


def check_file(root: Path, manifest: dict[str, Any], entry: dict[str, Any], full: bool) -> None:
    """A listed file exists with its recorded size (cheap), and with `full` its SHA-256."""
    path = root / entry["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing (listed in {MANIFEST}); restore it or {fix_hint(root, manifest)}")
    actual = path.stat().st_size
    if actual != entry["bytes"]:
        raise UserError(f"{path} has {actual} bytes but {MANIFEST} says {entry['bytes']}: truncated or replaced; "
                        f"{fix_hint(root, manifest)}")
    if full and sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path}: SHA-256 checksum mismatch with {MANIFEST} (the file is corrupt); {fix_hint(root, manifest)}")


def open_h5(path: Path) -> h5py.File:
    # locking=None leaves HDF5_USE_FILE_LOCKING (e.g. FALSE on Lustre/GPFS) in charge.
    return h5py.File(path, "r")


def check_structure(root: Path, manifest: dict[str, Any], entry: dict[str, Any], f: h5py.File) -> None:
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
        raise UserError(f"{root / entry['file']}: does not match {MANIFEST} ({'; '.join(problems)}); {fix_hint(root, manifest)}")


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
        self._cache: OrderedDict[tuple[int, int, str], np.ndarray] = OrderedDict()
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
            check_file(self.root, self.manifest, entry, full=False)
            try:
                f = open_h5(path)
            except OSError as exc:
                raise UserError(f"{path} cannot be opened as HDF5 ({exc}); {fix_hint(self.root, self.manifest)}") from None
            if shard not in self._checked:
                check_structure(self.root, self.manifest, entry, f)
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
                            f"run `hpctrain shard verify {self.root}`, then {fix_hint(self.root, self.manifest)}") from None
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
    check_file(root, manifest, manifest["index"], full=True)
    for entry in manifest["shards"]:
        check_file(root, manifest, entry, full=False)
    try:
        with open_h5(root / INDEX) as f:
            labels, ids, counts = f["y"][:], f["sample_id"][:], f["shard_count"][:]
    except (OSError, KeyError) as exc:
        raise UserError(f"{root / INDEX} is unreadable ({exc}); {fix_hint(root, manifest)}") from None
    entries = manifest["shards"]
    if list(counts) != [e["count"] for e in entries] or len(labels) != sum(counts):
        raise UserError(f"{root / INDEX} does not match {MANIFEST}; {fix_hint(root, manifest)}")
    starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    split = np.repeat(np.array([e["split"] for e in entries]), counts)
    return ShardDirectory(root, manifest, labels, ids, split, starts)


def load_shard_splits(path: Path, data_cfg: DataConfig, seed: int = 0, task: str | None = "classification") -> Splits:
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
