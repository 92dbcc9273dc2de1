"""Importance filtering and dynamic pruning: pure selection maths, score matching, and real multi-rank runs."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hpctrain.config import DataConfig
from hpctrain.data import filtering, load_splits, scoring, shards
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.local_launch import run_mpi


def random_problem(n: int = 503, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), rng.normal(size=n)


@pytest.mark.parametrize("keep", ["hardest", "easiest", "middle"])
@pytest.mark.parametrize("fraction", [0.3, 0.7, 1.0])
def test_select_kept_is_stratified_and_picks_the_right_end(keep, fraction):
    labels, scores = random_problem()
    kept = filtering.select_kept(labels, scores, fraction, keep)
    assert np.array_equal(kept, np.unique(kept))                              # sorted rows, no repeats
    for c in range(4):
        members = np.flatnonzero(labels == c)
        ranked = members[np.argsort(scores[members])]
        n = int(round(fraction * len(members)))
        expected = {"hardest": ranked[len(members) - n:], "easiest": ranked[:n],
                    "middle": ranked[(len(members) - n) // 2:][:n]}[keep]
        assert set(kept[labels[kept] == c]) == set(expected)
    assert np.array_equal(kept, filtering.select_kept(labels, scores.copy(), fraction, keep))   # deterministic


def test_select_kept_by_score_range():
    labels, scores = random_problem()
    kept = filtering.select_kept(labels, scores, 1.0, "-0.5:1")
    assert np.array_equal(kept, np.flatnonzero((scores >= -0.5) & (scores <= 1)))
    assert np.array_equal(filtering.select_kept(labels, scores, 1.0, "0:"), np.flatnonzero(scores >= 0))


@pytest.mark.parametrize("fraction, keep, message", [
    (0.0, "hardest", r"data.keep_fraction = 0.0 must be in \(0, 1\]"),
    (1.5, "hardest", r"data.keep_fraction = 1.5 must be in \(0, 1\]"),
    (-0.2, "easiest", r"data.keep_fraction = -0.2 must be in \(0, 1\]"),
    (0.7, "hardest-ish", "choose hardest, easiest, middle, or a score range"),
    (0.7, "0:1", "selects by score range; leave data.keep_fraction at 1"),
    (1.0, "2:1", "low end is above its high end"),
    (1.0, "3:9", "keeps no sample of class 0 .* widen the range"),
    (0.1, "hardest", "keeps no sample of class 9 .1 samples.; raise it to at least 1"),
])
def test_bad_filters_give_one_line(fraction, keep, message):
    labels, scores = random_problem()
    labels, scores = np.r_[labels, 9], np.r_[scores, 0.0]                   # class 9 has one sample
    with pytest.raises(UserError, match=message) as info:
        filtering.select_kept(labels, scores, fraction, keep)
    assert "\n" not in str(info.value)


def test_dynamic_pruning_drops_low_scores_and_reweights():
    rows = np.arange(0, 400, 2)                                               # statically kept rows
    scores = np.random.default_rng(1).random(len(rows))
    pruner = filtering.DynamicPruning(rows, scores, num_samples=400, ratio=0.5, seed=3)
    low = rows[scores < scores.mean()]
    trained, weights = pruner.epoch(0, total_epochs=8)
    assert set(rows[scores >= scores.mean()]) <= set(trained)            # high scores always kept
    kept_low = np.intersect1d(trained, low)
    assert len(low) - len(kept_low) == int(round(0.5 * len(low)))
    assert np.all(weights[kept_low] == 2.0) and np.all(weights[np.setdiff1d(trained, low)] == 1.0)
    assert weights[np.setdiff1d(np.arange(400), rows)].sum() == 0
    again, _ = pruner.epoch(0, total_epochs=8)
    other, _ = pruner.epoch(1, total_epochs=8)
    assert np.array_equal(trained, again) and not np.array_equal(trained, other)
    annealed, weights = pruner.epoch(7, total_epochs=8)                       # last 12.5%: full data
    assert np.array_equal(annealed, rows) and np.all(weights[rows] == 1.0)
    with pytest.raises(UserError, match=r"data.dynamic_prune = 1.0 must be in \(0, 1\)"):
        filtering.DynamicPruning(rows, scores, 400, 1.0, 0)


@pytest.fixture(scope="module")
def scored_digits(tmp_path_factory) -> Path:
    """Digits shards with a synthetic, deterministic 'el2n' score per sample."""
    out = tmp_path_factory.mktemp("filtering") / "digits"
    shards.shard("digits", out, shard_size=300)
    train = load_splits(DataConfig(name=str(out))).train
    score = np.sin(train.sample_ids * 0.37)
    scoring.write_scores(out / "scores.h5", train.sample_ids, train.labels, {"el2n": (score, {"model": "test"})})
    return out


def test_training_rows_match_scores_by_sample_id(scored_digits):
    cfg = DataConfig(name=str(scored_digits), keep_fraction=0.6)
    train = load_splits(cfg).train
    assert np.array_equal(filtering.training_rows(train, DataConfig(name=str(scored_digits))), np.arange(len(train)))
    kept = filtering.training_rows(train, cfg)
    assert np.array_equal(kept, filtering.select_kept(train.labels, np.sin(train.sample_ids * 0.37), 0.6, "hardest"))


def test_scores_of_another_dataset_are_refused(scored_digits, tmp_path):
    other = load_splits(DataConfig(name=str(scored_digits))).val           # samples that were not scored
    with pytest.raises(UserError, match=r"scores cover \d+ of the \d+ training samples .sample_id \d+ is missing.: "
                                        r"they are for a different dataset or split"):
        filtering.training_rows(other, DataConfig(name=str(scored_digits), keep_fraction=0.5))
    train = load_splits(DataConfig(name=str(scored_digits))).train
    scoring.write_scores(tmp_path / "s.h5", train.sample_ids, (train.labels + 1) % 10, {"el2n": (np.zeros(len(train)), {})})
    with pytest.raises(UserError, match="labels of the scored samples differ"):
        filtering.training_rows(train, DataConfig(name=str(scored_digits), keep_fraction=0.5, scores_file=str(tmp_path / "s.h5")))
    with pytest.raises(UserError, match="has no 'grand' scores"):
        filtering.training_rows(train, DataConfig(name=str(scored_digits), keep_fraction=0.5, score="grand"))
    with pytest.raises(UserError, match="needs scores: set data.scores_file"):
        filtering.training_rows(train, DataConfig(name="digits", keep_fraction=0.5))


SAMPLER_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from hpctrain.config import DataConfig
    from hpctrain.data import filtering, load_splits
    from hpctrain.data.sampler import GlobalBatchSampler
    rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    cfg = DataConfig(name=sys.argv[1], keep_fraction=0.7, keep="middle")
    train = load_splits(cfg, seed=0).train
    kept = filtering.training_rows(train, cfg)
    sampler = GlobalBatchSampler(kept, seed=0, rank=rank, world_size=size)
    seen = []
    while not sampler.exhausted():
        seen.append(sampler.next_batch(96))
    np.savez(f"{sys.argv[2]}/rank{rank}.npz", kept=kept, seen=np.concatenate(seen), labels=train.labels)
""")


