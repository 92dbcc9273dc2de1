"""Checkpoints: written atomically by rank 0, found and validated on resume.

A checkpoint is one `torch.save` file `<run_dir>/checkpoints/step-<N>.pt`: what identifies the
run (config, data fingerprint, world size, versions) and, under its key, the state of each `Part`
of the run — the model, optimizer, per-rank compression memories, sampler cursor, RNG states,
batch-size state, ... — each a torch `Stateful` (state_dict / load_state_dict). It is written
to a temp name, fsynced, then renamed, so a killed run never leaves a half-written file under a
real name; a full disk removes the temp file and says so in one line (`DiskFull`), leaving the
previous checkpoints as they were.

Resuming checks what it resumes: `config_differences` compares the checkpoint's config with the
new one (`MUST_MATCH` keys must be equal; the rest may change and are reported as changes), and
`load_latest` falls back to the previous intact checkpoint when the newest is truncated or corrupt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from hpctrain.atomic import replacing
from hpctrain.errors import UserError

if TYPE_CHECKING:       # the protocol only: importing torch.distributed.checkpoint costs each rank a second
    from torch.distributed.checkpoint.stateful import Stateful

SCHEMA_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass(frozen=True)
class Part:
    """One stateful part of a run, saved under its key in the checkpoint."""
    state: Stateful
    per_rank: bool = False    # each rank's own: saved as the list of every rank's, rank r loads item r
                              # (the last one beyond them, where the part allows another world size)
    optional: bool = False    # absent from checkpoints of older hpctrain versions: then kept as built


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Temp files an interrupted save left behind (only while this job holds the run's lock)."""
    directory = checkpoint_dir(run_dir)
    found = list(directory.glob(".step-*.pt.tmp*")) if directory.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def save(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write `state` atomically as step-<step>.pt and keep only the newest `keep` checkpoints."""
    path = checkpoint_dir(run_dir) / f"step-{step:09d}.pt"
    with replacing(path, fsync=True) as tmp, open(tmp, "wb") as f:   # Python's write: ENOSPC is an OSError
        torch.save(dict(state, schema_version=SCHEMA_VERSION, step=step), f)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (temp files of an interrupted write are ignored)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; pass an existing step-*.pt file or --resume=auto")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        raise UserError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(exc).__name__}); "
                        "--resume=latest or --resume=auto falls back to the previous intact checkpoint") from None
    if not isinstance(state, dict) or state.get("schema_version") != SCHEMA_VERSION:
        found = state.get("schema_version") if isinstance(state, dict) else None
        raise UserError(f"checkpoint {str(path)!r} has schema version {found}, expected {SCHEMA_VERSION}; "
                        "it was written by another hpctrain version")
    return state


def load_latest(run_dir: Path, say: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, falling back past truncated or corrupt ones (saying so);
    None when the run has no checkpoint; a UserError when none of them loads."""
    found = list_checkpoints(run_dir)
    errors: list[str] = []
    for path in reversed(found):
        try:
            state = load(path)
        except UserError as exc:
            errors.append(str(exc))
            continue
        for line in errors:
            say(f"hpctrain: {line.split('; ')[0]}; resuming from the previous intact checkpoint {path.name}")
        return path, state
    if found:
        raise UserError(f"none of the {len(found)} checkpoint(s) in {checkpoint_dir(run_dir)} loads "
                        f"({errors[0]}); start a new run with --overwrite")
    return None


# Keys a resumed run must share with its checkpoint (prefixes of flattened keys): they decide what
# the model is, what it trains on and how. Everything else may change and is reported.
MUST_MATCH = ("run.seed", "data.", "model.", "compression.", "batch.", "train.optimizer", "train.lr",
              "train.momentum", "train.weight_decay", "train.lr_schedule", "train.backward_passes_per_step",
              "train.fusion")


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and not full.startswith(("model.args", "compression.rules")):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """(keys that must match but differ, as 'key: old -> new'; keys that may change and did)."""
    a, b = _flatten(old or {}), _flatten(new)
    mismatched, changed = [], []
    for key in sorted(set(a) | set(b)):
        if key not in a:            # a key newer than the checkpoint: its default applies
            continue
        if a.get(key) == b.get(key):
            continue
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUST_MATCH):
            mismatched.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
        else:
            changed.append((key, a.get(key), b.get(key)))
    return mismatched, changed


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`--resume` value → checkpoint path: a path, 'latest' (must exist) or 'auto' (if any)."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        found = list_checkpoints(run_dir)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)}; start without --resume "
                        "or use --resume=auto")
    return Path(resume)
