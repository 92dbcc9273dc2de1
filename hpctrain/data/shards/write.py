"""Writing a shard directory from a source, in parallel: rank r writes shards r, r+size, ...,
then rank 0 writes index.h5 and, LAST, manifest.json (the commit point).

Every file is written under a temporary name and renamed (`hpctrain.atomic`), so a crash never
leaves a file that looks complete, and a directory without a manifest is an unfinished write.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
from tqdm import tqdm

from hpctrain import comm
from hpctrain.atomic import replacing, write_atomic
from hpctrain.data.shards.layout import (CHUNK_KIB, COMPRESSIONS, FORMAT, INDEX, MANIFEST, REGRESSION_SCHEMA_VERSION,
                                         SCHEMA_VERSION, sha256_file, shard_name)
from hpctrain.data.shards.sources import SourceSplit, check_consistent_sources, first_task, open_source
from hpctrain.errors import UserError


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
        "format": FORMAT, "schema_version": REGRESSION_SCHEMA_VERSION if regression else SCHEMA_VERSION,
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


def shard_with_ranks(src: str, out: str | Path, **options: Any) -> dict[str, Any] | None:
    """`shard`, the work shared by every rank of the running job (after `hpctrain.init()`); the
    manifest on rank 0."""
    c = comm.get()
    return shard(src, out, rank=c.rank, size=c.size, barrier=c.barrier,
                 allgather=lambda obj: c.allgather_object(obj, name="hpctrain.shard.entries"), **options)


def ensure_shards(src: str, out: str | Path, **options: Any) -> Path:
    """`out` as a finished shard directory: written from `src` by every rank together unless it
    already holds one (its manifest); every rank returns once it is there. For scripts that start
    from raw data at every launch."""
    out = Path(out)
    if not comm.get().broadcast_object((out / MANIFEST).exists(), name="hpctrain.shard.exists"):
        shard_with_ranks(src, out, **options)
    comm.get().barrier()
    return out
