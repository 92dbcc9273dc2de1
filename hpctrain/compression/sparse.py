"""Sparse payloads shared by the allgather compressors (TopK, Threshold, AdaComp).

One rank sends the chosen entries' `values` (fp32) and flat `indices` (int32: half the bytes
of int64) — or, for sign-only values, 16-bit signed gap codes (`kernels.send_signs`) — plus a
one-element `counts` tensor. After the allgather every payload is the concatenation over
ranks, so `counts` has one entry per rank: its length is the world size and its entries say
which gathered entries came from which rank, with no host round-trip.

Decoding scatters the gathered values into a dense tensor in a fixed order (a loop on the CPU,
`index_put_(accumulate=True)` on CUDA, sorted rather than atomic), so every rank computes the
same bits and replicas cannot drift apart.
"""
from __future__ import annotations

from typing import Any

import torch

from hpctrain.compression import kernels
from hpctrain.compression.base import Compressor, ParamState, compensate, like_grad

INDEX_LIMIT = torch.iinfo(torch.int32).max   # int32 indices address at most this many elements


def fits_int32(shape: torch.Size) -> bool:
    """Whether flat int32 indices can address every element of this shape."""
    return shape.numel() < INDEX_LIMIT


def pack(values: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
    """This rank's payloads: [values fp32, indices int32, counts int32 [1]]."""
    return [values.to(torch.float32), indices.to(torch.int32), count_payload(indices)]


def count_payload(rows: torch.Tensor) -> torch.Tensor:
    """[len(rows)] as an int32 tensor on the same device (a fill, not a host copy)."""
    return torch.full((1,), rows.shape[0], dtype=torch.int32, device=rows.device)


def unpack_mean(received: list[torch.Tensor], numel: int) -> torch.Tensor:
    """Gathered [values, indices, counts] → the flat fp32 mean over ranks."""
    values, indices, counts = received
    return kernels.scatter_mean(values, indices, counts.numel(), numel)


class SparseCompressor(Compressor):
    """An allgather compressor with error feedback that sends chosen entries exactly.

    Subclasses only decide which entries go (`select`); sending them, keeping the rest as the
    residual and averaging what all ranks sent is shared here.
    """

    kind = "allgather"
    error_feedback = True

    def applies_to(self, shape: torch.Size) -> bool:
        return fits_int32(shape)

    def select(self, flat: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        """Flat indices to send, given gradient + residual (`flat`, fp32) and the raw gradient."""
        raise NotImplementedError

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        flat = compensate(grad, state).view(-1)
        indices = self.select(flat, grad, state)
        return pack(kernels.take_sent(flat, indices), indices), grad

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        return like_grad(unpack_mean(received, ctx.numel()), ctx)
