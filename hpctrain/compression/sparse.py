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

from typing import Any, Callable

import torch

from hpctrain.compression.base import Compressor, ParamState, compensate, like_grad

INDEX_LIMIT = torch.iinfo(torch.int32).max   # int32 indices address at most this many elements
THRESHOLD_FLOOR = torch.finfo(torch.float32).tiny   # selection bounds are floored here: exact zeros never go


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


def indices_at_least(values: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """Flat indices (sorted, int64) of the entries with values >= bound (broadcast).

    The hot path of the sparse codecs. On the CPU `nonzero` costs 1-3 ns per entry, but the
    masks here are mostly sparse: it runs on the mask read as 8-byte words, and only the words
    with a hit are split into bytes — 2-5× faster below ~2% density. Denser masks, and GPUs,
    take plain `nonzero`.
    """
    numel = values.numel()
    if values.device.type != "cpu":
        return (values >= bound).view(-1).nonzero().squeeze(1)
    mask = torch.empty(-(-numel // 8) * 8, dtype=torch.bool)
    torch.ge(values, bound, out=mask[:numel].view(values.shape))
    mask[numel:] = False
    words = mask.view(torch.int64)
    hit_words = words.nonzero().squeeze(1)
    if 4 * hit_words.numel() > words.numel():
        return mask.nonzero().squeeze(1)
    word, byte = words[hit_words].view(torch.uint8).view(-1, 8).nonzero().unbind(1)
    return hit_words[word] * 8 + byte


CPU_CHUNK = 1 << 20     # entries per slice: a slice's passes then stay in a CPU's L3 cache


def select_in_slices(flat: torch.Tensor, grad: torch.Tensor, align: int,
                     pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`pick(flat slice, grad slice)` → indices within the slice, over the whole tensor.

    A selection makes several passes (abs, compare, nonzero, ...). On a CPU a tensor larger than
    the cache is cut into slices of whole `align`-entry bins, so those passes read the cache
    instead of main memory (~2× faster at 25M entries); on a GPU it is one slice.
    """
    numel = flat.numel()
    step = max(align, CPU_CHUNK // align * align)
    if flat.device.type != "cpu" or numel <= step:
        return pick(flat, grad)
    parts = [pick(flat[start:start + step], grad[start:start + step]) + start for start in range(0, numel, step)]
    return torch.cat(parts)


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
