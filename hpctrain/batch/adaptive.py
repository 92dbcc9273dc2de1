"""`AdaptiveBatch`: batch growth for one's own training loop, over `BatchOrchestrator`.

    adaptive = hpctrain.AdaptiveBatch(initial=64, max=512, policy="gns", optimizer=opt)
    for x, y in loader:                                   # loader over an AdaptiveBatchSampler(…, adaptive)
        for xb, yb in adaptive.micro_batches(x, y):       # gradient accumulation above max_local
            (loss_fn(model(xb), yb) * len(xb) / len(x)).backward()
        opt.step(); opt.zero_grad()
        decision = adaptive.step(loss=loss, samples=len(x))   # on every rank; None or a BatchDecision
    decision = adaptive.epoch_end(val_loss=val_loss)

Rank 0 decides and every rank applies the same decision at the same step (`step` and
`epoch_end` are collective). With the optimizer given, it measures the gradient norms the gns
policy needs and its learning rate follows the batch (rescaled, ramped over warmup_steps).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from hpctrain.batch.grad_norms import GradNormObserver
from hpctrain.batch.orchestrator import BatchDecision, BatchOrchestrator, BatchStats
from hpctrain.errors import UserError

__all__ = ["AdaptiveBatch", "BatchDecision"]


def _batch_config(options: dict[str, Any]) -> Any:
    """A validated BatchConfig from keyword options named as the `[batch]` config keys."""
    from hpctrain.config import BatchConfig, _validate_batch
    from hpctrain.schema import build

    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    try:
        cfg = build(BatchConfig, options, "batch")
        if cfg.initial <= 0 or cfg.growth_factor <= 0:
            raise UserError(f"config: batch.initial = {cfg.initial} and batch.growth_factor = "
                            f"{cfg.growth_factor} must be positive")
        if cfg.max and cfg.max < cfg.initial:
            raise UserError(f"config: batch.max = {cfg.max} is below batch.initial = {cfg.initial}")
        _validate_batch(cfg)
    except UserError as exc:
        raise UserError(re.sub(r"\bbatch\.(?=\w)", "", str(exc)).replace("config: ", "AdaptiveBatch: ")) from None
    return cfg


class AdaptiveBatch:
    """The global batch, its per-rank split and the learning rate, grown by a `[batch]` policy.

    Keyword options are the `[batch]` config keys (max_local, growth_factor, lr_scaling,
    warmup_steps, at_epochs, at_steps, plateau_metric, patience, min_delta, gns_ema, gns_factor,
    decide_every); see docs/library.md. `lr` is the base LR at `initial` (default: the
    optimizer's); with `manage_lr` the optimizer's param groups follow `self.lr`.
    """

    def __init__(self, initial: int = 128, max: int = 0, policy: str = "fixed", *, optimizer: Any = None,
                 lr: float | None = None, manage_lr: bool = True, world_size: int | None = None,
                 **options: Any):
        cfg = _batch_config(dict(options, initial=initial, max=max, policy=policy))
        if world_size is None:
            from hpctrain import comm
            world_size = comm.size()
        if cfg.initial % world_size:
            raise UserError(f"AdaptiveBatch: initial = {cfg.initial} is not divisible by the world size "
                            f"{world_size}; use a multiple of {world_size}")
        if lr is None:
            if optimizer is None:
                raise UserError("AdaptiveBatch: give lr= (the base learning rate at the initial batch) or optimizer=")
            lr = float(optimizer.param_groups[0]["lr"])
        if not lr > 0:
            raise UserError(f"AdaptiveBatch: lr = {lr} must be positive")
        try:
            self.orchestrator = BatchOrchestrator(cfg, lr, world_size,
                                                  getattr(optimizer, "backward_passes_per_step", 1))
        except UserError as exc:
            raise UserError(re.sub(r"\bbatch\.(?=\w)", "", f"AdaptiveBatch: {exc}")) from None
        self.base_lr = lr
        self.manage_lr = manage_lr
        self.steps = 0
        self.epochs = 0
        self.optimizer: Any = None
        self._group_lrs: list[float] = []
        self._norms = GradNormObserver()          # attached to the optimizer when the policy needs norms
        self._fresh_hook = False
        if optimizer is not None:
            self._attach(optimizer)

    @classmethod
    def from_config(cls, batch_cfg: Any, **kwargs: Any) -> "AdaptiveBatch":
        """From a `Config.batch` section (a `[batch]` table as `hpctrain train` reads it)."""
        return cls(**asdict(batch_cfg), **kwargs)

    # -- what the loop reads -------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, summed over ranks (an AdaptiveBatchSampler reads this)."""
        return self.orchestrator.global_batch

    @property
    def local_batch(self) -> int:
        """Samples per forward/backward pass on one rank (≤ max_local)."""
        return self.orchestrator.local_batch

    @property
    def accumulation(self) -> int:
        """Backward passes per optimizer step on one rank."""
        return self.orchestrator.accumulation

    @property
    def lr(self) -> float:
        """The learning rate for the next step (rescaled for the batch, ramped after a growth)."""
        return self.orchestrator.lr_at(self.steps + 1)

    @property
    def needs_grad_norms(self) -> bool:
        return self.orchestrator.needs_grad_norms

    def micro_batches(self, *tensors: Any) -> list[tuple[Any, ...]]:
        """Split one step's batch into `accumulation` passes (and tell the optimizer how many)."""
        n = len(tensors[0])
        passes = max(1, min(self.accumulation, n))
        if self.optimizer is not None and getattr(self.optimizer, "backward_passes_per_step", passes) != passes:
            self.optimizer.set_backward_passes_per_step(passes)
        return list(zip(*(t.tensor_split(passes) if hasattr(t, "tensor_split") else _split(t, passes)
                          for t in tensors)))

    # -- collective calls ----------------------------------------------------------------
    def step(self, loss: Any, optimizer: Any = None, samples: int | None = None) -> BatchDecision | None:
        """Call on every rank after each optimizer step. `loss`: the step's training loss (rank 0's
        decides); `samples`: this rank's samples in the step (default: its share of the global batch)."""
        if optimizer is not None and optimizer is not self.optimizer:
            self._attach(optimizer, during_step=True)
        self.steps += 1
        local = int(samples) if samples is not None else self.global_batch // self.orchestrator.world_size
        local_sq, global_sq = self._norms.take()
        decision = None
        if self.needs_grad_norms and not (math.isfinite(local_sq) and math.isfinite(global_sq)):
            if not self._fresh_hook:
                raise UserError("AdaptiveBatch.step: the gns policy needs the optimizer's gradient norms; pass the "
                                "hpctrain.DistributedOptimizer as optimizer= (fusion 'none' or 'backward')")
        else:
            value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
            decision = self.orchestrator.after_step(self.steps, self.epochs, BatchStats(
                value, local, local * self.orchestrator.world_size, local_sq, global_sq))
        self._fresh_hook = False
        self._set_lr()
        return decision

    def epoch_end(self, val_loss: float | None = None) -> BatchDecision | None:
        """Call on every rank at each epoch's end (after evaluation); rank 0's `val_loss` is used."""
        self.epochs += 1
        decision = self.orchestrator.after_epoch(self.steps, self.epochs, val_loss)
        self._set_lr()
        return decision

    # -- the optimizer -------------------------------------------------------------------
    def _attach(self, optimizer: Any, during_step: bool = False) -> None:
        """Measure gradient norms when the policy needs them; a hook made after this step's
        backward has none to give yet, so that one step is not observed (on every rank alike)."""
        self.optimizer = optimizer
        self._group_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        if self.needs_grad_norms:
            if not hasattr(optimizer, "register_gradient_observer"):
                raise UserError("AdaptiveBatch: policy 'gns' needs an hpctrain.DistributedOptimizer (it measures "
                                f"the local and averaged gradient norms); got {type(optimizer).__name__}")
            self._norms.detach()
            self._norms = GradNormObserver.attach(optimizer)
            self._fresh_hook = during_step
        self._set_lr()

    def _set_lr(self) -> None:
        if self.optimizer is None or not self.manage_lr:
            return
        scale = self.lr / self.base_lr
        for group, lr in zip(self.optimizer.param_groups, self._group_lrs):
            group["lr"] = lr * scale

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "orchestrator": self.orchestrator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        self.orchestrator.load_state_dict(state["orchestrator"])
        self._set_lr()


def _split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    return np.array_split(np.asarray(items), parts)
