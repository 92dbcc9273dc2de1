"""A run's checkpoint parts (`Trainer._register_parts`) on one process: each is a torch `Stateful`,
each resumes to exactly the state saved (the auto choice included), and the compression state
says when it cannot be loaded at another world size. Real multi-rank resumes: tests/test_train.py."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from hpctrain import checkpoint, comm
from hpctrain.config import load_config
from hpctrain.optimizer.distributed import CompressionState
from hpctrain.train import Trainer
from tests.helpers import REPO

DIGITS = REPO / "configs" / "digits.toml"


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    comm.init()


def _trainer(tmp_path, *sets: str) -> Trainer:
    return Trainer(load_config(DIGITS, [f"run.out_dir={tmp_path}", "compression.name=auto", "compression.link=1gbit",
                                        "compression.min_numel=256", "train.progress=false", *sets]))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)          # NaN == NaN


def test_every_part_is_a_stateful_and_resumes_to_the_state_saved(tmp_path) -> None:
    first = _trainer(tmp_path, "train.max_steps=5", "checkpoint.every_steps=5")
    assert list(first.parts) == ["model", "optimizer", "auto", "compression", "sampler", "batch", "progress", "rng",
                                 "divergence"]        # auto first: it sets the compressors compression fills
    assert all(isinstance(part.state, Stateful) for part in first.parts.values())
    assert [name for name, part in first.parts.items() if part.per_rank] == ["compression"]
    first.fit()
    first.optimizer.remove_hooks()
    assert first.auto.choice is not None                               # decided after step 3
    path, saved = checkpoint.load_latest(tmp_path / "digits")
    assert path.name == f"step-{5:09d}.pt" and saved["world_size"] == 1
    resumed = _trainer(tmp_path, "train.max_steps=5")
    resumed._resume(path, saved)
    resumed.optimizer.remove_hooks()
    own = checkpoint.load_rank_parts(path, saved, 0, ["compression"])
    assert "compression" not in saved and saved["rank_bytes"] == [checkpoint.rank_parts_path(path, 0).stat().st_size]
    for name, part in resumed.parts.items():
        assert _same(part.state.state_dict(), own[name] if part.per_rank else saved[name]), name
    assert resumed.optimizer.compressor_names == first.optimizer.compressor_names
    assert not resumed.auto.due(6, resumed.progress.global_batch)      # no new decision after the resume


def test_a_checkpoint_with_every_ranks_parts_inline_still_resumes(tmp_path) -> None:
    """Checkpoints of older hpctrain hold the per-rank parts as lists: rank r takes item r (the last
    one beyond them)."""
    state = {"compression": [{"w": 0}, {"w": 1}]}
    assert checkpoint.load_rank_parts(tmp_path / "step-1.pt", state, 1, ["compression"]) == {"compression": {"w": 1}}
    assert checkpoint.load_rank_parts(tmp_path / "step-1.pt", state, 5, ["compression"]) == {"compression": {"w": 1}}
    assert checkpoint.saved_ranks(state, "compression") == 2


def test_compression_state_loads_at_another_world_size_only_without_residuals() -> None:
    empty = {"fc.weight": {"residual": None, "steps": 3, "memory": {"q": torch.ones(2)}}}
    held = {"fc.weight": {"residual": torch.zeros(4), "steps": 3, "memory": None}}
    assert CompressionState.resumable_at(2, held, 2) is None
    assert CompressionState.resumable_at(2, empty, 4) is None
    assert CompressionState.resumable_at(2, held, 4) == ("the checkpoint holds per-rank residual memories; "
                                                         "resume with -np 2")
