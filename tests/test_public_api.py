"""The public API for one's own loop, on one process: ShardDataset under DataLoader workers, the
batch sampler across a growth and a resume, AdaptiveBatch's decisions, the lazy public names."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hpctrain
from hpctrain import comm
from hpctrain.data import AdaptiveBatchSampler, ShardDataset, filtering, shards
from hpctrain.data.scoring import write_scores
from hpctrain.errors import UserError
from tests.helpers import REPO


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """Digits in 4 shards of 400 (1438 train samples, held out by `val_fraction`), with synthetic scores."""
    out = tmp_path_factory.mktemp("api") / "digits"
    shards.shard("digits", out, shard_size=400)
    train = ShardDataset(out)
    write_scores(out / "scores.h5", train.sample_ids, train.labels,
                 {"el2n": (np.sin(train.sample_ids * 0.37), {"model": "test"})})
    return out


# -- ShardDataset ----------------------------------------------------------------------------
def test_shard_dataset_reads_what_the_trainer_reads(digits_dir):
    from hpctrain.config import DataConfig
    from hpctrain.data import load_splits

    ds, val = ShardDataset(digits_dir), ShardDataset(digits_dir, "val")
    reference = load_splits(DataConfig(name=str(digits_dir))).train
    assert len(ds) == len(reference) == 1438 and len(val) == 1797 - 1438
    assert (ds.num_classes, ds.sample_shape) == (10, (64,))
    x, y = ds.get([5, 0, 1000])
    rx, ry = reference.get(np.array([5, 0, 1000]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), rx)
    np.testing.assert_array_equal(y.numpy(), ry)
    x1, y1 = ds[-438]
    np.testing.assert_array_equal(x1.numpy(), reference.get(np.array([1000]))[0][0])
    assert int(y1) == ry[2]
    with pytest.raises(IndexError, match="out of range"):
        ds[1438]
    with pytest.raises(UserError, match="split = 'test'"):
        ShardDataset(digits_dir, "test")


def test_dataloader_workers_open_their_own_files(digits_dir):
    ds = ShardDataset(digits_dir)
    ds[0]                            # the parent holds an open handle before the workers fork
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[order[i:i + 100] for i in range(0, len(ds), 100)],
                                         num_workers=2)
    xs, ys = zip(*loader)
    x, y = ds.get(order)
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    clone = pickle.loads(pickle.dumps(ds))       # what a spawned worker gets: no handle travels
    assert torch.equal(clone.get([3, 7])[0], ds.get([3, 7])[0])


def test_kept_view_is_the_trainers_kept_set(digits_dir):
    from hpctrain.config import DataConfig

    ds = ShardDataset(digits_dir)
    kept = ds.kept(keep_fraction=0.6, keep="easiest")
    expected = filtering.training_rows(ds, DataConfig(name=str(digits_dir), keep_fraction=0.6, keep="easiest"))
    np.testing.assert_array_equal(kept.rows, expected)
    assert torch.equal(kept.get([0, 1])[0], ds.get(expected[:2])[0])
    same = ShardDataset(digits_dir, keep_fraction=0.6, keep="easiest")
    np.testing.assert_array_equal(same.sample_ids, kept.sample_ids)
    threes = kept.view(np.flatnonzero(kept.labels == 3))
    nested = threes.kept(keep_fraction=0.5)           # a view of a view maps through both
    hardest = np.sort(threes.sample_ids[np.argsort(np.sin(threes.sample_ids * 0.37))[-len(nested):]])
    assert len(nested) == round(len(threes) / 2) and np.array_equal(np.sort(nested.sample_ids), hardest)
    with pytest.raises(UserError, match="keep_fraction = 1.5"):
        ds.kept(keep_fraction=1.5)


# -- AdaptiveBatchSampler ----------------------------------------------------------------------
def _run(samplers, batch, grow_after: int, steps: int | None = None, loaders=None):
    """Step all ranks' samplers together, doubling the global batch after step `grow_after`;
    returns every step's per-rank index lists."""
    iters = [iter(loader) for loader in loaders] if loaders else [iter(s) for s in samplers]
    taken = []
    while steps is None or len(taken) < steps:
        step = [next(it, None) for it in iters]
        if step[0] is None:
            assert all(s is None for s in step)
            break
        taken.append([b[1].tolist() if loaders else b for b in step])
        for s in samplers:
            s.record_batch()
        if len(taken) == grow_after:
            batch.global_batch *= 2
    return taken


