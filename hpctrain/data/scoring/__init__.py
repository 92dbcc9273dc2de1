"""Per-sample importance scores of a training split, computed in parallel, stored in scores.h5.

Higher score = harder / rarer / more informative for every method, so `keep = "hardest"` keeps
the high end:

  loss              cross-entropy of the model's prediction
  el2n              ‖softmax − onehot‖₂ (Paul et al. 2021, "Deep learning on a data diet")
  grand             gradient norm of the loss w.r.t. the LAST linear layer, in closed form:
                    ‖(p − y) ⊗ [h, 1]‖ = ‖p − y‖·√(‖h‖² + 1) with h the penultimate features
  forgetting        learned→forgotten transitions over a short training run (Toneva et al. 2019);
                    samples never learned get the number of presentations (more than any count)
  feature-density   mean distance to the k nearest neighbours (or to the class centroid) in the
                    embedding of a frozen extractor (TorchScript or torch.export .pt2 file,
                    module:factory + state dict, or by default the trained model's `embed()`)

The model is a checkpoint (`--checkpoint`) or, without one, a short pre-training run from the
run config; `--seeds N` averages every method's scores over N such runs, each initialised and
shuffled by its own seed (run.seed, run.seed + 1, …), as Paul et al. do for EL2N. Scores do not
depend on the number of ranks (blocks.py).

    options.py      ScoreOptions: what to compute, checked first
    metrics.py      the score maths, pure
    blocks.py       fixed sample blocks: rank invariance
    extractor.py    embeddings: the model's embed() or a frozen extractor
    pretrain.py     the scoring model: a checkpoint or a rank-invariant short run
    compute.py      a scoring run across ranks (`compute_scores`)
    scores_file.py  scores.h5
The command line is hpctrain/commands/score.py. The options and scores.h5 need no torch: the
names from the other modules are imported on first use (PEP 562), so reading scores (filtering,
`hpctrain report`) and `hpctrain score --help` do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from hpctrain.data.scoring.options import METHODS, ScoreOptions
from hpctrain.data.scoring.scores_file import SCHEMA_VERSION, ScoresFile, read_scores, write_scores

_TORCH_NAMES = {
    "metrics": ("logit_scores", "forgetting_counts", "knn_distance", "centroid_distance"),
    "blocks": ("SCORE_BLOCK", "GRAD_BLOCK", "rank_blocks"),
    "extractor": ("Embed", "embed_fn", "load_extractor"),
    "pretrain": ("Trained", "from_checkpoint", "short_run"),
    "compute": ("compute_scores",),
}
_LAZY = {name: module for module, names in _TORCH_NAMES.items() for name in names}

__all__ = ["METHODS", "ScoreOptions", "SCHEMA_VERSION", "ScoresFile", "read_scores", "write_scores", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
