"""AdaComp: adaptive residual gradient compression (Chen et al., AAAI 2018).

Per layer: G = residue + gradient and H = G + gradient. G is cut into bins of L_T entries
(`conv_bin` for convolution kernels, `fc_bin` otherwise); in every bin each entry whose |H|
reaches the bin's largest |G| is sent. The latest gradient thus gets a push: entries that are
large and still growing go first, and how many go is set by the data, not by a global ratio.
Quantised, an entry is sent as sign(G) × one per-layer scale (mean |G| of the sent
entries), and the sign rides in the position code (a signed 16-bit gap to the previous sent
entry, see `sparse.encode_signed_gaps`), so each sent entry costs 2 bytes on the wire.
Residue = G − what was sent.
"""
from __future__ import annotations

from typing import Any

import torch

from hpctrain.compression import kernels, sparse
from hpctrain.compression.base import ParamState, compensate, like_grad
from hpctrain.errors import UserError


class AdaComp(sparse.SparseCompressor):
    """Self-tuning sparsification: per bin, send what reaches the bin's largest residue."""

    name = "adacomp"

    def __init__(self, conv_bin: int = 50, fc_bin: int = 500, quantize: bool = True):
        for key, value in (("conv_bin", conv_bin), ("fc_bin", fc_bin)):
            if value < 1:
                raise UserError(f"AdaComp({key}={value}): the bin length must be a positive number of entries")
        self.conv_bin = conv_bin
        self.fc_bin = fc_bin
        self.quantize = quantize

    def bin_length(self, shape: torch.Size) -> int:
        """L_T: convolution kernels (3 or more dims) use `conv_bin`, the rest `fc_bin`."""
        return self.conv_bin if len(shape) >= 3 else self.fc_bin

    def select(self, flat: torch.Tensor, grad: torch.Tensor, state: ParamState) -> torch.Tensor:
        return kernels.reaching_bin_max(flat, grad.detach().view(-1), self.bin_length(grad.shape))

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        if not self.quantize:
            return super().encode(grad, state)
        flat = compensate(grad, state).view(-1)
        indices = self.select(flat, grad, state)
        chosen = flat[indices]
        negative = chosen < 0
        scale = chosen.abs().sum() / max(indices.numel(), 1)
        flat[indices] = chosen - torch.where(negative, -scale, scale)
        codes = sparse.encode_signed_gaps(indices, negative)
        return [codes, sparse.count_payload(codes), scale.view(1)], grad

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        if not self.quantize:
            return super().decode(received, ctx, state)
        codes, counts, scales = received
        indices, signs = sparse.decode_signed_gaps(codes, counts)
        values = signs * torch.repeat_interleave(scales, counts, output_size=indices.numel())
        return like_grad(sparse.scatter_mean(values, indices, counts.numel(), ctx.numel()), ctx)
