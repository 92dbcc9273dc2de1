"""Batch growth under real mpirun: one decision applied by every rank at the same step, each
sample exactly once per epoch across mid-epoch growth, and resume mid-growth = no interruption."""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from hpctrain import checkpoint
from hpctrain.h5log import read_log
from hpctrain.local_launch import ENGINES, run_mpi
from tests.helpers import REPO

pytestmark = pytest.mark.mpi

RANKS = 2
PROBE = [sys.executable, str(REPO / "tests" / "batch_probe.py")]
SETTINGS = ['data.name="digits"', 'model.name="mlp"', "model.args={width=32}", "train.epochs=2",
            'train.optimizer="sgd"', "train.lr=0.05", "train.progress=false", "batch.initial=16",
            "batch.max=128", "batch.max_local=16", 'batch.policy="gns"', "batch.decide_every=5",
            "batch.warmup_steps=4", "checkpoint.every_steps=7", "checkpoint.keep=0"]


def _train(tmp_path, name: str, engine: str, resume: str | None = None) -> list[list[dict]]:
    out = tmp_path / f"{name}.json"
    args = [out] + [a for s in SETTINGS + [f'run.out_dir="{tmp_path}"', f'run.name="{name}"'] for a in ("--set", s)]
    run_mpi(RANKS, args + ([f"--resume={resume}"] if resume else []), program=PROBE, timeout=120, engine=engine)
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=ENGINES)
def uninterrupted(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("batch")
    return tmp_path, request.param, _train(tmp_path, "full", request.param)


def test_every_rank_applies_rank0_decisions_at_the_same_step(uninterrupted):
    tmp_path, _, ranks = uninterrupted
    per_rank = [[(r["step"], r["batch"], r["accumulation"], r["lr"]) for r in records] for records in ranks]
    assert all(steps == per_rank[0] for steps in per_rank[1:])
    events = read_log(tmp_path / "full" / "log.h5")["events"]
    assert len(events["step"]) >= 2, "the gns policy should grow the batch at least twice from 16"
    assert list(events["new_batch"][:-1]) == list(events["old_batch"][1:])
    batch_of_step = {step: batch for step, batch, _, _ in per_rank[0]}
    for step, old, new in zip(events["step"], events["old_batch"], events["new_batch"]):
        assert (batch_of_step[step], batch_of_step.get(step + 1, new)) == (old, new)   # applied from the next step
    # Above max_local = 16 per rank the rest comes from accumulation; the LR ramps, never jumps.
    assert {(b, a) for _, b, a, _ in per_rank[0] if b == 64} <= {(64, 2)}
    lrs = [lr for _, _, _, lr in per_rank[0]]
    assert max(np.diff(lrs)) <= 0.05 * (128 / 16 - 64 / 16) / 4 + 1e-12


def test_each_sample_once_per_epoch_across_mid_epoch_growth(uninterrupted):
    tmp_path, _, ranks = uninterrupted
    events = read_log(tmp_path / "full" / "log.h5")["events"]
    epoch_end_steps = {max(r["step"] for r in ranks[0] if r["epoch"] == e) for e in {r["epoch"] for r in ranks[0]}}
    assert set(events["step"]) - epoch_end_steps, "no growth fell inside an epoch"
    n_train = 1438                                          # digits: 80% of 1797
    for epoch in sorted({r["epoch"] for r in ranks[0]}):
        counts = Counter(p for records in ranks for r in records if r["epoch"] == epoch for p in r["positions"])
        assert max(counts.values()) == 1
        assert n_train - RANKS < len(counts) <= n_train      # only the < world_size remainder may sit out


def test_resume_inside_a_grown_batch_phase_equals_the_uninterrupted_run(uninterrupted):
    tmp_path, engine, full = uninterrupted
    log = read_log(tmp_path / "full" / "log.h5")
    first_growth = int(log["events"]["step"][0])
    epoch_ends = set(log["evals"]["step"])
    saved = checkpoint.list_checkpoints(tmp_path / "full")
    middle = next(p for p in saved if (s := torch.load(p, weights_only=False)["step"]) > first_growth + 1
                  and s not in epoch_ends and s not in set(log["events"]["step"]))
    resumed_at = torch.load(middle, weights_only=False)["step"]
    resumed = _train(tmp_path, "resumed", engine, resume=str(middle))
    for before, after in zip(full, resumed):
        assert after == [r for r in before if r["step"] > resumed_at]
    final_full = torch.load(checkpoint.list_checkpoints(tmp_path / "full")[-1], weights_only=False)
    final_resumed = torch.load(checkpoint.list_checkpoints(tmp_path / "resumed")[-1], weights_only=False)
    assert final_resumed["step"] == final_full["step"]
    for name, tensor in final_full["model"].items():
        assert torch.equal(final_resumed["model"][name], tensor), name
    assert final_resumed["batch"] == final_full["batch"]
