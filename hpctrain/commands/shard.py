"""`hpctrain shard`: write a shard directory from a source, or `hpctrain shard verify DIR`.

Options and printing only; the work is `hpctrain.data.shards.shard` and `.verify`.
"""
from __future__ import annotations

import argparse

from hpctrain.data.shards import CHUNK_KIB, COMPRESSIONS, MANIFEST, shard_with_ranks, verify
from hpctrain.errors import UserError


def run_write(args: argparse.Namespace) -> int:
    if not args.input or not args.out:
        raise UserError("hpctrain shard needs --input SRC and --out DIR (or `hpctrain shard verify DIR`)")
    manifest = shard_with_ranks(args.input, args.out, shard_size=args.shard_size, compression=args.compression,
                                overwrite=args.overwrite, labels=args.labels, num_samples=args.num_samples,
                                chunk_kib=args.chunk_kib, task=args.task)
    if manifest is not None:
        counts = ", ".join(f"{n} {split}" for split, n in manifest["counts"].items())
        print(f"wrote {len(manifest['shards'])} shards ({counts} samples) and {MANIFEST} to {args.out}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
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
    parser.set_defaults(func=run_write)
    sub = parser.add_subparsers(dest="action", metavar="[verify DIR]")
    check = sub.add_parser("verify", help="check every shard against the manifest (sizes, SHA-256, structure)")
    check.add_argument("dir", help="shard directory")
    check.set_defaults(func=run_verify)
