"""A communication cost model for data-parallel training: does compression pay, here, at P ranks?

    links        α (latency) and β (bandwidth) per level: intra-node, inter-node; rates like "25gbit"
    collectives  ring / tree allreduce, allgather of variable payloads, hierarchical variants
    methods      what dense, fp16, each compressor and low rank put on the wire, per layer
    overlap      how much communication hides behind backward
    codec        the compressors' own time
    prediction   step time = compute + codec + exposed (latency + bandwidth), and the winner

The equations and their assumptions are in docs/cost-model.md; `hpctrain advise` applies them
to a run's step log.
"""
from __future__ import annotations

import importlib
from typing import Any

# Names load on first use: `links` and `overlap` need no torch (`hpctrain advise --help` reads
# their defaults), `methods` and what builds on it do.
_WHERE = {"CodecTime": "codec", "Cost": "collectives", "Link": "links", "Network": "links", "parse_rate": "links",
          "site_network": "links", "Fusion": "methods", "Layer": "methods", "Method": "methods", "Op": "methods",
          "Prediction": "prediction", "Verdict": "prediction", "predict": "prediction",
          "predict_one": "prediction"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"hpctrain.cost.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hpctrain.cost' has no attribute {name!r}")
