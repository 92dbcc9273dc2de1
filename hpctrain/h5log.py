"""The per-step HDF5 log: rank 0 appends one row per optimizer step and flushes it.

Layout (schema version `SCHEMA_VERSION`):
  /                 attrs: schema_version, config (JSON), world_size, engine, hpctrain_version, started_at
  /steps/<column>   resizable 1-D datasets, one row per optimizer step (STEP_COLUMNS)
  /evals/<column>   one row per evaluation (EVAL_COLUMNS): val_loss (the run's loss), and the
                    metric of the task, the other one NaN: val_accuracy (classification) or
                    val_psnr (regression, dB). val_psnr is optional: logs written before it have
                    no such column (readers report only what exists), and a writer that leaves it
                    out of a row gets NaN (OPTIONAL_COLUMNS); so is the steps' codec_time_s (seconds
                    in compressor code per step).
  /events/<column>  one row per batch-size decision (EVENT_COLUMNS; `reason` is a string)
  /layers/<column>  per-parameter stats every N steps (LAYER_COLUMNS; `name` is a string)

Every group is a table of equal-length columns, so readers load any group the same way.
The file is written in HDF5's single-writer/multiple-reader (SWMR) mode and flushed after
every append, so a killed run keeps a readable file with every row written so far, and
`read_log` can follow a run while it trains. (SWMR forbids variable-length strings, hence
the fixed-width string columns.)

Damaged files never hang a reader: HDF5's SWMR reader retries unreadable metadata for a long
time (a truncated log made `--resume` and `hpctrain report` hang), so `read_log` first opens
the file without SWMR (which fails at once on a truncated file) and only a file still flagged
"open for write" (a live run, or one killed while writing) is read with SWMR, after a probe
in a child process that is killed after `PROBE_TIMEOUT_S`. A damaged log is `DamagedLog`, one
line; on resume the trainer sets it aside (`set_aside`, renamed) and starts a new one.
"""
from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from hpctrain.atomic import disk_full, is_disk_full, rename_aside, replacing
from hpctrain.errors import UserError

SCHEMA_VERSION = 1
# Seconds a child process may take to read a log flagged "open for write" before it counts as damaged.
PROBE_TIMEOUT_S = float(os.environ.get("HPCTRAIN_LOG_PROBE_TIMEOUT", "20"))

