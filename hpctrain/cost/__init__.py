"""A communication cost model for data-parallel training: does compression pay, here, at P ranks?

    links        α (latency) and β (bandwidth) per level: intra-node, inter-node; rates like "25gbit"
    collectives  ring / tree allreduce, allgather of variable payloads, hierarchical variants
    methods      what dense, fp16, each compressor and low rank put on the wire, per layer
    overlap      how much communication hides behind backward
    codec        the compressors' own time
    predict      step time = compute + codec + exposed (latency + bandwidth), and the winner

The equations and their assumptions are in docs/cost-model.md; `hpctrain advise` applies them
to a run's step log.
"""
from hpctrain.cost.codec import CodecTime
from hpctrain.cost.collectives import Cost
from hpctrain.cost.links import Link, Network, parse_rate, site_network
from hpctrain.cost.methods import Layer, Method, Op
from hpctrain.cost.predict import Prediction, Verdict, predict, predict_one

__all__ = ["CodecTime", "Cost", "Link", "Network", "parse_rate", "site_network", "Layer", "Method", "Op",
           "Prediction", "Verdict", "predict", "predict_one"]
