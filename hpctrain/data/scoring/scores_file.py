"""scores.h5: per-sample scores by method, with provenance, merged across `hpctrain score` runs.

Layout (schema `SCHEMA_VERSION`), rows in ascending sample_id order:
  /sample_id int64 [N], /label int64 [N]
  /scores/<method> float64 [N]  attrs: method, model, step, date, data, manifest_sha256, ...
                                (short runs: short_run_epochs, seeds averaged over)
  /embedding float32 [N, D]     (when a method computed one; the first run's)  attrs: model
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpctrain.atomic import replacing
from hpctrain.errors import UserError

SCHEMA_VERSION = 1


@dataclass
class ScoresFile:
    """A scores.h5 in memory; `method` names what to run when a method is missing."""
    path: Path
    sample_ids: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    attrs: dict[str, dict[str, Any]]
    embedding: np.ndarray | None
    embedding_attrs: dict[str, Any]

    def method(self, name: str) -> np.ndarray:
        if name not in self.scores:
            have = ", ".join(self.scores) or "none"
            raise UserError(f"{self.path} has no {name!r} scores (it has: {have}); compute them with "
                            f"`hpctrain score --data DIR --method {name}`")
        return self.scores[name]


def read_scores(path: str | Path) -> ScoresFile:
    """The whole file, or one line saying how to (re)compute it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scores file {path} not found; compute it with `hpctrain score --data DIR --method M`")
    try:
        with h5py.File(path, "r") as f:
            group = f.get("scores", {})
            emb = f.get("embedding")
            return ScoresFile(path, f["sample_id"][:], f["label"][:], {k: group[k][:] for k in group},
                              {k: dict(group[k].attrs) for k in group},
                              None if emb is None else emb[:], {} if emb is None else dict(emb.attrs))
    except (OSError, KeyError) as exc:
        raise UserError(f"{path} is not a readable scores file ({exc}); delete it and run `hpctrain score` again") from None


def write_scores(path: Path, sample_ids: np.ndarray, labels: np.ndarray,
                 results: dict[str, tuple[np.ndarray, dict[str, Any]]], embedding: np.ndarray | None = None,
                 embedding_attrs: dict[str, Any] | None = None) -> None:
    """Add/replace methods' (scores, provenance attrs), keeping other methods' if they cover the same samples."""
    order = np.argsort(sample_ids, kind="stable")
    ids = sample_ids[order]
    old = read_scores(path) if path.exists() else None
    if old is not None and not np.array_equal(old.sample_ids, ids):
        print(f"note: {path} held scores of other samples ({', '.join(old.scores)}); they are replaced")
        old = None
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.create_dataset("sample_id", data=ids)
        f.create_dataset("label", data=labels[order])
        group = f.create_group("scores")
        for name, values in (old.scores.items() if old is not None else ()):
            if name not in results:
                group.create_dataset(name, data=values).attrs.update(old.attrs[name])
        for name, (values, attrs) in results.items():
            group.create_dataset(name, data=values[order]).attrs.update(attrs)
        if embedding is not None:
            f.create_dataset("embedding", data=embedding[order]).attrs.update(embedding_attrs or {})
        elif old is not None and old.embedding is not None:
            f.create_dataset("embedding", data=old.embedding).attrs.update(old.embedding_attrs)
