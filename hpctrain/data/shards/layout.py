"""What a shard directory holds: file names, schema versions, chunking and compression choices.

Shared by the writer and the reader, so the two never disagree about the format.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1                 # classification shards (readable by every hpctrain)
REGRESSION_SCHEMA_VERSION = 2      # float targets: an hpctrain without regression refuses them
READABLE_SCHEMAS = (SCHEMA_VERSION, REGRESSION_SCHEMA_VERSION)
FORMAT = "hpctrain-shards"
MANIFEST = "manifest.json"
INDEX = "index.h5"
SPLITS = ("train", "val")
CHUNK_KIB = 64                     # default uncompressed KiB per chunk: small enough for random access
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "none": {}, "lzf": {"compression": "lzf"}, "gzip": {"compression": "gzip", "compression_opts": 4},
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
