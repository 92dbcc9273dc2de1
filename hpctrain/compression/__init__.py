"""Gradient compressors for `hpctrain.DistributedOptimizer`, and the per-layer policy.

    from hpctrain.compression import AdaComp, Policy
    policy = Policy(default=AdaComp(), rules={"*.bias": None}, min_numel=1024)

The names below are imported on first use (PEP 562), so a run config can be checked without
importing torch; `registry.py` lists the compressors a config can name.
"""
from __future__ import annotations

import importlib
from typing import Any

from hpctrain.compression.registry import COMPRESSORS, build

# name → module, for what is not a registered compressor.
_MODULES = {"Compressor": "base", "Collective": "base", "ParamState": "base", "simulate": "base",
            "NoCompression": "dense", "Policy": "policy", "describe": "policy", "policy_from_config": "policy"}
_CLASSES = {spec.split(":")[1]: spec.split(":")[0] for spec in COMPRESSORS.values()}

__all__ = ["Compressor", "Collective", "ParamState", "NoCompression", *_CLASSES, "Policy", "describe",
           "policy_from_config", "build", "simulate"]


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    if name in _MODULES:
        return getattr(importlib.import_module(f"hpctrain.compression.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'hpctrain.compression' has no attribute {name!r}")
