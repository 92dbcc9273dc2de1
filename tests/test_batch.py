"""Batch growth on one process: policies on synthetic statistics, the noise-scale estimator on
gradients with known noise, the local-batch split, LR scaling and warmup, config checks."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from hpctrain.batch import (BatchOrchestrator, Grow, NoiseScaleEstimator, Observation, build_policy,
                            split_local, unbiased_estimates)
from hpctrain.batch.orchestrator import check_batch_launch, scaled_lr
from hpctrain.batch.policies import NoiseScalePolicy, PlateauPolicy, SchedulePolicy
from hpctrain.config import BatchConfig, config_from_dict
from hpctrain.errors import UserError


def obs(step: int = 10, batch: int = 32, **kw) -> Observation:
    return Observation(step=step, epochs_done=kw.pop("epochs_done", 0), global_batch=batch, **kw)


# -- policies ------------------------------------------------------------------------------
def test_fixed_policy_never_grows_and_is_never_consulted():
    policy = build_policy(BatchConfig())
    assert policy.decide(obs(noise_scale=1e9, val_loss=1.0, epoch_end=True)) is None
    assert (policy.consult_every_steps, policy.consult_at_epoch_end, policy.consult_at_steps()) == (0, False, frozenset())


def test_schedule_grows_at_listed_epochs_and_steps_only():
    policy = SchedulePolicy(at_epochs=[2, 4], at_steps=[7])
    assert policy.consult_at_epoch_end and policy.consult_at_steps() == {7}
    grown = [e for e in range(1, 6) if policy.decide(obs(epochs_done=e, epoch_end=True))]
    assert grown == [2, 4]
    assert policy.decide(obs(step=7)) == Grow("schedule: step 7 done", 7.0)
    assert policy.decide(obs(step=8)) is None
    assert policy.decide(obs(step=7, epoch_end=True, epochs_done=1)) is None


def test_plateau_grows_after_patience_checks_without_improvement_then_restarts():
    policy = PlateauPolicy("val_loss", patience=2, min_delta=0.01, every=20)
    assert policy.consult_at_epoch_end and not policy.needs_step_stats
    losses = [1.0, 0.8, 0.795, 0.81, 0.7, 0.71, 0.705, 0.69, 0.6]
    decisions = [policy.decide(obs(val_loss=v, epoch_end=True)) for v in losses]
    # 0.795 is not 1 % below 0.8 (stale 1), 0.81 is worse (stale 2) → grow; counter restarts.
    assert [d is not None for d in decisions] == [False, False, False, True, False, False, True, False, False]
    assert decisions[3].statistic == 0.81 and "val_loss" in decisions[3].reason
    assert policy.decide(obs(val_loss=None, epoch_end=True)) is None


def test_plateau_on_train_loss_is_consulted_every_n_steps_and_checkpoints_its_state():
    policy = PlateauPolicy("train_loss", patience=1, min_delta=0.0, every=5)
    assert policy.consult_every_steps == 5 and policy.needs_step_stats and not policy.consult_at_epoch_end
    assert policy.decide(obs(train_loss=2.0)) is None
    restored = PlateauPolicy("train_loss", patience=1, min_delta=0.0, every=5)
    restored.load_state_dict(policy.state_dict())
    assert restored.decide(obs(train_loss=2.5)) == policy.decide(obs(train_loss=2.5)) is not None


def test_gns_policy_grows_while_the_noise_scale_exceeds_the_batch():
    policy = NoiseScalePolicy(every=10, factor=1.0)
    assert policy.consult_every_steps == 10 and policy.needs_step_stats
    assert policy.decide(obs(batch=64, noise_scale=100.0)).statistic == 100.0
    assert policy.decide(obs(batch=128, noise_scale=100.0)) is None
    assert policy.decide(obs(batch=64, noise_scale=None)) is None
    assert policy.decide(obs(batch=64, noise_scale=math.inf)) is not None


def test_gns_factor_scales_the_batch_the_noise_scale_allows():
    """factor k: grow while k × B_noise > batch, so the batch ends near k × B_noise."""
    policy = build_policy(BatchConfig(policy="gns", max=512, gns_factor=4.0))
    grow = policy.decide(obs(batch=256, noise_scale=100.0))
    assert grow.statistic == 100.0 and grow.reason == "gns: 4 x noise scale 100 > batch 256"
    assert policy.decide(obs(batch=512, noise_scale=100.0)) is None
    assert NoiseScalePolicy(every=10, factor=0.5).decide(obs(batch=64, noise_scale=100.0)) is None


# -- gradient noise scale ----------------------------------------------------------------------
def _simulated_steps(rng, mu, sigma, ranks, b_small, steps):
    """Per-step (mean over ranks of the unbiased estimates), from per-sample grads g = mu + sigma*eps."""
    for _ in range(steps):
        grads = mu + sigma * rng.standard_normal((ranks, b_small, mu.size))
        local = grads.mean(axis=1)
        big = float(np.sum(local.mean(axis=0) ** 2))
        per_rank = [unbiased_estimates(float(np.sum(g ** 2)), big, b_small, ranks * b_small) for g in local]
        yield np.mean(per_rank, axis=0)


@pytest.mark.parametrize("b_small", [4, 16])
def test_noise_scale_matches_known_gradient_noise(b_small):
    rng = np.random.default_rng(0)
    dim, sigma = 50, 0.5
    mu = rng.standard_normal(dim)
    mu /= np.linalg.norm(mu)                                 # |G|² = 1
    true_trace = sigma ** 2 * dim                            # tr(Σ) = 12.5 = B_noise
    estimator = NoiseScaleEstimator(ema=0.99)
    estimates = np.array(list(_simulated_steps(rng, mu, sigma, ranks=4, b_small=b_small, steps=3000)))
    for grad_sqnorm, trace in estimates:
        estimator.update(grad_sqnorm, trace)
    # The per-step estimates are unbiased ...
    assert estimates[:, 0].mean() == pytest.approx(1.0, rel=0.03)
    assert estimates[:, 1].mean() == pytest.approx(true_trace, rel=0.03)
    # ... and the smoothed ratio lands on tr(Σ)/|G|², whatever the batch sizes.
    assert estimator.noise_scale == pytest.approx(true_trace, rel=0.15)
    assert estimator.grad_sqnorm == pytest.approx(1.0, rel=0.15)
    assert estimator.trace == pytest.approx(true_trace, rel=0.15)


def test_estimator_is_none_before_data_inf_when_signal_vanishes_and_checkpointable():
    estimator = NoiseScaleEstimator(ema=0.9)
    assert estimator.noise_scale is None
    estimator.update(2.0, 10.0)
    assert estimator.noise_scale == pytest.approx(5.0)       # bias correction: first value exactly
    restored = NoiseScaleEstimator(ema=0.9)
    restored.load_state_dict(estimator.state_dict())
    assert restored.noise_scale == estimator.noise_scale
    estimator.update(-50.0, 10.0)
    assert estimator.noise_scale == math.inf
    with pytest.raises(ValueError):
        unbiased_estimates(1.0, 1.0, 32, 32)


# -- orchestration maths -------------------------------------------------------------------
@pytest.mark.parametrize("global_batch, world, max_local, expected", [
    (32, 4, 0, (8, 1)), (512, 4, 64, (64, 2)), (384, 4, 64, (48, 2)), (520, 4, 64, (44, 3)), (64, 4, 64, (16, 1)),
])
def test_split_local_caps_the_local_batch_and_covers_the_share(global_batch, world, max_local, expected):
    local, accumulation = split_local(global_batch, world, max_local)
    assert split_local(global_batch, world, max_local, min_accumulation=4)[1] == max(4, accumulation)
    assert (local, accumulation) == expected
    assert local * accumulation >= global_batch // world > local * (accumulation - 1)
    assert max_local == 0 or local <= max_local


def test_lr_scaling_rules():
    assert scaled_lr(0.1, 128, 32, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 128, 32, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 128, 32, "none") == pytest.approx(0.1)


def _orchestrator(**kw) -> BatchOrchestrator:
    cfg = BatchConfig(**{"initial": 32, "max": 96, "policy": "gns", "max_local": 16, "warmup_steps": 4, **kw})
    return BatchOrchestrator(cfg, base_lr=0.1, world_size=4)


def test_growth_caps_at_max_and_ramps_the_lr_linearly():
    orch = _orchestrator()
    assert (orch.global_batch, orch.local_batch, orch.accumulation, orch.lr_at(1)) == (32, 8, 1, 0.1)
    first = orch.plan(10, Grow("test", 1.0))
    assert (first.old_batch, first.global_batch, first.local_batch, first.accumulation) == (32, 64, 16, 1)
    assert (first.old_lr, first.lr) == (0.1, pytest.approx(0.2))
    orch.apply(first)
    assert [orch.lr_at(s) for s in (11, 12, 14, 20)] == pytest.approx([0.125, 0.15, 0.2, 0.2])
    second = orch.plan(12, Grow("test", 2.0))               # mid-warmup: starts from the LR in use
    assert (second.global_batch, second.local_batch, second.accumulation) == (96, 12, 2)
    assert (second.old_lr, second.lr) == (pytest.approx(0.15), pytest.approx(0.3))
    assert second.event_row() == {"step": 12, "old_batch": 64, "new_batch": 96, "old_lr": second.old_lr,
                                  "new_lr": second.lr, "reason": "test", "statistic": 2.0}


def test_orchestrator_state_round_trips():
    orch = _orchestrator(warmup_steps=0)
    orch.apply(orch.plan(5, Grow("test", 1.0)))
    orch.estimator.update(1.0, 50.0)
    restored = _orchestrator(warmup_steps=0)
    restored.load_state_dict(orch.state_dict())
    assert restored.state_dict() == orch.state_dict()
    assert (restored.global_batch, restored.local_batch, restored.accumulation, restored.lr_at(6)) == (64, 16, 1, pytest.approx(0.2))


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch, message", [
    ({"policy": "gns"}, "set batch.max above batch.initial"),
    ({"policy": "schedule", "max": 512}, "needs batch.at_epochs or batch.at_steps"),
    ({"policy": "plateau", "max": 512, "growth_factor": 1}, "growth_factor = 1 must be at least 2"),
    ({"gns_ema": 1.0}, "gns_ema = 1.0 must be in [0, 1)"),
    ({"gns_factor": 0.0}, "gns_factor = 0.0 must be a positive number"),
    ({"gns_factor": math.inf}, "gns_factor = inf must be a positive number"),
    ({"at_steps": [0]}, "must hold positive numbers"),
    ({"max_local": -1}, "max_local = -1 must be 0 or positive"),
    ({"plateau_metric": "acc"}, "choose one of 'val_loss', 'train_loss'"),
])
def test_bad_batch_config_is_one_clear_error(batch, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config_from_dict({"batch": batch})


def test_gns_rejects_forward_fusion_which_defers_the_averaged_gradient():
    with pytest.raises(UserError, match="use fusion 'none' or 'backward'"):
        config_from_dict({"batch": {"policy": "gns", "max": 512}, "train": {"fusion": "forward"}})


def test_launch_checks_name_the_world_size():
    with pytest.raises(UserError, match="batch.max = 100 is not divisible by world size 8"):
        check_batch_launch(BatchConfig(initial=32, max=100, policy="plateau"), 8)
    with pytest.raises(UserError, match="needs at least 2 ranks"):
        check_batch_launch(BatchConfig(initial=32, max=128, policy="gns"), 1)
