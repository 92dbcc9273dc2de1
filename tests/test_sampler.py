"""The global-batch sampler: exactly-once coverage per epoch, also across batch changes and resume."""
from __future__ import annotations

import numpy as np

from hpctrain.data.sampler import GlobalBatchSampler


def _epoch(world: int, batches: list[int], n: int = 103, epoch: int = 0, state=None):
    samplers = [GlobalBatchSampler(np.arange(n), seed=7, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        if state:
            s.load_state_dict(state)
        s.set_epoch(epoch)
    seen, sizes = [], iter(batches)
    while not samplers[0].exhausted():
        size = next(sizes, batches[-1])
        parts = [s.next_batch(size) for s in samplers]
        assert len({len(p) for p in parts}) == 1          # equal local batches on every rank
        seen.extend(np.concatenate(parts).tolist())
    return seen, samplers[0]


def test_every_sample_once_per_epoch_even_when_the_batch_grows():
    seen, _ = _epoch(4, [8, 8, 16, 32, 64])
    assert len(seen) == len(set(seen))
    assert len(seen) >= 103 - 3                              # at most world_size - 1 left out


def test_epochs_are_different_permutations_and_reproducible():
    a, _ = _epoch(2, [10], epoch=0)
    b, _ = _epoch(2, [10], epoch=1)
    c, _ = _epoch(2, [10], epoch=1)
    assert a != b and b == c


def test_resume_mid_epoch_continues_the_same_order():
    full, _ = _epoch(2, [10])
    s = GlobalBatchSampler(np.arange(103), seed=7, rank=0, world_size=2)
    s.next_batch(10), s.next_batch(10)
    head = full[:20]
    rest, _ = _epoch(2, [10], state=s.state_dict())
    assert head + rest == full
