"""Which training samples to train on: importance filtering once, and dynamic pruning per epoch.

Everything here is a pure function of labels, scores, the config, the seed and the epoch, so
every rank computes the same kept set without communicating. Selection is stratified by class:
the kept fraction holds per class and no class can vanish. Scores come from `hpctrain score`
(higher = harder for every method) and are matched to the dataset by sample_id.

Samples are named by their rows in the dataset given (the train split, for the training loop:
what `Dataset.get` takes). The loop calls `training_rows` once (the kept rows restrict the train
split before the sampler) and, with `data.dynamic = true`, `DynamicPruning.epoch` at each epoch start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpctrain.errors import UserError

KEEP_MODES = ("hardest", "easiest", "middle")
ANNEAL_FRACTION = 0.875      # InfoBatch: train on the full (kept) set for the last 12.5% of epochs


def parse_keep(keep: str) -> str | tuple[float, float]:
    """`hardest`/`easiest`/`middle`, or a score range "lo:hi" (either end may be empty)."""
    if keep in KEEP_MODES:
        return keep
    lo, sep, hi = keep.partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = (float(lo) if lo.strip() else -math.inf, float(hi) if hi.strip() else math.inf)
    except ValueError:
        raise UserError(f"data.keep = {keep!r}: choose hardest, easiest, middle, or a score range "
                        f"'lo:hi' such as '0.1:0.9'") from None
    if bounds[0] > bounds[1]:
        raise UserError(f"data.keep = {keep!r}: the range's low end is above its high end; swap them")
    return bounds


def _check_fraction(keep_fraction: float) -> None:
    if not 0 < keep_fraction <= 1:
        raise UserError(f"data.keep_fraction = {keep_fraction} must be in (0, 1]; e.g. 0.7 keeps 70% of each class")


def select_kept(labels: np.ndarray, scores: np.ndarray, keep_fraction: float, keep: str) -> np.ndarray:
    """Sorted rows (of `labels`) to keep, chosen per class; a class left empty is an error, not a silent drop."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    _check_fraction(keep_fraction)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} samples")
    if not np.isfinite(scores).all():
        raise UserError(f"{int((~np.isfinite(scores)).sum())} scores are NaN/Inf; re-run `hpctrain score`")
    mode = parse_keep(keep)
    if isinstance(mode, tuple) and keep_fraction != 1:
        raise UserError(f"data.keep = {keep!r} selects by score range; leave data.keep_fraction at 1 "
                        f"(it is {keep_fraction}) or use hardest/easiest/middle")
    kept = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if isinstance(mode, tuple):
            chosen = members[(scores[members] >= mode[0]) & (scores[members] <= mode[1])]
            if len(chosen) == 0:
                raise UserError(f"data.keep = {keep!r} keeps no sample of class {c} (its scores span "
                                f"{scores[members].min():.4g}..{scores[members].max():.4g}); widen the range")
        else:
            n_keep = int(round(keep_fraction * len(members)))
            if n_keep == 0:
                raise UserError(f"data.keep_fraction = {keep_fraction} keeps no sample of class {c} "
                                f"({len(members)} samples); raise it to at least {1 / len(members):.3g}")
            ranked = members[np.argsort(scores[members], kind="stable")]        # easiest first
            start = {"easiest": 0, "hardest": len(members) - n_keep, "middle": (len(members) - n_keep) // 2}[mode]
            chosen = ranked[start:start + n_keep]
        kept.append(chosen)
    return np.sort(np.concatenate(kept))


def scores_path(data_cfg) -> Path:
    """`data.scores_file`, else `scores.h5` inside the shard directory `data.name`."""
    if data_cfg.scores_file:
        return Path(data_cfg.scores_file)
    if Path(data_cfg.name).is_dir():
        return Path(data_cfg.name) / "scores.h5"
    raise UserError(f"filtering data.name = {data_cfg.name!r} needs scores: set data.scores_file to the file "
                    f"written by `hpctrain score --data {data_cfg.name} --out FILE`")


def matched_scores(dataset, path: Path, method: str) -> np.ndarray:
    """`method`'s scores aligned to the dataset's rows (matched by sample_id, labels checked)."""
    from hpctrain.data.scoring import read_scores

    stored = read_scores(path)
    values = stored.method(method)
    ids = dataset.sample_ids
    where = np.clip(np.searchsorted(stored.sample_ids, ids), 0, len(stored.sample_ids) - 1)
    missing = stored.sample_ids[where] != ids
    fix = f"re-run `hpctrain score --data DIR --method {method}` with this run's data and seed"
    if missing.any():
        raise UserError(f"{path}: scores cover {len(ids) - int(missing.sum())} of the {len(ids)} training samples "
                        f"(sample_id {ids[missing][0]} is missing): they are for a different dataset or split; {fix}")
    if not np.array_equal(stored.labels[where], dataset.labels):
        raise UserError(f"{path}: labels of the scored samples differ from this dataset's: the scores are for "
                        f"a different dataset; {fix}")
    return values[where]


def training_rows(train, data_cfg) -> np.ndarray:
    """The rows of `train` to sample from: all of them, or the kept ones (same on every rank)."""
    _check_fraction(data_cfg.keep_fraction)
    if data_cfg.keep_fraction == 1 and data_cfg.keep in KEEP_MODES:
        return np.arange(len(train), dtype=np.int64)
    scores = matched_scores(train, scores_path(data_cfg), data_cfg.score)
    return select_kept(train.labels, scores, data_cfg.keep_fraction, data_cfg.keep)


@dataclass
class DynamicPruning:
    """InfoBatch-style pruning (Qin et al. 2024) over the statically kept rows.

    Each epoch a random `ratio` of the samples scoring below the mean is left out; the
    low-score samples still trained on get loss weight 1/(1 − ratio), so the expected
    gradient matches full data. The last (1 − ANNEAL_FRACTION) of the epochs use every
    sample with weight 1. Unlike InfoBatch, the score is the static one from scores.h5.
    """
    rows: np.ndarray               # statically kept rows of the train split
    scores: np.ndarray             # their scores
    num_samples: int               # size of the train split (weights are indexed by row)
    ratio: float
    seed: int

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise UserError(f"data.dynamic_prune = {self.ratio} must be in (0, 1), e.g. 0.5")

    def epoch(self, epoch: int, total_epochs: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows to train on this epoch, loss weight of every row of the train split)."""
        weights = np.zeros(self.num_samples, dtype=np.float32)
        if epoch >= math.ceil(ANNEAL_FRACTION * total_epochs):
            weights[self.rows] = 1.0
            return self.rows, weights
        low = np.flatnonzero(self.scores < self.scores.mean())     # indices into self.rows
        rng = np.random.default_rng((self.seed, epoch, 0x1B))
        dropped = rng.choice(low, size=int(round(self.ratio * len(low))), replace=False)
        trained = np.ones(len(self.rows), dtype=bool)
        trained[dropped] = False
        weights[self.rows] = 1.0
        weights[self.rows[np.setdiff1d(low, dropped)]] = 1.0 / (1.0 - self.ratio)
        return self.rows[trained], weights


def dynamic_pruning(train, rows: np.ndarray, data_cfg, seed: int) -> DynamicPruning | None:
    """The per-epoch pruner over `rows` of `train` when `data.dynamic` is on, else None."""
    if not data_cfg.dynamic:
        return None
    scores = matched_scores(train, scores_path(data_cfg), data_cfg.score)[rows]
    return DynamicPruning(rows, scores, len(train), data_cfg.dynamic_prune, seed)
