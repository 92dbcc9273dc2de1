"""Checkpoints: written atomically (each rank its own parts, rank 0 the rest), validated on resume.

A checkpoint is one `torch.save` file `<run_dir>/checkpoints/step-<N>.pt`, written by rank 0:
what identifies the run (config, data fingerprint, world size, versions) and, under its key, the
state of each `Part` of the run — the model, optimizer, sampler cursor, RNG states, batch-size
state, ... — each a torch `Stateful` (state_dict / load_state_dict). The parts each rank holds
for itself (compression residuals: one model's worth per rank) are written by that rank, one
file per rank in `step-<N>.ranks/` (`save_rank_parts`), before rank 0 writes the checkpoint,
which records their sizes: no rank gathers or reads another's, at any world size (the run
directory is on a file system every rank sees, as on a cluster's parallel file system). Every
file is written to a temp name, fsynced, then renamed, so a killed run never leaves a half-written
file under a real name, and the checkpoint itself, written last, is what makes a step's files
count; a full disk removes the temp file and says so in one line (`DiskFull`), leaving the
previous checkpoints as they were.

Resuming checks what it resumes: `config_differences` compares the checkpoint's config with the
new one (`MUST_MATCH` keys must be equal; the rest may change and are reported as changes), and
`load_latest` falls back to the previous intact checkpoint when the newest is truncated or corrupt,
or misses a rank's file.
"""
from __future__ import annotations

import re
import shutil
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
    per_rank: bool = False    # each rank's own: saved in rank r's file, which rank r loads (the last
                              # rank's beyond them, where the part allows another world size)
    optional: bool = False    # absent from checkpoints of older hpctrain versions: then kept as built


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:09d}.pt"


def rank_parts_path(path: Path, rank: int) -> Path:
    """Rank `rank`'s file of checkpoint `path` (its per-rank parts)."""
    return path.with_name(f"{path.stem}.ranks") / f"rank-{rank:06d}.pt"


def remove_temp_files(run_dir: Path) -> list[Path]:
    """What an interrupted save left behind (only while this job holds the run's lock): temp files,
    and ranks' files of a step whose checkpoint was never written."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [*directory.glob(".step-*.pt.tmp*"), *directory.glob("step-*.ranks/.rank-*.pt.tmp*")]
    for p in found:
        p.unlink(missing_ok=True)
    for ranks in directory.glob("step-*.ranks"):
        if not ranks.with_name(ranks.name.removesuffix(".ranks") + ".pt").exists():
            shutil.rmtree(ranks, ignore_errors=True)
            found.append(ranks)
    return found


def save_rank_parts(parts: dict[str, Any], run_dir: Path, step: int, rank: int) -> int:
    """Every rank, before rank 0's `save` of the same step: write this rank's parts; their bytes."""
    path = rank_parts_path(checkpoint_path(run_dir, step), rank)
    with replacing(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(parts, f)
    return path.stat().st_size


def save(state: dict[str, Any], run_dir: Path, step: int, keep: int, rank_bytes: list[int] | None = None) -> Path:
    """Write `state` atomically as step-<step>.pt (after every rank's `save_rank_parts`, whose sizes
    `rank_bytes` it records) and keep only the newest `keep` checkpoints."""
    path = checkpoint_path(run_dir, step)
    ranks = {} if rank_bytes is None else {"rank_bytes": list(rank_bytes)}
    with replacing(path, fsync=True) as tmp, open(tmp, "wb") as f:   # Python's write: ENOSPC is an OSError
        torch.save(dict(state, schema_version=SCHEMA_VERSION, step=step, **ranks), f)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        shutil.rmtree(rank_parts_path(old, 0).parent, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (temp files of an interrupted write are ignored)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load(path: str | Path, map_location: str | torch.device = "cpu", ranks: bool = True) -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a one-line UserError, and so (with
    `ranks`) is a rank's file that is missing or not the size written."""
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
    for rank, nbytes in enumerate(state.get("rank_bytes", []) if ranks else []):
        part = rank_parts_path(path, rank)
        if not part.is_file() or part.stat().st_size != nbytes:
            raise UserError(f"checkpoint {str(path)!r} is incomplete: rank {rank}'s file {part.name} is "
                            f"{'missing' if not part.is_file() else 'truncated'}; --resume=latest or --resume=auto "
                            "falls back to the previous intact checkpoint")
    return state


def saved_ranks(state: dict[str, Any], name: str) -> int:
    """How many ranks saved per-rank part `name` of checkpoint `state`."""
    return len(state["rank_bytes"]) if "rank_bytes" in state else len(state[name])


def load_rank_parts(path: Path, state: dict[str, Any], rank: int, names: list[str]) -> dict[str, Any]:
    """Per-rank parts `names` for `rank` of the checkpoint `state` read from `path`: that rank's
    (the last saved rank's beyond them); from its own file, or, in a checkpoint of an older
    hpctrain, from the lists every rank's went into."""
    if "rank_bytes" not in state:
        return {name: state[name][min(rank, len(state[name]) - 1)] for name in names if name in state}
    file = rank_parts_path(Path(path), min(rank, len(state["rank_bytes"]) - 1))
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # as in `load`: a damaged file
        raise UserError(f"checkpoint file {str(file)!r} is truncated or corrupt ({type(exc).__name__}); resume "
                        f"from an earlier checkpoint (--resume PATH) or start a new run") from None


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
