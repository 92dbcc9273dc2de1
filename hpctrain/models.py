"""Built-in models and the `package.module:factory` hook for user models."""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from hpctrain.errors import UserError


class CNN1D(nn.Module):
    """A small 1-D CNN for MNIST-1D (~94% validation accuracy); `embed` gives penultimate features."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32, hidden: int = 128):
        super().__init__()
        (length,) = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * ((length + 3) // 4), hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class MLP(nn.Module):
    """A plain MLP on flattened inputs; `width`/`depth` make it as communication-heavy as wanted."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 256, depth: int = 2):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class Denoiser(nn.Module):
    """A small residual conv denoiser for restoration (regression): `depth` conv layers of `channels`
    predict the noise, subtracted from the input, so the output has the input's shape. 1-D samples
    (L,) use Conv1d, 2-D samples (H, W) Conv2d. `num_classes` is the number of outputs per sample
    (what `hpctrain train` passes for regression): it must equal the input's size."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32, depth: int = 3,
                 kernel: int = 5):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        if num_classes != size or len(input_shape) not in (1, 2):
            raise TypeError(f"denoiser maps a sample of shape {tuple(input_shape)} (1-D or 2-D) to one of the same "
                            f"size, but the targets have {num_classes} values per sample")
        conv = nn.Conv1d if len(input_shape) == 1 else nn.Conv2d
        layers: list[nn.Module] = []
        width = 1
        for _ in range(depth - 1):
            layers += [conv(width, channels, kernel, padding=kernel // 2), nn.ReLU()]
            width = channels
        layers.append(conv(width, 1, kernel, padding=kernel // 2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x.unsqueeze(1)).squeeze(1)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"cnn1d": CNN1D, "mlp": MLP, "denoiser": Denoiser}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, args: dict[str, Any]) -> nn.Module:
    """A built-in model by name, or `package.module:factory(input_shape=, num_classes=, **args)`.
    `num_classes` is the outputs per sample: classes, or a regression target's element count."""
    if name in BUILTIN_MODELS:
        factory = BUILTIN_MODELS[name]
    elif ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"model.name = {name!r} cannot be loaded ({exc}); check the module is importable "
                            f"on every rank and defines {attr!r}") from None
    else:
        raise UserError(f"model.name = {name!r}: choose one of {', '.join(BUILTIN_MODELS)} or give package.module:factory")
    try:
        return factory(input_shape=input_shape, num_classes=num_classes, **args)
    except TypeError as exc:
        raise UserError(f"model {name!r} rejected model.args {args}: {exc}") from None
