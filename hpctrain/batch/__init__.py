"""Adaptive batch growth: pure policies, an on-line gradient-noise-scale estimator, and the
rank-0 orchestrator that turns their answers into one decision every rank applies, and
`AdaptiveBatch`, its small per-step / per-epoch API for one's own training loop."""
from __future__ import annotations

from hpctrain.batch.adaptive import AdaptiveBatch
from hpctrain.batch.gns import NoiseScaleEstimator, unbiased_estimates
from hpctrain.batch.grad_norms import GradNormObserver
from hpctrain.batch.orchestrator import BatchDecision, BatchOrchestrator, BatchStats, split_local
from hpctrain.batch.policies import Grow, Observation, build_policy

__all__ = ["AdaptiveBatch", "BatchDecision", "BatchOrchestrator", "BatchStats", "GradNormObserver", "Grow", "NoiseScaleEstimator",
           "Observation", "build_policy", "split_local", "unbiased_estimates"]
