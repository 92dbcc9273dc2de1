"""Gradient-like data for codec tests, benchmarks and `hpctrain advise`'s ratio estimates."""
from __future__ import annotations

import torch


def heavy_tailed_grads(shape: tuple[int, ...], steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Gaussian noise times a fixed per-weight magnitude e^N(0,1), as real layers have quiet and
    busy weights side by side (AdaComp sends about what it sends in training from these: ~45× on
    conv kernels, ~290× on fc layers; from plain noise 20×, 127×)."""
    magnitude = torch.exp(torch.randn(shape, generator=generator))
    return [magnitude * torch.randn(shape, generator=generator) for _ in range(steps)]