_STR = h5py.string_dtype("utf-8", 96)
_REASON = h5py.string_dtype("utf-8", 512)     # an event says why: a batch decision, or auto's choice per layer
STEP_COLUMNS: dict[str, Any] = {
    "step": np.int64, "epoch": np.int64, "loss": np.float64, "lr": np.float64,
    "global_batch": np.int64, "samples_seen": np.int64, "step_time_s": np.float64,
    "comm_time_s": np.float64, "wire_bytes": np.int64, "dense_bytes": np.int64, "codec_time_s": np.float64,
}
EVAL_COLUMNS: dict[str, Any] = {
    "step": np.int64, "epoch": np.int64, "val_loss": np.float64, "val_accuracy": np.float64,
    "wall_time_s": np.float64, "val_psnr": np.float64,
}
EVENT_COLUMNS: dict[str, Any] = {
    "step": np.int64, "old_batch": np.int64, "new_batch": np.int64, "old_lr": np.float64,
    "new_lr": np.float64, "reason": _REASON, "statistic": np.float64,
}
LAYER_COLUMNS: dict[str, Any] = {
    "step": np.int64, "name": _STR, "compressor": _STR, "wire_bytes": np.int64,
    "dense_bytes": np.int64, "ratio": np.float64,
}
GROUPS = {"steps": STEP_COLUMNS, "evals": EVAL_COLUMNS, "events": EVENT_COLUMNS, "layers": LAYER_COLUMNS}
# Columns a row may leave out (their value then), and the value old logs' rows get on resume.
OPTIONAL_COLUMNS: dict[str, dict[str, Any]] = {"evals": {"val_psnr": float("nan")},
                                               "steps": {"codec_time_s": float("nan")}}


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
        self.set_aside_to: Path | None = None     # where a damaged log went (resume)
        self.damage = ""
        previous = None
        if resume and self.path.exists():
            try:
                previous = read_log(self.path)
            except UserError as exc:
                self.damage = str(exc)
                self.set_aside_to = set_aside(self.path)
        with replacing(self.path) as tmp:
            self._write_initial(tmp, attrs, previous, resume_rows)
        self._file = h5py.File(self.path, "a", libver="latest")
        self._file.swmr_mode = True      # from here on only appends: readers may follow along

    @staticmethod
    def _write_initial(tmp: Path, attrs: Mapping[str, Any] | None, previous: dict[str, Any] | None,
                       resume_rows: Mapping[str, int] | None) -> None:
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
                n = min((len(v) for v in rows.values()), default=0)
                for column, dtype in columns.items():
                    default = OPTIONAL_COLUMNS.get(group, {}).get(column)
                    data = rows.get(column, np.full(n, default) if default is not None else np.empty(0))
                    if np.dtype(dtype).kind == "S":       # UTF-8, cut to the column (numpy would encode ASCII)
                        data = [_fit(v, np.dtype(dtype)).encode() if isinstance(v, str) else v for v in data]
                    g.create_dataset(column, data=np.asarray(data, dtype=dtype), maxshape=(None,),
                                     dtype=dtype, chunks=(1024,))

    def row_counts(self) -> dict[str, int]:
        """Rows per group so far; a checkpoint stores them so a resume can cut the log back."""
        return {group: self._file[group]["step"].shape[0] for group in GROUPS}

    def append(self, group: str, row: Mapping[str, Any]) -> None:
        """Append one row to `group`; every column of the group must be given, except OPTIONAL_COLUMNS
        (then NaN). Flushed at once."""
        missing = set(GROUPS[group]) - set(row) - set(OPTIONAL_COLUMNS.get(group, {}))
        if missing:
            raise ValueError(f"log row for {group!r} lacks {sorted(missing)}")
        self.append_many(group, [row])

    def append_many(self, group: str, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        optional = OPTIONAL_COLUMNS.get(group)
        if optional:
            rows = [{**optional, **r} for r in rows]
        try:
            g = self._file[group]
            for column in GROUPS[group]:
                ds = g[column]
                n = ds.shape[0]
                ds.resize((n + len(rows),))
                ds[n:] = [_fit(r[column], ds.dtype) for r in rows]
            self._file.flush()
        except Exception as exc:
            if is_disk_full(exc):
                raise disk_full(self.path) from None
            raise

    def close(self) -> None:
        try:
            if self._file.id.valid:
                self._file.close()
        except Exception:      # a full disk may fail the last flush: the rows flushed so far stay
            pass

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DamagedLog(UserError):
    """A log that cannot be read (truncated, corrupt, or not HDF5)."""


def _fit(value: Any, dtype: np.dtype) -> Any:
    """Strings longer than a fixed-width column are cut (at a character boundary)."""
    if isinstance(value, str) and dtype.kind in ("S", "O"):
        width = dtype.itemsize if dtype.kind == "S" else _STR.itemsize
        return value.encode()[:width].decode("utf-8", "ignore")
    return value


def _damaged(path: Path, why: str) -> DamagedLog:
    return DamagedLog(f"log {str(path)!r} is damaged ({why}); `hpctrain train --resume` sets it aside "
                      f"(renamed, not deleted) and continues in a new log")


def _probe(path: Path, timeout: float) -> str | None:
    """Read the log with SWMR in a child process: None if it reads, else why not (a hang is killed)."""
    code = ("import sys; from hpctrain.h5log import _read; _read(sys.argv[1])")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"reading it did not finish within {timeout:g} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else f"reader exit {proc.returncode}")[:200]


def check_log(path: str | Path, timeout: float | None = None) -> None:
    """Raise DamagedLog (one line) when the log cannot be read; never hangs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"log {str(path)!r} not found; pass the log.h5 written by `hpctrain train`")
    try:
        with h5py.File(path, "r", libver="latest"):
            return
    except OSError as exc:
        text = str(exc)
        if "file signature not found" in text:
            raise DamagedLog(f"log {str(path)!r} cannot be read as HDF5 ({text}); is it a hpctrain log?") from None
        if "already open for write" not in text:
            raise _damaged(path, text.replace("Unable to synchronously open file ", "").strip("()")[:200]) from None
    why = _probe(path, PROBE_TIMEOUT_S if timeout is None else timeout)
    if why is not None:
        raise _damaged(path, why)


def set_aside(path: Path) -> Path:
    """Rename a damaged log to `<stem>.damaged-<UTC time>.h5` next to it (never deleted)."""
    return rename_aside(path, "damaged")


def read_log(path: str | Path) -> dict[str, Any]:
    """Load a log (also one still being written) into {"attrs": {...}, group: {column: array}}."""
    check_log(path)
    try:
        return _read(path)
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise _damaged(Path(path), f"{type(exc).__name__}: {exc}"[:200]) from None


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
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
