"""The full check of a shard directory (`hpctrain shard verify`): what opening for training
skips because it reads every byte."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hpctrain.data.shards.layout import INDEX
from hpctrain.data.shards.read import check_file, check_structure, fix_hint, open_directory, open_h5
from hpctrain.errors import UserError


def verify(root: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Full check: every file's size and SHA-256, every shard's structure and its labels/ids vs the index."""
    d = open_directory(root)
    check_file(d.root, d.manifest, d.manifest["index"], full=True)
    for i, entry in enumerate(tqdm(d.manifest["shards"], desc="verify", unit="shard", disable=not show_progress)):
        check_file(d.root, d.manifest, entry, full=True)
        path = d.root / entry["file"]
        try:
            with open_h5(path) as f:
                check_structure(d.root, d.manifest, entry, f)
                span = slice(d.starts[i], d.starts[i] + entry["count"])
                labels_match = d.manifest.get("task") == "regression" or np.array_equal(f["y"][:], d.labels[span])
                if not (labels_match and np.array_equal(f["sample_id"][:], d.sample_ids[span])):
                    raise UserError(f"{path}: labels/sample ids differ from {INDEX}; {fix_hint(d.root, d.manifest)}")
        except OSError as exc:
            raise UserError(f"{path} cannot be read as HDF5 ({exc}); {fix_hint(d.root, d.manifest)}") from None
    return d.manifest