@pytest.mark.mpi
def test_filtered_sampler_keeps_the_fraction_per_class_on_every_rank(scored_digits, tmp_path):
    (tmp_path / "probe.py").write_text(SAMPLER_SCRIPT)
    run_mpi(3, [tmp_path / "probe.py", scored_digits, tmp_path], program=[sys.executable])
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(3)]
    labels, kept = ranks[0]["labels"], ranks[0]["kept"]
    for r in ranks:
        assert np.array_equal(r["kept"], kept)                                # same selection, no communication
        assert set(r["seen"]) <= set(kept)
    for c in range(10):
        assert (labels[kept] == c).sum() == round(0.7 * (labels == c).sum())
    seen = np.concatenate([r["seen"] for r in ranks])
    assert len(seen) == len(set(seen)) >= len(kept) - 2                       # each kept sample once per epoch


@pytest.mark.mpi
def test_training_with_filtering_and_dynamic_pruning(scored_digits, tmp_path):
    proc = run_mpi(2, ["train", "--config", Path(__file__).parents[1] / "configs" / "digits.toml",
                       "--set", f'data.name="{scored_digits}"', "--set", "data.keep_fraction=0.5",
                       "--set", "data.dynamic=true", "--set", "train.epochs=2", "--set", f'run.out_dir="{tmp_path}"',
                       "--set", "model.args={width=16, depth=1}"])
    train = load_splits(DataConfig(name=str(scored_digits))).train
    n_kept = len(filtering.select_kept(train.labels, np.sin(train.sample_ids * 0.37), 0.5, "hardest"))
    assert proc.stdout.count(f"importance filtering: training on {n_kept} of {len(train)} samples") == 1
    steps = read_log(tmp_path / "digits" / "log.h5")["steps"]
    cfg = DataConfig(name=str(scored_digits), keep_fraction=0.5, dynamic=True)
    pruner = filtering.dynamic_pruning(train, filtering.training_rows(train, cfg), cfg, seed=0)
    epoch0 = len(pruner.epoch(0, total_epochs=2)[0])
    assert steps["samples_seen"][steps["epoch"] == 0][-1] == epoch0 - epoch0 % 2   # the pruned epoch was trained
    assert epoch0 < n_kept
