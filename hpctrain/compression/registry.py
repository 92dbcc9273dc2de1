"""The compressors a run config can name. Adding one: its file in this package, one line here.

Torch-free (a config names compressors before any of them is imported): a name maps to
"module:Class", and the class, a dataclass whose fields are its hyper-parameters, is imported
only when built.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

from hpctrain.errors import UserError
from hpctrain.schema import build as build_dataclass

if TYPE_CHECKING:
    from hpctrain.compression.base import Compressor

COMPRESSORS: dict[str, str] = {
    "fp16": "hpctrain.compression.dense:FP16",
    "topk": "hpctrain.compression.topk:TopK",
    "threshold": "hpctrain.compression.threshold:Threshold",
    "adacomp": "hpctrain.compression.adacomp:AdaComp",
    "lowrank": "hpctrain.compression.lowrank:LowRank",
    "signsgd": "hpctrain.compression.signsgd:SignSGD",
}
# "none": no compressor, every gradient in fp32 (as hvd.DistributedOptimizer). "auto": dense until
# the cost model picks per layer after the warm-up (hpctrain/compression/auto.py).
NAMES = ("none", "auto", *COMPRESSORS)


def compressor_class(name: str) -> type[Compressor]:
    """The class registered as `name`."""
    if name not in COMPRESSORS:
        raise UserError(f"compression: unknown compressor {name!r}; choose one of {', '.join(NAMES)}")
    module, attribute = COMPRESSORS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build(name: str, options: Mapping[str, Any] | None = None) -> Compressor | None:
    """The compressor called `name` with hyper-parameters `options` (a `[compression.NAME]`
    table; missing keys take the class's defaults); None for "none"."""
    if name in ("none", "auto"):          # auto: dense until its decision (compression/auto.py)
        if options:
            raise UserError(f"config: [compression.{name}] takes no keys: dense fp32 has no hyper-parameters")
        return None
    return build_dataclass(compressor_class(name), dict(options or {}), f"compression.{name}")
