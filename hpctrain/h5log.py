"""The per-step HDF5 log: rank 0 appends one row per optimizer step and flushes it.

Layout (schema version `SCHEMA_VERSION`):
  /                 attrs: schema_version, config (JSON), world_size, hpctrain_version, started_at
  /steps/<column>   resizable 1-D datasets, one row per optimizer step (STEP_COLUMNS)
  /evals/<column>   one row per evaluation (EVAL_COLUMNS)
  /events/<column>  one row per batch-size decision (EVENT_COLUMNS; `reason` is a string)
  /layers/<column>  per-parameter stats every N steps (LAYER_COLUMNS; `name` is a string)

Every group is a table of equal-length columns, so readers load any group the same way.
The file is written in HDF5's single-writer/multiple-reader (SWMR) mode and flushed after
every append, so a killed run keeps a readable file with every row written so far, and
`read_log` can follow a run while it trains. (SWMR forbids variable-length strings, hence
the fixed-width string columns.)
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from hpctrain.errors import UserError

SCHEMA_VERSION = 1

_STR = h5py.string_dtype("utf-8", 96)
STEP_COLUMNS: dict[str, Any] = {
    "step": np.int64, "epoch": np.int64, "loss": np.float64, "lr": np.float64,
    "global_batch": np.int64, "samples_seen": np.int64, "step_time_s": np.float64,
    "comm_time_s": np.float64, "wire_bytes": np.int64, "dense_bytes": np.int64,
}
EVAL_COLUMNS: dict[str, Any] = {
    "step": np.int64, "epoch": np.int64, "val_loss": np.float64, "val_accuracy": np.float64,
    "wall_time_s": np.float64,
}
EVENT_COLUMNS: dict[str, Any] = {
    "step": np.int64, "old_batch": np.int64, "new_batch": np.int64, "old_lr": np.float64,
    "new_lr": np.float64, "reason": _STR, "statistic": np.float64,
}
LAYER_COLUMNS: dict[str, Any] = {
    "step": np.int64, "name": _STR, "compressor": _STR, "wire_bytes": np.int64,
    "dense_bytes": np.int64, "ratio": np.float64,
}
GROUPS = {"steps": STEP_COLUMNS, "evals": EVAL_COLUMNS, "events": EVENT_COLUMNS, "layers": LAYER_COLUMNS}


class StepLog:
    """Append-only writer. `resume=True` continues an existing log after `--resume`.

    Resuming rewrites the log (temp file + rename) keeping, per group, only the rows that
    existed when the checkpoint was taken (`resume_rows`, from `row_counts()`): rows a crashed
    run wrote after its last checkpoint would otherwise be logged twice, and a killed SWMR
    writer leaves a consistency flag that only a fresh file clears.
    """

    def __init__(self, path: str | Path, attrs: Mapping[str, Any] | None = None, resume: bool = False,
                 resume_rows: Mapping[str, int] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = read_log(self.path) if resume and self.path.exists() else None
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["started_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
            for key, value in {**(previous or {}).get("attrs", {}), **(attrs or {})}.items():
                f.attrs[key] = value
            for group, columns in GROUPS.items():
                rows = previous.get(group, {}) if previous else {}
                if resume_rows is not None:
                    rows = {column: values[:resume_rows.get(group, 0)] for column, values in rows.items()}
                g = f.create_group(group)
                for column, dtype in columns.items():
                    data = rows.get(column, np.empty(0))
                    g.create_dataset(column, data=np.asarray(data, dtype=dtype), maxshape=(None,),
                                     dtype=dtype, chunks=(1024,))
        os.replace(tmp, self.path)
        self._file = h5py.File(self.path, "a", libver="latest")
        self._file.swmr_mode = True      # from here on only appends: readers may follow along

    def row_counts(self) -> dict[str, int]:
        """Rows per group so far; a checkpoint stores them so a resume can cut the log back."""
        return {group: self._file[group]["step"].shape[0] for group in GROUPS}

    def append(self, group: str, row: Mapping[str, Any]) -> None:
        """Append one row to `group`; every column of the group must be given. Flushed at once."""
        g = self._file[group]
        missing = set(GROUPS[group]) - set(row)
        if missing:
            raise ValueError(f"log row for {group!r} lacks {sorted(missing)}")
        for column in GROUPS[group]:
            ds = g[column]
            n = ds.shape[0]
            ds.resize((n + 1,))
            ds[n] = row[column]
        self._file.flush()

    def append_many(self, group: str, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        g = self._file[group]
        for column in GROUPS[group]:
            ds = g[column]
            n = ds.shape[0]
            ds.resize((n + len(rows),))
            ds[n:] = [r[column] for r in rows]
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_log(path: str | Path) -> dict[str, Any]:
    """Load a log (also one still being written) into {"attrs": {...}, group: {column: array}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"log {str(path)!r} not found; pass the log.h5 written by `hpctrain train`")
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise UserError(f"log {str(path)!r} cannot be read as HDF5 ({exc}); is it a hpctrain log?") from None
    with f:
        version = int(f.attrs.get("schema_version", 0))
        if version != SCHEMA_VERSION:
            raise UserError(f"log {str(path)!r} has schema version {version}, this hpctrain reads "
                            f"version {SCHEMA_VERSION}; use the hpctrain version that wrote it")
        out: dict[str, Any] = {"attrs": {k: _plain(v) for k, v in f.attrs.items()}}
        for group in f:
            columns = {c: f[group][c][:] for c in f[group]}
            n = min((len(v) for v in columns.values()), default=0)  # a writer may be mid-append
            out[group] = {c: _decode(v[:n]) for c, v in columns.items()}
        return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _decode(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else v for v in array], dtype=object)
    return array