def test_batch_sampler_sees_each_sample_once_across_a_growth_with_prefetching_workers():
    data = torch.utils.data.TensorDataset(torch.arange(1001), torch.arange(1001))
    batch = SimpleNamespace(global_batch=40)
    samplers = [AdaptiveBatchSampler(1001, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    loaders = [torch.utils.data.DataLoader(data, batch_sampler=s, num_workers=2, prefetch_factor=2) for s in samplers]
    for s in samplers:
        s.set_epoch(1)
    steps = _run(samplers, batch, grow_after=5, loaders=loaders)
    sizes = [len(a) + len(b) for a, b in steps]
    # the loader asked 2 workers × 2 batches ahead: those 4 keep the old size on both ranks alike
    assert sizes[:9] == [40] * 9 and sizes[9] == 80 and sum(sizes) == 1000
    seen = np.concatenate([np.r_[a, b] for a, b in steps])
    assert len(np.unique(seen)) == 1000 and len(samplers[0]) == 0


def test_batch_sampler_resumes_mid_epoch_with_the_batches_it_would_have_made():
    batch = SimpleNamespace(global_batch=32)
    cut = AdaptiveBatchSampler(500, batch, seed=1, rank=1, world_size=2)
    cut.set_epoch(2)
    it = iter(cut)
    made = [next(it) for _ in range(6)]       # a loader prefetching 2 ahead: 6 made, 4 consumed
    for i in range(4):
        cut.record_batch()
        if i == 2:
            batch.global_batch = 64           # grown after step 3: batches 5 and 6 were made at 32
    state = cut.state_dict()
    assert state == {"epoch": 2, "cursor": 4 * 32, "pending": [32, 32]}
    uninterrupted = made[4:] + list(it)
    resumed = AdaptiveBatchSampler(500, batch, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                      # the same epoch: the position is kept
    assert list(resumed) == uninterrupted
    assert [len(b) for b in uninterrupted] == [16, 16, 32, 32, 32, 32, 26]   # 500 - 6 × 32 - 4 × 64 = 52 left
    seen = np.concatenate(made[:4] + uninterrupted)
    assert len(seen) == len(np.unique(seen))
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "cursor": 0, "pending": []}


def test_batch_sampler_rejects_bad_input_in_one_line():
    with pytest.raises(UserError, match="global batch 30 must be a positive multiple of the world size 4"):
        AdaptiveBatchSampler(100, 30, rank=0, world_size=4)
    with pytest.raises(UserError, match="give a global batch size or an hpctrain.AdaptiveBatch"):
        AdaptiveBatchSampler(100, "64", rank=0, world_size=1)
    with pytest.raises(UserError, match="no batch was handed out"):
        AdaptiveBatchSampler(100, 10, rank=0, world_size=1).record_batch()


# -- AdaptiveBatch -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    comm.init()


def _model_and_optimizer(lr: float = 0.1):
    model = torch.nn.Linear(4, 2)
    opt = hpctrain.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                        named_parameters=model.named_parameters())
    return model, opt


def test_adaptive_batch_grows_on_schedule_and_drives_the_lr_and_accumulation(one_rank):
    model, opt = _model_and_optimizer()
    adaptive = hpctrain.AdaptiveBatch(16, 128, "schedule", optimizer=opt, at_steps=[2], at_epochs=[1],
                                      max_local=32, warmup_steps=2)
    assert (adaptive.global_batch, adaptive.local_batch, adaptive.accumulation, adaptive.lr) == (16, 16, 1, 0.1)
    decisions = []
    for _ in range(3):
        x = torch.randn(adaptive.global_batch, 4)
        for (xb,) in adaptive.micro_batches(x):
            model(xb).sum().backward()
        opt.step()
        opt.zero_grad()
        decisions.append(adaptive.step(loss=torch.tensor(1.0), samples=len(x)))
    assert decisions[0] is None and decisions[2] is None
    d = decisions[1]
    assert (d.step, d.old_batch, d.global_batch, d.local_batch, d.accumulation) == (2, 16, 32, 32, 1)
    assert d.lr == pytest.approx(0.2) and opt.param_groups[0]["lr"] == pytest.approx(0.2)   # ramp done at step 4
    d = adaptive.epoch_end(val_loss=0.5)
    assert (d.global_batch, d.local_batch, d.accumulation) == (64, 32, 2)
    assert len(adaptive.micro_batches(torch.zeros(64, 4))) == 2 and opt.backward_passes_per_step == 2
    restored = hpctrain.AdaptiveBatch(16, 128, "schedule", lr=0.1, at_steps=[2], at_epochs=[1], max_local=32,
                                      warmup_steps=2)
    restored.load_state_dict(adaptive.state_dict())
    assert (restored.global_batch, restored.accumulation, restored.steps, restored.lr) == (64, 2, 3, adaptive.lr)


def test_adaptive_batch_plateau_on_validation_loss_and_bad_input(one_rank):
    adaptive = hpctrain.AdaptiveBatch(8, 32, "plateau", lr=0.1, patience=1)
    assert [adaptive.epoch_end(v) is not None for v in (1.0, 1.1, 0.5, 0.6, 0.7)] == [False, True, False, True, False]
    assert adaptive.global_batch == 32
    with pytest.raises(UserError, match=r"AdaptiveBatch: unknown key 'patiense' \(did you mean 'patience'"):
        hpctrain.AdaptiveBatch(8, 32, "plateau", lr=0.1, patiense=1)
    with pytest.raises(UserError, match="AdaptiveBatch: policy = .plateau. grows the batch up to max, but max = 8"):
        hpctrain.AdaptiveBatch(8, 8, "plateau", lr=0.1)
    with pytest.raises(UserError, match="give lr="):
        hpctrain.AdaptiveBatch(8)
    with pytest.raises(UserError, match="'gns' .* needs at least 2 ranks"):
        hpctrain.AdaptiveBatch(8, 32, "gns", lr=0.1)


def test_public_names_are_lazy_and_exported():
    code = ("import sys, hpctrain, hpctrain.data; assert 'torch' not in sys.modules; "
            "assert {'AdaptiveBatch', 'StepLog'} <= set(hpctrain.__all__); "
            "assert 'ShardDataset' in hpctrain.data.__all__; hpctrain.StepLog; hpctrain.data.ShardDataset; "
            "hpctrain.data.AdaptiveBatchSampler; hpctrain.AdaptiveBatch; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr
