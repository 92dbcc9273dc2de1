"""Gradient compressors for `hpctrain.DistributedOptimizer`, and the per-layer policy.

    from hpctrain.compression import AdaComp, Policy
    policy = Policy(default=AdaComp(), rules={"*.bias": None}, min_numel=1024)

`policy_from_config` builds the same from the `[compression]` table of a run config.
"""
from __future__ import annotations

from typing import Callable

from hpctrain.compression.adacomp import AdaComp
from hpctrain.compression.base import Collective, Compressor, ParamState, simulate
from hpctrain.compression.dense import FP16, NoCompression
from hpctrain.compression.lowrank import LowRank
from hpctrain.compression.policy import Policy, describe
from hpctrain.compression.threshold import Threshold
from hpctrain.compression.topk import TopK
from hpctrain.config import CompressionConfig
from hpctrain.errors import UserError

__all__ = ["Compressor", "Collective", "ParamState", "NoCompression", "FP16", "TopK", "Threshold",
           "AdaComp", "LowRank", "Policy", "describe", "policy_from_config", "build_compressor", "simulate"]

# Config name → how to build it from its table ("none" means plain dense: no compressor).
_BUILDERS: dict[str, Callable[[CompressionConfig], Compressor | None]] = {
    "none": lambda cfg: None,
    "fp16": lambda cfg: FP16(),
    "topk": lambda cfg: TopK(ratio=cfg.topk.ratio),
    "adacomp": lambda cfg: AdaComp(conv_bin=cfg.adacomp.conv_bin, fc_bin=cfg.adacomp.fc_bin,
                                   quantize=cfg.adacomp.quantize),
    "threshold": lambda cfg: Threshold(density=cfg.threshold.density, refresh_every=cfg.threshold.refresh_every,
                                       min_entries=cfg.threshold.min_entries),
    "lowrank": lambda cfg: LowRank(rank=cfg.lowrank.rank, power_iterations=cfg.lowrank.power_iterations,
                                   warm_start=cfg.lowrank.warm_start),
}


def build_compressor(name: str, cfg: CompressionConfig) -> Compressor | None:
    """The compressor called `name`, with its hyper-parameters from `cfg`; None for "none"."""
    if name not in _BUILDERS:
        raise UserError(f"compression: unknown compressor {name!r}; choose one of {', '.join(_BUILDERS)}")
    return _BUILDERS[name](cfg)


def policy_from_config(cfg: CompressionConfig) -> Policy:
    """The `[compression]` table as a Policy: default compressor, glob rules, small-tensor bypass."""
    built = {name: build_compressor(name, cfg) for name in {cfg.name, *cfg.rules.values()}}
    return Policy(default=built[cfg.name], rules={pattern: built[name] for pattern, name in cfg.rules.items()},
                  min_numel=cfg.min_numel, warmup_steps=cfg.warmup_steps)
