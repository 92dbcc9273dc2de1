"""`predict`: per method, the step time at P ranks on a network, split into its terms, and the winner.

    step = compute + codec(P) + latency + bandwidth − min(first-round communication, overlap · compute)

compute is the measured compute time per step (the log's step − comm time), codec the
compressor's own work, latency and bandwidth the α and β terms of the step's collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from hpctrain.cost.codec import CodecTime
from hpctrain.cost.links import Network
from hpctrain.cost.methods import HOROVOD_FUSION, Fusion, Layer, Method, Op, exchange_cost, payload_bytes, received_bytes
from hpctrain.cost.overlap import DEFAULT_OVERLAP, exposed


@dataclass(frozen=True)
class Prediction:
    method: str
    ranks: int
    hierarchical: bool
    compute_s: float
    codec_s: float
    latency_s: float
    bandwidth_s: float
    hidden_s: float
    payload_bytes: float       # handed to the network per rank per step
    inter_bytes: float         # crossing one node's boundary per step
    collectives: int
    algorithm: str

    @property
    def comm_s(self) -> float:
        return self.latency_s + self.bandwidth_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.codec_s + self.comm_s - self.hidden_s


@dataclass(frozen=True)
class Verdict:
    predictions: list[Prediction]
    winner: Prediction
    reason: str

    def get(self, method: str) -> Prediction:
        return next(p for p in self.predictions if p.method == method)


# The rounds that start during backward; a later round (LowRank's Q) needs the first one's result,
# which arrives after backward, so compute cannot hide it.
FIRST_ROUNDS = ("grad", "bypass")


def predict_one(method: Method, layers: list[Layer], compute_s: float, ranks: int, network: Network,
                codec: CodecTime = CodecTime(), hierarchical: bool = False, overlap: float = DEFAULT_OVERLAP,
                min_numel: int = 1024, fusion: Fusion = HOROVOD_FUSION) -> Prediction:
    ops = method.ops(layers, min_numel)
    cost, count = exchange_cost(ops, ranks, network, hierarchical, fusion)
    if ranks <= 1:
        received = 0.0
    elif hierarchical and network.nodes(ranks) > 1 and not network.shared:
        received = received_bytes(ops, network.nodes(ranks))     # the leader scatters N−1 payloads
    else:
        received = received_bytes(ops, ranks)
    hidden = hidden_s(ops, compute_s, ranks, network, hierarchical, overlap, fusion)
    return Prediction(method.name, ranks, hierarchical, compute_s, codec.seconds(received), cost.latency_s,
                      cost.bandwidth_s, hidden, payload_bytes(ops), cost.inter_bytes, count, cost.algorithm)


def hidden_s(ops: list[Op], compute_s: float, ranks: int, network: Network, hierarchical: bool = False,
             overlap: float = DEFAULT_OVERLAP, fusion: Fusion = HOROVOD_FUSION, scale: float = 1.0) -> float:
    """What of the step's exchange backward hides: its first rounds (`FIRST_ROUNDS`, their
    modelled seconds × `scale`), up to `overlap` × compute."""
    first, _ = exchange_cost([op for op in ops if op.round in FIRST_ROUNDS], ranks, network, hierarchical, fusion)
    return exposed(scale * first.seconds, compute_s, overlap)[1]


def predict(methods: list[Method], layers: list[Layer], compute_s: float, ranks: int, network: Network,
            codecs: Mapping[str, CodecTime] | None = None, hierarchical: bool = False,
            overlap: float = DEFAULT_OVERLAP, min_numel: int = 1024,
            fusion: Fusion = HOROVOD_FUSION) -> Verdict:
    """Every method at `ranks` ranks; the first method is the baseline the speedups refer to."""
    codecs = codecs or {}
    predictions = [predict_one(m, layers, compute_s, ranks, network, codecs.get(m.name, CodecTime()),
                               hierarchical, overlap, min_numel, fusion) for m in methods]
    winner = min(predictions, key=lambda p: p.step_s)
    return Verdict(predictions, winner, reason(winner, predictions[0], predictions))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3g} MB"


def reason(winner: Prediction, baseline: Prediction, predictions: list[Prediction]) -> str:
    """One line: why the winner wins, in the terms of the model."""
    runner = min((p for p in predictions if p is not winner), key=lambda p: p.step_s, default=None)
    if winner.comm_s <= winner.hidden_s + 1e-12:
        why = (f"communication ({_ms(winner.comm_s)}) hides behind backward "
               f"({_ms(winner.hidden_s)} window), so the cheapest codec wins")
    elif winner is baseline:
        cheaper = min((p for p in predictions if p is not winner), key=lambda p: p.comm_s, default=winner)
        why = (f"compression does not pay: {cheaper.method} sends {_mb(cheaper.payload_bytes)} vs "
               f"{_mb(winner.payload_bytes)} per rank but adds {_ms(cheaper.codec_s)} codec and "
               f"{_ms(cheaper.latency_s)} latency ({cheaper.algorithm})")
    else:
        why = (f"{_mb(winner.payload_bytes)} per rank instead of {_mb(baseline.payload_bytes)}: bandwidth "
               f"{_ms(winner.bandwidth_s)} vs {_ms(baseline.bandwidth_s)}, latency {_ms(winner.latency_s)} "
               f"({winner.collectives} collectives, {winner.algorithm}), codec {_ms(winner.codec_s)}")
    tail = f"; runner-up {runner.method} {_ms(runner.step_s)}" if runner else ""
    return f"{winner.method} ({_ms(winner.step_s)}, {baseline.step_s / winner.step_s:.2f}× {baseline.method}): {why}{tail}"
