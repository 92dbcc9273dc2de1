"""Checkpoints: written atomically by rank 0, found and validated on resume.

A checkpoint is one `torch.save` file `<run_dir>/checkpoints/step-<N>.pt` holding the model,
optimizer, per-rank compression memories, sampler position, RNG states, batch-size state and a
schema version. It is written to a temp name, fsynced, then renamed, so a killed run never
leaves a half-written file under a real name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from hpctrain.errors import UserError

SCHEMA_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write `state` atomically as step-<step>.pt and keep only the newest `keep` checkpoints."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:09d}.pt"
    tmp = directory / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(dict(state, schema_version=SCHEMA_VERSION, step=step), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
                        "delete it to resume from the previous checkpoint") from None
    if not isinstance(state, dict) or state.get("schema_version") != SCHEMA_VERSION:
        found = state.get("schema_version") if isinstance(state, dict) else None
        raise UserError(f"checkpoint {str(path)!r} has schema version {found}, expected {SCHEMA_VERSION}; "
                        "it was written by another hpctrain version")
    return state


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
