"""The model that scores: a checkpoint's, or a short pre-training run from the run config that
takes the same optimizer steps on any number of ranks (see blocks.py) and records, for
forgetting, whether each sample was classified correctly when it was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hpctrain import comm
from hpctrain.config import Config
from hpctrain.data import Splits
from hpctrain.data.scoring.blocks import GRAD_BLOCK, rank_blocks, to_device
from hpctrain.errors import UserError
from hpctrain.models import build_model

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class Trained:
    """A model to score with, and where it came from (provenance)."""
    model: nn.Module
    name: str
    step: int
    history: np.ndarray | None = None       # forgetting: [epochs, N] correctness of each presentation


def from_checkpoint(state: dict[str, Any], path: str, cfg: Config, splits: Splits, device: torch.device) -> Trained:
    """The checkpoint's model, refusing one whose weights do not fit this data."""
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: its weights do not fit model {cfg.model.name!r} on this data "
                        f"({str(exc).splitlines()[0]}); score the data it was trained on") from None
    return Trained(model.to(device).eval(), f"{cfg.model.name} ({path})", int(state.get("step", 0)))


def short_run(cfg: Config, splits: Splits, device: torch.device, epochs: int, seed: int, rank: int, size: int) -> Trained:
    """Train from scratch (initialised and shuffled by `seed`) for `epochs` on the train split, taking
    the same steps for any world size, and record whether each sample was classified correctly when
    it was trained on."""
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    extra = {"momentum": t.momentum} if t.optimizer == "sgd" else {}
    optimizer = OPTIMIZERS[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay, **extra)
    train, n, batch = splits.train, len(splits.train), cfg.batch.initial
    numel = sum(p.numel() for p in params)
    history = np.zeros((epochs, n), dtype=bool)      # this rank's presentations only; OR-ed at the end
    steps = 0
    with tqdm(total=epochs * -(-n // batch), desc="short run", unit="step", disable=rank != 0) as bar:
        for epoch in range(epochs):
            order = np.random.default_rng((seed, epoch)).permutation(n)
            for start in range(0, n, batch):
                members = order[start:start + batch]
                model.train()
                grads = []
                for lo, hi in rank_blocks(len(members), GRAD_BLOCK, rank, size):
                    x, y = to_device(train, members[lo:hi], device)
                    model.zero_grad(set_to_none=True)
                    logits = model(x)
                    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
                    grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
                    history[epoch, members[lo:hi]] = (logits.argmax(1) == y).cpu().numpy()
                local = torch.stack(grads) if grads else torch.zeros((0, numel), device=device)
                every = comm.get().allgather_async(local, name="hpctrain.score.grads").wait()
                flat = every.sum(dim=0) / len(members)     # block order: same sum for any world size
                for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                    p.grad = g.view_as(p).clone()
                optimizer.step()
                steps += 1
                bar.update()
    history = np.logical_or.reduce(comm.get().allgather_object(history, name="hpctrain.score.history"))
    return Trained(model.eval(), cfg.model.name, steps, history)
