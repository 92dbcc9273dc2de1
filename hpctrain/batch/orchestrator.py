"""Rank 0 decides the batch size; every rank applies the same decision at the same step.

Each step every rank hands its statistics to `after_step` (and the validation loss to
`after_epoch`). The gns policy's per-rank noise estimates are averaged over ranks with one
tiny allreduce per step, so all ranks hold the same smoothed values (and the same checkpoint
state). At the policy's consultation points — known to every rank from the config alone —
rank 0 alone asks the policy and broadcasts one `BatchDecision` (or None); every rank then
applies it before the next step. Growing multiplies the global batch by `growth_factor` up to
`max`; the per-rank part above `max_local` is reached by gradient accumulation; the learning
rate is rescaled from the base LR and ramps linearly to its new value over `warmup_steps`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpctrain import comm
from hpctrain.batch.gns import NoiseScaleEstimator, unbiased_estimates
from hpctrain.batch.policies import Grow, Observation, build_policy
from hpctrain.errors import UserError


@dataclass(frozen=True)
class BatchDecision:
    """One growth, decided after optimizer step `step` and applied from step `step + 1` on."""
    step: int
    old_batch: int
    global_batch: int
    local_batch: int          # samples per forward/backward pass on one rank (≤ max_local)
    accumulation: int         # backward passes per optimizer step on one rank
    old_lr: float
    lr: float                 # the LR reached once the warmup is over
    reason: str
    statistic: float

    def event_row(self) -> dict[str, Any]:
        """The row for the step log's `events` group."""
        return {"step": self.step, "old_batch": self.old_batch, "new_batch": self.global_batch,
                "old_lr": self.old_lr, "new_lr": self.lr, "reason": self.reason, "statistic": self.statistic}


@dataclass
class BatchStats:
    """One rank's statistics of the step just done."""
    loss: float                       # training loss of the step, averaged over ranks
    local_samples: int                # samples this rank used in the step
    global_samples: int               # samples all ranks used in the step
    local_sqnorm: float = math.nan    # |g_local|², before compression
    global_sqnorm: float = math.nan   # |g_global|², after the exchange


