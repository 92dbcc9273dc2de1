"""Per-layer policy: which compressor each parameter gets, and the small-tensor bypass."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from hpctrain.compression import registry
from hpctrain.compression.base import Compressor, ParamState
from hpctrain.compression.dense import NoCompression

if TYPE_CHECKING:
    from hpctrain.config import CompressionConfig


@dataclass
class Policy:
    """Pick a compressor per parameter name.

    `rules` map glob patterns (matched against the parameter's name) to a compressor, or to
    None for "send dense"; the first matching rule wins, else `default` (None: dense).
    Tensors with fewer than `min_numel` elements, and shapes the chosen compressor cannot
    handle, bypass compression and ride one fused dense allreduce at the end of backward;
    larger dense tensors are sent as soon as their gradient is ready (fused by Horovod's cycle,
    or in the torch engine's buckets).
    During the first `warmup_steps` exchanges every compressed parameter is sent dense too
    (as DGC's warm-up and torch PowerSGD's `start_powerSGD_iter`): the first updates, which
    move the weights most, then see the exact gradient, and compression starts with an empty
    residual memory.
    `hierarchical`: run the one-round allgather compressors (TopK, Threshold, AdaComp, SignSGD)
    hierarchically on a multi-node layout — a dense mean inside each node, the compressor's
    allgather among one leader per node, a broadcast back (`hpctrain.optimizer.hierarchical`).
    """
    default: Compressor | None = None
    rules: dict[str, Compressor | None] = field(default_factory=dict)
    min_numel: int = 1024
    warmup_steps: int = 0
    hierarchical: bool = False

    def choose(self, name: str) -> Compressor | None:
        """The rule (or default) for this name, before the size and shape checks; None: dense."""
        for pattern, compressor in self.rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return compressor
        return self.default

    def bypass_reason(self, name: str, param: torch.Tensor) -> str | None:
        """Why this parameter rides the fused dense bypass ("small", "shape"), or None."""
        if param.numel() < self.min_numel:
            return "small"
        chosen = self.choose(name)
        if chosen is not None and not chosen.applies_to(param.shape):
            return "shape"
        return None

    def resolve(self, name: str, param: torch.Tensor) -> Compressor | None:
        """The compressor for this parameter, or None for the fused small-tensor bypass."""
        if self.bypass_reason(name, param) is not None:
            return None
        return self.choose(name) or DENSE

    def compressor_now(self, compressor: Compressor, state: ParamState) -> Compressor:
        """What this parameter's exchange uses this step: `compressor`, or DENSE while it is in the
        warm-up (its first `warmup_steps` exchanges, counted by `state.steps`)."""
        return DENSE if state.steps < self.warmup_steps else compressor


DENSE = NoCompression()


def policy_from_config(cfg: CompressionConfig) -> Policy:
    """The `[compression]` table of a run config as a Policy: default compressor, glob rules,
    small-tensor bypass, dense warm-up."""
    built = {name: registry.build(name, cfg.options.get(name)) for name in {cfg.name, *cfg.rules.values()}}
    if cfg.name == "auto":           # every layer exchanged on its own (dense fp32) until auto decides
        built["auto"] = DENSE
    return Policy(default=built[cfg.name], rules={pattern: built[name] for pattern, name in cfg.rules.items()},
                  min_numel=cfg.min_numel, warmup_steps=cfg.warmup_steps, hierarchical=cfg.hierarchical)


def as_policy(compression: Compressor | Policy | None) -> Policy:
    """Accept a bare compressor where a policy is expected (mirrors hvd's `compression=`)."""
    if isinstance(compression, Policy):
        return compression
    return Policy(default=compression)


def describe(policy: Policy, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """One aligned line per parameter: name, shape, and what it is sent with (printed by rank 0)."""
    rows = []
    for name, param in named_parameters:
        reason = policy.bypass_reason(name, param)
        if reason == "small":
            what = f"dense (bypass: small, numel < {policy.min_numel})"
        elif reason == "shape":
            what = f"dense (bypass: {policy.choose(name)!r} does not apply to this shape)"
        else:
            compressor = policy.choose(name)
            what = repr(compressor) if compressor is not None else "dense"
        rows.append((name, str(tuple(param.shape)), what))
    name_width = max((len(r[0]) for r in rows), default=0)
    shape_width = max((len(r[1]) for r in rows), default=0)
    return [f"{n:<{name_width}}  {s:<{shape_width}}  {w}" for n, s, w in rows]
