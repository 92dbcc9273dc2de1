"""What each method puts on the wire per step, as collectives ("ops"), from the layer shapes.

- dense: every gradient fp32 in fused allreduces (Horovod's fusion buffer, DDP's buckets);
- fp16: the same at 2 bytes per entry;
- AdaComp, Threshold, TopK: per layer a variable-length allgather of dense/ratio bytes, the
  ratio measured (in the run's log, or on synthetic gradients by `simulate`);
- LowRank: per power iteration two rounds, allreduce of P [n×r] then of Q [m×r] (fp32), the
  second waiting for the first; the first P rides the gradient round (launched, like a dense
  gradient, as the layer's gradient is ready);
- every method: tensors the policy leaves out (numel < min_numel, shapes the compressor does
  not apply to) ride one fused fp32 "bypass" allreduce.
The compressors' own `applies_to` and the policy's `bypass_reason` decide, on meta tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

from hpctrain.compression import FP16, Compressor, LowRank, NoCompression, Policy
from hpctrain.cost.collectives import ZERO, Cost, flat_allgatherv, flat_allreduce, hierarchical_allgatherv, hierarchical_allreduce
from hpctrain.cost.links import Network

FP32 = 4


@dataclass(frozen=True)
class Fusion:
    """How an engine packs one step's collectives: allreduces of a round share buffers of up to
    `buffer_bytes`; allgathers of a round too when `allgathers`, else one per layer.

    Horovod fuses what is ready in one cycle (1 ms): the calibration runs here match one fused
    allreduce for dense and one allgather per layer for the sparse compressors, whose layers are
    ready on different cycles during backward. The torch engine's buckets (`dist.bucket_mb`)
    hold a kind's collectives until full or until backward's last gradient: allgathers fuse.
    """
    buffer_bytes: float
    allgathers: bool

    @classmethod
    def of(cls, engine: str, buffer_bytes: float | None = None) -> Fusion:
        """The engine's ("horovod" or "torch") packing, its default buffer unless given."""
        default = HOROVOD_FUSION if engine == "horovod" else TORCH_FUSION
        return cls(default.buffer_bytes if buffer_bytes is None else buffer_bytes, default.allgathers)


HOROVOD_FUSION = Fusion(64 * 2**20, allgathers=False)   # HOROVOD_FUSION_THRESHOLD (horovod.fusion_threshold_mb)
TORCH_FUSION = Fusion(25 * 2**20, allgathers=True)      # dist.bucket_mb


@dataclass(frozen=True)
class Layer:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_bytes(self) -> int:
        return FP32 * self.numel


@dataclass(frozen=True)
class Op:
    """One collective of one step: `nbytes` is this rank's payload, `dense_bytes` the fp32
    gradient it stands for. Collectives of one kind and `round` are fused (`fuse`)."""
    kind: Literal["allreduce", "allgather"]
    nbytes: float
    dense_bytes: float
    round: str = "grad"


@dataclass
class Method:
    """A column of the advice: `compressor` None is dense fp32. `ratios` are dense/wire per layer
    name (sparse methods); layers not in it use `default_ratio`. `source` says where they came from."""
    name: str
    compressor: Compressor | None = None
    ratios: Mapping[str, float] = field(default_factory=dict)
    default_ratio: float = float("nan")
    source: str = ""

    def policy(self, min_numel: int) -> Policy:
        return Policy(default=self.compressor, min_numel=min_numel)

    def ops(self, layers: list[Layer], min_numel: int = 1024) -> list[Op]:
        policy, ops = self.policy(min_numel), []
        for layer in layers:
            meta = torch.empty(layer.shape, device="meta")
            chosen = policy.resolve(layer.name, meta) if self.compressor is not None else None
            if chosen is None or isinstance(chosen, NoCompression):
                round_ = "grad" if self.compressor is None or isinstance(chosen, NoCompression) else "bypass"
                ops.append(Op("allreduce", layer.dense_bytes, layer.dense_bytes, round_))
            elif isinstance(chosen, FP16):
                ops.append(Op("allreduce", layer.dense_bytes / 2, layer.dense_bytes))
            elif isinstance(chosen, LowRank):
                rows, cols = layer.shape[0], layer.numel // layer.shape[0]
                for i in range(chosen.power_iterations):
                    ops.append(Op("allreduce", FP32 * rows * chosen.rank, layer.dense_bytes / 2,
                                  "grad" if i == 0 else f"P{i}"))
                    ops.append(Op("allreduce", FP32 * cols * chosen.rank, layer.dense_bytes / 2, f"Q{i}"))
            elif chosen.kind == "allgather":
                ratio = self.ratios.get(layer.name, self.default_ratio)
                if not ratio > 0:
                    raise ValueError(f"{self.name}: no compression ratio for layer {layer.name}")
                ops.append(Op("allgather", layer.dense_bytes / ratio, layer.dense_bytes))
            else:
                raise ValueError(f"{self.name}: no cost model for {chosen!r}")
        return ops


def fuse(ops: list[Op], fusion: Fusion, hierarchical: bool = False) -> list[Op]:
    """Collectives of one kind and round packed into buffers of at most `fusion.buffer_bytes`
    (greedy, in order); allgathers only where `fusion.allgathers` and not `hierarchical` (which
    runs each layer's allgather among the node leaders on its own)."""
    fused: list[Op] = []
    buckets: dict[tuple[str, str], list[Op]] = {}
    for op in ops:
        if op.kind == "allgather" and (hierarchical or not fusion.allgathers):
            fused.append(op)
            continue
        bucket = buckets.setdefault((op.kind, op.round), [])
        if bucket and bucket[-1].nbytes + op.nbytes <= fusion.buffer_bytes:
            last = bucket[-1]
            bucket[-1] = Op(op.kind, last.nbytes + op.nbytes, last.dense_bytes + op.dense_bytes, op.round)
        else:
            bucket.append(op)
    return [op for bucket in buckets.values() for op in bucket] + fused


def exchange_cost(ops: list[Op], ranks: int, network: Network, hierarchical: bool = False,
                  fusion: Fusion = HOROVOD_FUSION) -> tuple[Cost, int]:
    """The summed cost of one step's collectives after fusion, each paying its own α terms (the
    engines run them one after the other on one communication thread); and how many there are."""
    total, count = ZERO, 0
    for op in fuse(ops, fusion, hierarchical):
        if op.kind == "allreduce":
            cost = (hierarchical_allreduce if hierarchical else flat_allreduce)(op.nbytes, ranks, network)
        elif hierarchical:
            cost = hierarchical_allgatherv(op.nbytes, op.dense_bytes, ranks, network)
        else:
            cost = flat_allgatherv(op.nbytes, ranks, network)
        total, count = total + cost, count + 1
    return total, count


def payload_bytes(ops: list[Op]) -> float:
    """Bytes this rank hands to the network per step (what the step log's wire_bytes counts)."""
    return sum(op.nbytes for op in ops)


def received_bytes(ops: list[Op], ranks: int) -> float:
    """Bytes a rank receives from the sparse allgathers, which its decoder must scatter."""
    return sum(op.nbytes * (ranks - 1) for op in ops if op.kind == "allgather")
