"""A scoring run: each rank scores its fixed blocks with one model per seed, rank 0 gathers the
parts in block order, averages the runs and writes scores.h5."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hpctrain import __version__, checkpoint, comm
from hpctrain.config import Config, config_from_dict, load_config
from hpctrain.data import Dataset, Splits, load_splits
from hpctrain.data.scoring.blocks import SCORE_BLOCK, rank_blocks, to_device
from hpctrain.data.scoring.extractor import Embed, embed_fn, load_extractor
from hpctrain.data.scoring.metrics import (LOGIT_METHODS, centroid_distance, forgetting_counts, knn_distance,
                                           logit_scores)
from hpctrain.data.scoring.options import ScoreOptions
from hpctrain.data.scoring.pretrain import Trained, from_checkpoint, short_run
from hpctrain.data.scoring.scores_file import write_scores
from hpctrain.data.shards import manifest_hash
from hpctrain.errors import UserError


@torch.no_grad()
def score_blocks(methods: tuple[str, ...], train: Dataset, blocks: list[tuple[int, int]], device: torch.device,
                 model: nn.Module | None, model_embed: Embed | None, extractor: Embed | None,
                 show_progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """This rank's loss/el2n/grand scores, and its embedding (the extractor's if given, else the model's)."""
    logit_methods = [m for m in methods if m in LOGIT_METHODS]
    scores: dict[str, list[np.ndarray]] = {m: [] for m in logit_methods}
    embeddings = []
    for lo, hi in tqdm(blocks, desc="score", unit="block", disable=not show_progress):
        x, y = to_device(train, np.arange(lo, hi), device)
        features = model_embed(x) if model_embed is not None else None
        if logit_methods:
            logits = model(x)
            for m in logit_methods:
                scores[m].append(logit_scores(m, logits, y, features))
        embedding = extractor(x) if extractor is not None else features
        if embedding is not None:
            embeddings.append(embedding.float().cpu().numpy())
    return ({m: np.concatenate(v) if v else np.zeros(0) for m, v in scores.items()},
            np.concatenate(embeddings) if embeddings else None)


def scoring_model(opts: ScoreOptions, state: dict[str, Any] | None, cfg: Config, splits: Splits,
                  device: torch.device, seed: int, rank: int, size: int) -> tuple[Trained | None, Embed | None]:
    """The model that scores (the checkpoint's, or a short run from `seed`; none with only an
    extractor) and its embedding, which feeds grand, the default feature-density and the explorer."""
    if not opts.needs_model:
        return None, None
    if state is not None:
        trained = from_checkpoint(state, opts.checkpoint, cfg, splits, device)
    else:
        trained = short_run(cfg, splits, device, opts.epochs, seed, rank, size)
    if {"grand", "feature-density"} & set(opts.methods) or hasattr(trained.model, "embed"):
        return trained, embed_fn(trained.model, f"model {cfg.model.name!r}")
    return trained, None


def method_scores(method: str, trained: Trained | None, scores: dict[str, np.ndarray], embedding: np.ndarray | None,
                  labels: np.ndarray, opts: ScoreOptions) -> np.ndarray:
    """`method`'s scores of all samples from one model (one short run or the checkpoint)."""
    if method == "forgetting":
        return forgetting_counts(trained.history)
    if method == "feature-density":
        return knn_distance(embedding, opts.k) if opts.density == "knn" else centroid_distance(embedding, labels)
    return scores[method]


def compute_scores(opts: ScoreOptions) -> int:
    """Score the train split of `opts.data` on every rank of the job; rank 0 writes the file."""
    methods = opts.methods
    out = opts.out_path()
    state = checkpoint.load(opts.checkpoint, ranks=False) if opts.checkpoint else None     # the model alone
    cfg = config_from_dict(state["config"], opts.overrides) if state else load_config(opts.config, opts.overrides)
    cfg.data.name = str(opts.data)
    comm.init()
    rank, size = comm.rank(), comm.size()
    device = comm.pick_device(cfg.train.device)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False   # rank-invariant on GPU too
    splits = load_splits(cfg.data, cfg.run.seed, task=None)
    if splits.task != "classification":
        raise UserError(f"hpctrain score: {cfg.data.name} holds regression targets; the score methods read class "
                        "logits and labels, so they score classification data only")
    train = splits.train
    extractor = None
    if opts.extractor:
        extractor, extractor_name = load_extractor(opts.extractor, opts.extractor_state, device)
    blocks = rank_blocks(len(train), SCORE_BLOCK, rank, size)

    # Paul et al. (2021) average EL2N over 10 initialisations: one short run ranks samples noisily
    seeds = [cfg.run.seed + i for i in range(opts.seeds)]
    per_run: list[dict[str, np.ndarray]] = []
    embedding = None
    for i, seed in enumerate(seeds):
        trained, model_embed = scoring_model(opts, state, cfg, splits, device, seed, rank, size)
        model = trained.model if trained is not None else None
        part = score_blocks(methods, train, blocks, device, model, model_embed, extractor, rank == 0)
        parts = comm.get().allgather_object(part, name=f"hpctrain.score.parts.{i}")
        if rank == 0:
            run_embedding = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
            if i == 0:
                embedding = run_embedding          # one model's embedding (averaging models' makes no sense)
            logit = {m: np.concatenate([p[0][m] for p in parts]) for m in parts[0][0]}
            per_run.append({m: method_scores(m, trained, logit, run_embedding, train.labels, opts) for m in methods})
    if rank != 0:
        return 0

    common = {"data": str(opts.data), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "hpctrain_version": __version__,
              "manifest_sha256": manifest_hash(Path(opts.data)) if Path(opts.data).is_dir() else ""}
    if trained is not None:
        common.update(model=trained.name, step=trained.step)
        if state is None:
            common.update(short_run_epochs=opts.epochs, seeds=np.array(seeds, dtype=np.int64))
    results = {}
    for method in methods:
        attrs = dict(common, method=method)
        if method == "feature-density":
            attrs.update(density=opts.density, k=opts.k if opts.density == "knn" else 0)
            if extractor is not None:
                attrs.update(model=extractor_name, step=0)
        scores = np.mean([r[method] for r in per_run], axis=0)       # run order: the same on any world size
        results[method] = (scores, attrs)
        print(f"{method}: mean {scores.mean():.4g}, min {scores.min():.4g}, max {scores.max():.4g}"
              + (f" (mean of {len(seeds)} runs)" if len(seeds) > 1 else ""))
    source = extractor_name if extractor is not None else trained.name
    write_scores(out, train.sample_ids, train.labels, results, embedding, {"model": source})
    print(f"wrote {', '.join(methods)} scores of {len(train)} samples to {out}")
    return 0
