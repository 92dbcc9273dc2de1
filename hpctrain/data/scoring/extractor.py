"""Embeddings for feature density: the scoring model's own `embed()`, or a frozen extractor
(a TorchScript or torch.export .pt2 file, or module:factory + a state dict)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hpctrain.errors import UserError

Embed = Callable[[torch.Tensor], torch.Tensor]


def embed_fn(model: nn.Module, what: str) -> Embed:
    """The model's penultimate features, flattened per sample."""
    if not hasattr(model, "embed"):
        raise UserError(f"{what} has no embed() method giving penultimate features; add one "
                        f"(see hpctrain/models.py) or pass --extractor")
    return lambda x: model.embed(x).flatten(1)


def load_extractor(spec: str, state: str | None, device: torch.device) -> tuple[Embed, str]:
    """A frozen feature extractor: a TorchScript or torch.export (.pt2) file, or `module:factory`
    (+ a state dict file)."""
    if Path(spec).is_file() and spec.endswith(".pt2"):
        try:
            module = torch.export.load(spec).module().to(device)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--extractor {spec}: not a torch.export program ({str(exc).splitlines()[0]}); "
                            f"save it with torch.export.save(torch.export.export(model, (x,)), path)") from None
        return (lambda x: module(x).flatten(1)), spec
    if Path(spec).is_file():
        try:
            module = torch.jit.load(spec, map_location=device)
        except RuntimeError as exc:
            raise UserError(f"--extractor {spec}: not a TorchScript file ({str(exc).splitlines()[0]}); "
                            f"save it with torch.jit.save(torch.jit.script(model), path)") from None
    elif ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            module = getattr(importlib.import_module(module_name), attr)()
        except (ImportError, AttributeError) as exc:
            raise UserError(f"--extractor {spec}: cannot load ({exc}); give an importable module:factory") from None
        if state:
            try:
                module.load_state_dict(torch.load(state, map_location="cpu"))
            except (OSError, RuntimeError) as exc:
                raise UserError(f"--extractor-state {state}: cannot load into {spec} ({str(exc).splitlines()[0]})") from None
        module = module.to(device)
    else:
        raise UserError(f"--extractor {spec!r} is neither an existing TorchScript file nor module:factory")
    module.eval()
    forward = module.embed if hasattr(module, "embed") else module
    return (lambda x: forward(x).flatten(1)), spec
