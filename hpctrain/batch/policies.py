"""When to grow the batch: pure policies that turn statistics into a yes/no (and why).

A policy never touches torch or MPI. The orchestrator (rank 0) builds an `Observation` at the
points the policy asks to be consulted (`consult_every_steps`, `consult_at_epoch_end`, or the
steps in `consult_at_steps`) and the policy answers with a `Grow` or None. How much to grow,
the learning rate and the cap at `batch.max` are the orchestrator's business, so every policy
answers the same small question: "is now the time to grow?".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Observation:
    """What the policy may look at when it is consulted (None: not measured at this point)."""
    step: int                          # optimizer steps done so far
    epochs_done: int                   # completed epochs
    global_batch: int
    epoch_end: bool = False
    val_loss: float | None = None
    train_loss: float | None = None    # mean training loss since the last consultation
    noise_scale: float | None = None   # smoothed gradient noise scale B_noise


@dataclass(frozen=True)
class Grow:
    """A policy's answer when the batch should grow: why, and the number that triggered it."""
    reason: str
    statistic: float


class GrowthPolicy:
    """Base: consulted nowhere, never grows, no state. Subclasses override what they need."""
    consult_every_steps = 0            # 0: not on a step cadence
    consult_at_epoch_end = False
    needs_step_stats = False           # wants the per-step reduced loss / gradient norms

    def consult_at_steps(self) -> frozenset[int]:
        return frozenset()

    def decide(self, obs: Observation) -> Grow | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedPolicy(GrowthPolicy):
    """Never grow."""


class SchedulePolicy(GrowthPolicy):
    """Grow when epoch `e` of `at_epochs` begins (after e epochs are done) or after step `s` of `at_steps`."""

    def __init__(self, at_epochs: list[int], at_steps: list[int]):
        self.at_epochs = frozenset(at_epochs)
        self.at_steps = frozenset(at_steps)
        self.consult_at_epoch_end = bool(self.at_epochs)

    def consult_at_steps(self) -> frozenset[int]:
        return self.at_steps

    def decide(self, obs: Observation) -> Grow | None:
        if obs.epoch_end and obs.epochs_done in self.at_epochs:
            return Grow(f"schedule: epoch {obs.epochs_done} begins", float(obs.epochs_done))
        if not obs.epoch_end and obs.step in self.at_steps:
            return Grow(f"schedule: step {obs.step} done", float(obs.step))
        return None


class PlateauPolicy(GrowthPolicy):
    """Grow when the monitored loss has not improved by the fraction `min_delta` for `patience` checks.

    `metric = "val_loss"` is checked at each epoch end; `"train_loss"` (the mean training loss
    over the last `every` steps, a smoothed loss) every `every` steps. After a growth the
    patience counter restarts, so the next growth needs a fresh plateau.
    """

    def __init__(self, metric: str, patience: int, min_delta: float, every: int):
        if metric not in ("val_loss", "train_loss"):
            raise ValueError(f"unknown plateau metric {metric!r}")
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.consult_at_epoch_end = metric == "val_loss"
        self.consult_every_steps = every if metric == "train_loss" else 0
        self.needs_step_stats = metric == "train_loss"
        self.best = math.inf
        self.stale = 0

    def decide(self, obs: Observation) -> Grow | None:
        value = getattr(obs, self.metric)
        if value is None:
            return None
        if self.best == math.inf or value < self.best - self.min_delta * abs(self.best):
            self.best, self.stale = value, 0
            return None
        self.stale += 1
        if self.stale < self.patience:
            return None
        self.stale = 0
        return Grow(f"plateau: {self.metric} not {self.min_delta:.1%} below its best {self.best:.4g} "
                    f"for {self.patience} checks", float(value))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale = float(state["best"]), int(state["stale"])


class NoiseScalePolicy(GrowthPolicy):
    """Grow while `factor` × the smoothed gradient noise scale B_noise exceeds the global batch.

    McCandlish et al. (2018): to reach a loss, a batch B takes S = S_min (1 + B_noise/B) steps and
    E = E_min (1 + B/B_noise) samples, so B = B_noise (factor 1, the critical batch) costs twice
    the minimum of each; B = k B_noise costs (1 + 1/k) S_min steps and (1 + k) E_min samples —
    `factor` is that steps-for-samples trade. B_noise grows as the loss falls, and so does the batch.
    """

    needs_step_stats = True

    def __init__(self, every: int, factor: float):
        self.consult_every_steps = every
        self.factor = factor

    def decide(self, obs: Observation) -> Grow | None:
        if obs.noise_scale is None or obs.epoch_end:
            return None
        if self.factor * obs.noise_scale > obs.global_batch:
            return Grow(f"gns: {self.factor:g} x noise scale {obs.noise_scale:.4g} > batch {obs.global_batch}",
                        obs.noise_scale)
        return None


def build_policy(batch_cfg: Any) -> GrowthPolicy:
    """The policy named by `[batch] policy`, configured from the same section."""
    name = batch_cfg.policy
    if name == "fixed":
        return FixedPolicy()
    if name == "schedule":
        return SchedulePolicy(batch_cfg.at_epochs, batch_cfg.at_steps)
    if name == "plateau":
        return PlateauPolicy(batch_cfg.plateau_metric, batch_cfg.patience, batch_cfg.min_delta,
                             batch_cfg.decide_every)
    if name == "gns":
        return NoiseScalePolicy(batch_cfg.decide_every, batch_cfg.gns_factor)
    raise ValueError(f"unknown batch policy {name!r}")