def split_local(global_batch: int, world_size: int, max_local: int, min_accumulation: int = 1) -> tuple[int, int]:
    """(local batch, accumulation steps) so that one rank's share fits in `max_local` (0: no cap)."""
    per_rank = global_batch // world_size
    accumulation = max(min_accumulation, -(-per_rank // max_local) if max_local else 1)
    return -(-per_rank // accumulation), accumulation


def scaled_lr(base_lr: float, batch: int, initial: int, how: str) -> float:
    """The base LR (tuned for the initial batch) rescaled for `batch`: linear, sqrt or none."""
    ratio = batch / initial
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[how]


def check_batch_launch(batch_cfg: Any, world_size: int) -> None:
    """Reject [batch] settings that cannot work with this many ranks, in one line."""
    if batch_cfg.policy != "fixed" and batch_cfg.max % world_size:
        raise UserError(f"batch.max = {batch_cfg.max} is not divisible by world size {world_size}; "
                        f"use a multiple of {world_size}")
    if batch_cfg.policy == "gns" and world_size < 2:
        raise UserError("batch.policy = 'gns' compares per-rank and global gradients, so it needs at "
                        "least 2 ranks; launch with mpirun -np 2 or more, or pick another policy")


class BatchOrchestrator:
    """Holds the current global batch and LR; `after_step`/`after_epoch` are collective calls."""

    def __init__(self, batch_cfg: Any, base_lr: float, world_size: int, min_accumulation: int = 1):
        check_batch_launch(batch_cfg, world_size)
        self.cfg = batch_cfg
        self.base_lr = base_lr
        self.world_size = world_size
        self.min_accumulation = min_accumulation
        self.policy = build_policy(batch_cfg)
        self.estimator = NoiseScaleEstimator(batch_cfg.gns_ema)
        self.max_batch = batch_cfg.max if batch_cfg.policy != "fixed" else batch_cfg.initial
        self.global_batch = batch_cfg.initial
        self.local_batch, self.accumulation = self._split(self.global_batch)
        self._lr_from = self._lr_to = base_lr
        self._warmup_from_step = 0
        self._loss_sum = 0.0
        self._loss_steps = 0

    @property
    def needs_grad_norms(self) -> bool:
        """Whether the optimizer must measure local/global gradient squared norms (gns only)."""
        return self.cfg.policy == "gns"

    def lr_at(self, step: int) -> float:
        """LR for optimizer step `step` (1-based): linear ramp from the old to the new LR after a growth."""
        warmup = self.cfg.warmup_steps
        if warmup == 0 or self._lr_from == self._lr_to:
            return self._lr_to
        done = min(1.0, max(0, step - self._warmup_from_step) / warmup)
        return self._lr_from + (self._lr_to - self._lr_from) * done

    # -- collective entry points ---------------------------------------------------------
    def after_step(self, step: int, epochs_done: int, stats: BatchStats) -> BatchDecision | None:
        """Call on every rank after optimizer step `step`; returns the decision to apply, if any."""
        if self.global_batch >= self.max_batch:      # fully grown: nothing left to decide or reduce
            return None
        if self.policy.needs_step_stats:
            self._observe(stats)
        every = self.policy.consult_every_steps
        if not ((every and step % every == 0) or step in self.policy.consult_at_steps()):
            return None
        obs = Observation(step=step, epochs_done=epochs_done, global_batch=self.global_batch,
                          train_loss=self._loss_sum / self._loss_steps if self._loss_steps else None,
                          noise_scale=self.estimator.noise_scale)
        self._loss_sum, self._loss_steps = 0.0, 0
        return self._decide(obs)

    def after_epoch(self, step: int, epochs_done: int, val_loss: float | None) -> BatchDecision | None:
        """Call on every rank at each epoch end (after evaluation); rank 0's `val_loss` is used."""
        if not self.policy.consult_at_epoch_end or self.global_batch >= self.max_batch:
            return None
        return self._decide(Observation(step=step, epochs_done=epochs_done, global_batch=self.global_batch,
                                        epoch_end=True, val_loss=val_loss))

    def _observe(self, stats: BatchStats) -> None:
        """Add the step's loss to the window; average the noise estimates over ranks (same on all)."""
        self._loss_sum += stats.loss
        self._loss_steps += 1
        if self.needs_grad_norms:
            estimates = unbiased_estimates(stats.local_sqnorm, stats.global_sqnorm,
                                           stats.local_samples, stats.global_samples)
            grad_sqnorm, trace = comm.get().allreduce_scalars(list(estimates), name="hpctrain.batch.gns")
            self.estimator.update(grad_sqnorm, trace)

    def _decide(self, obs: Observation) -> BatchDecision | None:
        """Rank 0 asks the policy; its answer (and the policy's state) reaches every rank."""
        decision, policy_state = None, None
        if comm.is_root():
            grow = self.policy.decide(obs)
            if grow is not None:
                decision = self.plan(obs.step, grow)
            policy_state = self.policy.state_dict()
        decision, policy_state = comm.get().broadcast_object((decision, policy_state), name="hpctrain.batch.decision")
        self.policy.load_state_dict(policy_state)
        if decision is not None:
            self.apply(decision)
        return decision

    # -- the decision itself (pure) ------------------------------------------------------
    def _split(self, global_batch: int) -> tuple[int, int]:
        return split_local(global_batch, self.world_size, self.cfg.max_local, self.min_accumulation)

    def plan(self, step: int, grow: Grow) -> BatchDecision:
        """The decision a growth after `step` amounts to (pure: nothing changes until `apply`)."""
        new_batch = min(self.global_batch * self.cfg.growth_factor, self.max_batch)
        local_batch, accumulation = self._split(new_batch)
        return BatchDecision(step=step, old_batch=self.global_batch, global_batch=new_batch,
                             local_batch=local_batch, accumulation=accumulation,
                             old_lr=self.lr_at(step),
                             lr=scaled_lr(self.base_lr, new_batch, self.cfg.initial, self.cfg.lr_scaling),
                             reason=grow.reason, statistic=grow.statistic)

    def apply(self, decision: BatchDecision) -> None:
        self.global_batch = decision.global_batch
        self.local_batch, self.accumulation = decision.local_batch, decision.accumulation
        self._lr_from, self._lr_to = decision.old_lr, decision.lr
        self._warmup_from_step = decision.step

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_batch": self.global_batch, "lr_from": self._lr_from, "lr_to": self._lr_to,
                "warmup_from_step": self._warmup_from_step, "loss_sum": self._loss_sum,
                "loss_steps": self._loss_steps, "policy": self.policy.state_dict(),
                "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_batch = int(state["global_batch"])
        self.local_batch, self.accumulation = self._split(self.global_batch)
        self._lr_from, self._lr_to = float(state["lr_from"]), float(state["lr_to"])
        self._warmup_from_step = int(state["warmup_from_step"])
        self._loss_sum, self._loss_steps = float(state["loss_sum"]), int(state["loss_steps"])
        self.policy.load_state_dict(state["policy"])
        self.estimator.load_state_dict(state["estimator"])
