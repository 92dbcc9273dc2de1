"""The per-sample score maths, pure: from logits, correctness histories and embeddings to scores.

Higher score = harder / rarer / more informative for every method, so `keep = "hardest"` keeps
the high end.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hpctrain.errors import UserError

LOGIT_METHODS = ("loss", "el2n", "grand")      # the methods computed from one forward pass


def logit_scores(method: str, logits: torch.Tensor, labels: torch.Tensor,
                 features: torch.Tensor | None = None) -> np.ndarray:
    """loss / el2n / grand for a block, in float64."""
    logits = logits.double()
    if method == "loss":
        return nn.functional.cross_entropy(logits, labels, reduction="none").cpu().numpy()
    error = torch.softmax(logits, dim=1) - nn.functional.one_hot(labels, logits.shape[1]).double()
    el2n = error.norm(dim=1)
    if method == "el2n":
        return el2n.cpu().numpy()
    if features is None:
        raise ValueError("grand needs the penultimate features")
    return (el2n * torch.sqrt(1 + features.double().flatten(1).pow(2).sum(1))).cpu().numpy()


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Learned→forgotten transitions per sample from a [presentations, N] correctness history."""
    correct = np.asarray(correct, dtype=bool)
    forgotten = (correct[:-1] & ~correct[1:]).sum(axis=0)
    return np.where(correct.any(axis=0), forgotten, len(correct)).astype(np.float64)


def knn_distance(embedding: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance to the k nearest other samples (large = sparse region)."""
    from sklearn.neighbors import NearestNeighbors      # ~1 s to import: only runs that ask for knn pay it
    if not 0 < k < len(embedding):
        raise UserError(f"--k {k} must be between 1 and the number of samples - 1 ({len(embedding) - 1})")
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return distances[:, 1:].mean(axis=1).astype(np.float64)     # column 0 is the sample itself


def centroid_distance(embedding: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Euclidean distance of each sample to its class centroid."""
    out = np.empty(len(labels), dtype=np.float64)
    emb = embedding.astype(np.float64)
    for c in np.unique(labels):
        members = labels == c
        out[members] = np.linalg.norm(emb[members] - emb[members].mean(axis=0), axis=1)
    return out
