"""Sparse payloads shared by the allgather compressors (TopK, Threshold, AdaComp).

One rank sends the chosen entries' `values` (fp32) and flat `indices` (int32: half the bytes
of int64) — or, for sign-only values, 16-bit signed gap codes — plus a one-element `counts`
tensor. After the allgather every payload is the concatenation over ranks, so `counts` has
one entry per rank: its length is the world size and its entries say which gathered entries
came from which rank, with no host round-trip.

Decoding scatters the gathered values into a dense tensor with `index_put_(accumulate=True)`,
which is deterministic on CUDA too (sorted, not atomics), so every rank computes the same
bits and replicas cannot drift apart.
"""
from __future__ import annotations

from typing import Any

import torch

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
    return scatter_mean(values, indices, counts.numel(), numel)


def scatter_mean(values: torch.Tensor, indices: torch.Tensor, world: int, numel: int) -> torch.Tensor:
    """Sum the gathered (index, value) pairs of all ranks into a dense vector and divide by `world`."""
    dense = torch.zeros(numel, dtype=torch.float32, device=values.device)
    return dense.index_put_((indices.long(),), values / world, accumulate=True)


GAP_LIMIT = torch.iinfo(torch.int16).max   # longest gap one 16-bit code can jump


def encode_signed_gaps(indices: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices and their signs → 2 bytes per entry (for sign-only payloads).

    Code j is ±(indices[j] − indices[j−1]) (the first counted from −1), negative for a
    negative value. A gap longer than GAP_LIMIT is bridged by 0 codes, each advancing
    GAP_LIMIT. Sent as uint8 pairs: every backend (MPI, NCCL, Gloo) can gather bytes.
    """
    gaps = torch.diff(indices, prepend=indices.new_full((1,), -1))
    if indices.numel() and int(gaps.max()) > GAP_LIMIT:     # rare: bridge long gaps with 0 codes
        fillers = (gaps - 1) // GAP_LIMIT
        gaps -= fillers * GAP_LIMIT
        slots = torch.arange(indices.numel(), device=indices.device) + fillers.cumsum(0)
        codes = gaps.new_zeros(indices.numel() + int(fillers.sum()))
        codes[slots] = torch.where(negative, -gaps, gaps)
    else:
        codes = torch.where(negative, -gaps, gaps)
    return codes.to(torch.int16).view(torch.uint8).view(-1, 2)


def decode_signed_gaps(gathered: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes gathered from all ranks (`counts` codes each) → (flat indices, signs ±1; 0 for fillers)."""
    codes = gathered.view(torch.int16).view(-1).long()
    steps = torch.where(codes == 0, GAP_LIMIT, codes.abs()).cumsum(0)
    starts = counts.long().cumsum(0) - counts
    before_rank = torch.cat([steps.new_zeros(1), steps])[starts]      # each rank restarts at −1
    indices = steps - 1 - torch.repeat_interleave(before_rank, counts, output_size=codes.numel())
    return indices, codes.sign()


def take_sent(flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The selected entries of the error-feedback buffer, zeroed there (they are sent in full)."""
    values = flat[indices]
    flat[indices] = 0
    return values


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
        return pack(take_sent(flat, indices), indices), grad

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        return like_grad(unpack_mean(received, ctx.numel()), ctx)
