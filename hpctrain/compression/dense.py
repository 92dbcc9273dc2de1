"""Dense baselines: plain fp32 allreduce, and fp16 on the wire (Horovod's own Compression.fp16)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpctrain.compression.base import Compressor, ParamState, like_grad


@dataclass(frozen=True)
class NoCompression(Compressor):
    """Send the gradient as it is (the dense allreduce every peer does)."""

    name = "none"

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        return [grad.detach().reshape(-1)], grad.shape

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        return received[0].view(ctx)


@dataclass(frozen=True)
class FP16(Compressor):
    """Halve the bytes by sending fp16; no memory (the rounding error is below SGD noise)."""

    name = "fp16"

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        return [grad.detach().reshape(-1).to(torch.float16)], grad

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        return like_grad(received[0], ctx)
