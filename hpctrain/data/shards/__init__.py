"""HDF5 shard directories: written in parallel from any source, verified, and read lazily by training.

    layout.py     names, schema versions, chunking and compression choices
    sources.py    where samples come from (.npz, .npy pair, HDF5, built-in dataset)
    write.py      writing shards, index and manifest (`shard`), crash-safe
    read.py       opening a directory for training (cheap checks) and lazy, cached reads
    integrity.py  the full SHA-256 check (`hpctrain shard verify`)
The command line is hpctrain/commands/shard.py.

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
"""
from hpctrain.data.shards.integrity import verify
from hpctrain.data.shards.layout import (CHUNK_KIB, COMPRESSIONS, INDEX, MANIFEST, REGRESSION_SCHEMA_VERSION,
                                         SCHEMA_VERSION)
from hpctrain.data.shards.read import (ShardDirectory, ShardedDataset, load_shard_splits, manifest_hash,
                                       open_directory, read_manifest)
from hpctrain.data.shards.sources import SourceSplit, open_source
from hpctrain.data.shards.write import ensure_shards, prepare_out_dir, shard, shard_with_ranks, write_shards

__all__ = ["CHUNK_KIB", "COMPRESSIONS", "INDEX", "MANIFEST", "REGRESSION_SCHEMA_VERSION", "SCHEMA_VERSION",
           "ShardDirectory", "ShardedDataset", "SourceSplit", "load_shard_splits", "manifest_hash",
           "open_directory", "open_source", "prepare_out_dir", "read_manifest", "shard", "shard_with_ranks",
           "ensure_shards", "verify", "write_shards"]
