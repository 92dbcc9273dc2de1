"""Codec time: compensate + encode + decode per rank per step, which no network hides.

Measured when possible (`hpctrain advise` times each compressor on the layer shapes with
benchmarks/codec.py's functions). Otherwise modelled as a multiple of `tensor.clone()` of the
same fp32 bytes, the unit benchmarks/codec.py reports, at the device's memory bandwidth:
clone of N entries reads and writes 8·N bytes. The multiples are the 4M-entry gradient-like
rows of benchmarks/results/2026-12-01.md (CPU, 1 thread; GPU multiples are not measured yet).
Sparse decoding also scatters the (P−1)·k gathered entries: `SCATTER_CLONES` clone-bytes per
received byte (random access), so decode grows with the world size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpctrain.cost.methods import Layer, Method

CLONE_MULTIPLES = {"none": 0.0, "fp16": 1.7, "topk": 110.0, "threshold": 3.9, "adacomp": 5.0,
                   "adacomp conv": 8.0, "lowrank": 22.8, "signsgd": 5.0}
SCATTER_CLONES = 4.0


@dataclass(frozen=True)
class CodecTime:
    """Seconds per step independent of P, plus seconds per byte received (the sparse scatter)."""
    fixed_s: float = 0.0
    per_received_byte_s: float = 0.0
    source: str = "none"

    def seconds(self, received_bytes: float) -> float:
        return self.fixed_s + self.per_received_byte_s * received_bytes


def clone_seconds(nbytes: float, memory_bytes_per_s: float) -> float:
    """A clone reads and writes the tensor once."""
    return 2 * nbytes / memory_bytes_per_s


def modelled(method: Method, layers: list[Layer], memory_bytes_per_s: float, min_numel: int = 1024) -> CodecTime:
    """CLONE_MULTIPLES × clone time over the layers the method compresses."""
    name = method.compressor.name if method.compressor is not None else "none"
    total = 0.0
    compressed = set(_compressed(method, layers, min_numel))
    for layer in layers:
        if layer.name in compressed:
            key = "adacomp conv" if name == "adacomp" and len(layer.shape) >= 3 else name
            total += CLONE_MULTIPLES.get(key, 0.0) * clone_seconds(layer.dense_bytes, memory_bytes_per_s)
    scatter = SCATTER_CLONES * clone_seconds(1.0, memory_bytes_per_s) if method.compressor is not None else 0.0
    gathers = method.compressor is not None and method.compressor.kind == "allgather"
    return CodecTime(total, scatter if gathers else 0.0,
                     f"modelled: {CLONE_MULTIPLES.get(name, 0):g}× clone at {memory_bytes_per_s / 1e9:g} GB/s")


def _compressed(method: Method, layers: list[Layer], min_numel: int) -> list[str]:
    if method.compressor is None:
        return []
    policy = method.policy(min_numel)
    return [layer.name for layer in layers
            if policy.resolve(layer.name, torch.empty(layer.shape, device="meta")) is not None]
