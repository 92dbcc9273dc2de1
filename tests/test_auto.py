"""`compression = "auto"` (hpctrain/compression/auto.py): the decision on injected and real
measurements, rebuilding compressors without losing residuals, and a real 2-rank run per engine."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from hpctrain.compression import AdaComp, Policy, TopK
from hpctrain.compression.auto import (BYPASS, AutoCompression, LayerCost, Measured, alternatives, auto_from_config,
                                       build_candidates, choose, cpu_share, fit_to_dense, measure_layers, predict_step)
from hpctrain.compression.policy import DENSE, policy_from_config
from hpctrain.config import CompressionConfig
from hpctrain.cost import Link, Network
from hpctrain.local_launch import run_mpi
from tests.helpers import REPO

LAYER = {"none": LayerCost(4e6, "allreduce", 0.0), "fp16": LayerCost(2e6, "allreduce", 1e-4),
         "adacomp": LayerCost(2e4, "allgather", 2e-3)}


def test_slow_link_picks_the_sparse_compressor_fast_link_with_compute_stays_dense() -> None:
    measured = Measured(compute_s=0.01, layers={"fc.weight": dict(LAYER)})
    slow = choose(measured, ranks=8, network=Network(Link.parse("1gbit")))
    assert slow.per_layer == {"fc.weight": "adacomp"} and "adacomp ×1" in slow.reason
    assert slow.predicted_step_s < slow.dense_step_s
    fast = choose(Measured(compute_s=0.5, layers={"fc.weight": dict(LAYER)}), 8, Network(Link.parse("200gbit")))
    assert fast.per_layer == {"fc.weight": "none"} and "hides behind" in fast.reason


def test_the_model_is_fitted_to_the_dense_step_the_run_waited_on() -> None:
    """A wait longer than the modelled exchange: the link is slower than given, nothing hides;
    shorter: compute hid the difference. Either way the fitted model predicts dense's measured step."""
    network = Network(Link.parse("200gbit"))
    modelled = choose(Measured(0.5, {"fc.weight": dict(LAYER)}), 8, network, overlap=0.0).dense_step_s - 0.5
    slow = Measured(compute_s=0.5, layers={"fc.weight": dict(LAYER)}, waited_s=0.2)
    fit = fit_to_dense(slow, 8, network)
    assert fit.overlap == 0.0 and fit.scale == pytest.approx(0.2 / modelled)
    choice = choose(slow, 8, network)
    assert choice.dense_step_s == pytest.approx(0.7) and choice.per_layer == {"fc.weight": "adacomp"}
    assert choice.fit == fit and "exchange ×" in choice.reason
    hidden = fit_to_dense(Measured(0.5, {"fc.weight": dict(LAYER)}, waited_s=0.0), 8, network)
    assert hidden.scale == 1.0 and hidden.overlap == pytest.approx(modelled / 0.5)
    assert fit_to_dense(Measured(0.5, {"fc.weight": dict(LAYER)}), 8, network, overlap=0.3).overlap == 0.3


def test_a_plan_is_priced_with_its_rounds_fused_as_advise_prices_a_method() -> None:
    """On the torch engine ten layers' allgathers leave as one bucket: the plan pays one round's
    α, not ten (Horovod's, ready on different cycles, pay ten), priced as `hpctrain advise` would."""
    from hpctrain.compression.auto import Fit
    from hpctrain.cost import Fusion
    from hpctrain.cost.collectives import flat_allgatherv
    layers = {f"l{i}.weight": dict(LAYER) for i in range(10)}
    network, fit = Network(Link.parse("1gbit", latency_us=500)), Fit(1.0, 0.0)
    torch_engine = choose(Measured(0.01, layers, fusion=Fusion.of("torch")), 8, network, fit=fit)
    assert set(torch_engine.per_layer.values()) == {"adacomp"}
    fused, one = flat_allgatherv(10 * 2e4, 8, network), flat_allgatherv(2e4, 8, network)
    assert torch_engine.predicted_step_s == pytest.approx(0.01 + 10 * 2e-3 + fused.seconds)
    assert fused.latency_s == one.latency_s > 0         # one round's α terms, not ten
    horovod = choose(Measured(0.01, layers), 8, network, fit=fit)
    assert horovod.predicted_step_s == pytest.approx(0.01 + 10 * 2e-3 + 10 * one.seconds)


def test_many_ranks_turn_the_allgather_back_to_fp16() -> None:
    """The fan-in: (P−1)·k grows with P, fp16's allreduce does not."""
    measured = Measured(compute_s=0.0, layers={"fc.weight": dict(LAYER)})
    network = Network(Link.parse("10gbit"))
    assert choose(measured, 4, network).per_layer["fc.weight"] == "adacomp"
    assert choose(measured, 4096, network).per_layer["fc.weight"] == "fp16"


def test_several_nodes_run_the_sparse_allgather_hierarchically_where_that_is_faster() -> None:
    """512 ranks, 8 per node: the leaders' allgather has fan-in 63 instead of 511."""
    measured = Measured(compute_s=0.0, layers={"fc.weight": dict(LAYER)})
    nodes = Network(Link.parse("10gbit"), ranks_per_node=8)
    flat = choose(measured, 512, Network(Link.parse("10gbit")))
    assert not flat.hierarchical and flat.per_layer["fc.weight"] == "fp16"
    tiered = choose(measured, 512, nodes)
    assert tiered.hierarchical and tiered.per_layer["fc.weight"] == "adacomp"
    assert "hierarchical over 64 nodes" in tiered.reason and tiered.predicted_step_s < flat.predicted_step_s
    shared = choose(measured, 512, Network(Link.parse("10gbit"), ranks_per_node=8, shared=True))
    assert not shared.hierarchical        # one shared link: nothing to gain by grouping


def test_alternatives_place_each_candidate_as_its_fixed_method_would() -> None:
    """What auto measures beside its own plan: each candidate on every layer it applies to and the
    bypass elsewhere (as `compression.name = CANDIDATE` places them), predicted within the window,
    nearest first; never the plan itself."""
    conv = {**LAYER, "adacomp": LayerCost(4e6, "allreduce", 0.0, applies=False)}
    measured = Measured(compute_s=0.01, layers={"fc.weight": {**LAYER, "lowrank": LayerCost(4e4, "allreduce", 4e-3)},
                                                "conv.weight": {**conv, "lowrank": LayerCost(4e6, "allreduce", 0.0, False)}})
    network = Network(Link.parse("1gbit"))
    best = choose(measured, 8, network)
    assert best.per_layer == {"fc.weight": "adacomp", "conv.weight": "fp16"}
    plans = alternatives(measured, 8, network, best, limit=5, window=100.0)
    assert [p.per_layer for p in plans] == [{"fc.weight": "fp16", "conv.weight": "fp16"},
                                            {"fc.weight": "adacomp", "conv.weight": BYPASS},
                                            {"fc.weight": "lowrank", "conv.weight": BYPASS}]
    assert best.predicted_step_s < plans[0].predicted_step_s < plans[1].predicted_step_s < plans[2].predicted_step_s
    assert [p.per_layer for p in alternatives(measured, 8, network, best, limit=1, window=100.0)] == [plans[0].per_layer]
    within = plans[0].predicted_step_s / best.predicted_step_s
    assert alternatives(measured, 8, network, best, limit=5, window=within * 0.99) == []


def test_a_dense_layer_alone_in_its_round_rides_the_bypass() -> None:
    """On Horovod a sparse plan's allgathers leave one per layer: a small layer sent dense as it is
    ready pays an allreduce's α of its own, on the bypass (which runs anyway) it pays none."""
    small = {"none": LayerCost(8e3, "allreduce", 0.0), "fp16": LayerCost(4e3, "allreduce", 1e-4),
             "adacomp": LayerCost(8e3, "allgather", 0.0, applies=False)}
    measured = Measured(compute_s=0.0, layers={"fc.weight": dict(LAYER), "head.weight": small}, bypass_bytes=400)
    network = Network(Link.parse("1gbit", latency_us=500))
    choice = choose(measured, 8, network)
    assert choice.per_layer == {"fc.weight": "adacomp", "head.weight": BYPASS}
    alone = {**choice.per_layer, "head.weight": "none"}
    assert predict_step(measured, alone, 8, network, False, choice.fit) > choice.predicted_step_s


def test_measure_layers_times_real_codecs_and_counts_their_payloads() -> None:
    grads = {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(0))}
    costs = measure_layers(grads, build_candidates())["w"]
    assert costs["none"] == LayerCost(256 * 256 * 4, "allreduce", 0.0)
    assert costs["fp16"].wire_bytes == 256 * 256 * 2 and costs["fp16"].kind == "allreduce"
    assert costs["adacomp"].kind == "allgather" and costs["adacomp"].wire_bytes < 256 * 256 * 4 / 10
    assert costs["lowrank"].kind == "allreduce" and costs["lowrank"].wire_bytes < 256 * 256 * 4 / 10
    assert all(costs[c].codec_s > 0 for c in ("fp16", "adacomp", "threshold", "lowrank"))


def test_due_after_the_warmup_and_when_the_global_batch_changes() -> None:
    auto = AutoCompression({"none": None}, warmup_steps=0)
    assert auto.warmup_steps == 3 and not auto.due(2, 64) and auto.due(3, 64)
    auto.global_batch, auto.choice = 64, object()
    assert not auto.due(10, 64) and auto.due(10, 128)


def test_config_auto_starts_dense_and_builds_the_chooser() -> None:
    cfg = CompressionConfig(name="auto", warmup_steps=5, link="1gbit")
    assert policy_from_config(cfg).default is DENSE
    auto = auto_from_config(cfg)
    assert auto.warmup_steps == 5 and set(auto.candidates) == {"none", "fp16", "adacomp", "threshold", "lowrank"}
    assert auto_from_config(CompressionConfig(name="topk")) is None


def test_a_checkpoint_mid_measuring_keeps_the_plans_still_to_measure() -> None:
    """Resumed between two plans' measurements, auto goes on where it was: the plan in force, those
    still to measure, those measured with their step times, and the steps of the one in progress."""
    from hpctrain.optimizer import DistributedOptimizer

    measured = Measured(compute_s=0.01, layers={"weight": dict(LAYER)})
    network = Network(Link.parse("1gbit"))
    best = choose(measured, 8, network)
    (other,) = alternatives(measured, 8, network, best, limit=1, window=100.0)
    layer = nn.Linear(64, 64, bias=False)
    opt = DistributedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), layer.named_parameters(),
                               compression=Policy(default=DENSE, min_numel=16))
    candidates = {"none": None, **build_candidates(("fp16", "adacomp"))}
    saved = AutoCompression(candidates, warmup_steps=3)
    saved.attach(opt)
    saved._apply(opt, best)
    saved.plans, saved.tried, saved.trial, saved.trial_from = [other], [(best, [0.25, 0.26])], [0.2], 12
    resumed = AutoCompression(candidates, warmup_steps=3)
    resumed.attach(opt)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.choice == best and resumed.plans == [other] and resumed.tried == [(best, [0.25, 0.26])]
    assert (resumed.trial, resumed.trial_from) == ([0.2], 12) and opt.compressor_names == {"weight": "adacomp"}
    opt.remove_hooks()


@pytest.mark.parametrize("dense, name", [(None, "dense"), (DENSE, "none")], ids=["bypass", "as-ready"])
def test_changing_compressor_carries_the_residual_into_the_next_gradient(dense, name) -> None:
    """To dense fp32 (on the bypass, or sent as it is ready) and back: the residual is sent once."""
    from hpctrain.optimizer import DistributedOptimizer

    layer = nn.Linear(64, 64, bias=False)
    opt = DistributedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), layer.named_parameters(),
                               compression=Policy(default=TopK(0.1), min_numel=16))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    layer(x).square().sum().backward()
    opt.step()
    held = opt._states[layer.weight].residual.clone()
    assert held.abs().sum() > 0
    opt.zero_grad()
    opt.set_compressors({"weight": dense})              # dense fp32: no error feedback
    assert opt.compressor_names == {"weight": name}
    assert torch.equal(opt._states[layer.weight].residual, held)     # pending, and so in a checkpoint
    twin = nn.Linear(64, 64, bias=False)          # this step's own gradient, from outside the optimizer
    twin.load_state_dict(layer.state_dict())
    twin(x).square().sum().backward()
    fresh = twin.weight.grad
    layer(x).square().sum().backward()
    opt.step()
    assert torch.allclose(layer.weight.grad, fresh + held, atol=1e-6)     # nothing lost
    assert opt._states[layer.weight].residual is None                     # and added once
    opt.zero_grad()
    opt.set_compressors({"weight": AdaComp()})           # error feedback again: starts empty, memory reset
    assert opt.compressor_names == {"weight": "adacomp"} and opt._states[layer.weight].memory is None
    opt.remove_hooks()


def _worker_passes(ranks: int, check: str, engine: str, env: dict[str, str] | None = None) -> list[str]:
    """The `ok ...` lines of tests/mpi_workers/auto_checks.py CHECK on `ranks` ranks."""
    worker = [sys.executable, str(REPO / "tests" / "mpi_workers" / "auto_checks.py")]
    proc = run_mpi(ranks, [check], program=worker, timeout=300, engine=engine, env=env)
    return [line for line in proc.stdout.splitlines() if line.startswith("ok ")]


@pytest.mark.mpi
def test_two_ranks_agree_on_the_choice(engine) -> None:
    passed = _worker_passes(2, "decide", engine, env={"HOROVOD_FUSION_THRESHOLD": str(2**20)})
    assert any(line.startswith("ok auto link=auto:") for line in passed), passed
    assert any(line.startswith("ok auto link=1mbit:") for line in passed), passed
    if engine == "horovod":        # the model fuses what Horovod's buffer holds, as the job set it
        assert f"ok fusion buffer {2**20} bytes" in passed, passed


@pytest.mark.mpi
def test_auto_turns_the_hierarchical_exchange_on_across_simulated_nodes(engine) -> None:
    passed = _worker_passes(4, "hierarchical", engine, env={"HPCTRAIN_RANKS_PER_NODE": "2"})
    assert any(line.startswith("ok auto hierarchical:") for line in passed), passed


def test_codecs_on_shared_cores_are_priced_at_their_share() -> None:
    """Four ranks on the cores one process has: each codec runs at (cores / 4) of the speed alone."""
    cores = len(os.sched_getaffinity(0))
    grads = {"w": torch.zeros(4)}
    assert cpu_share(1, grads) == max(1.0, torch.get_num_threads() / cores)
    assert cpu_share(4 * cores, grads) == 4.0 * torch.get_num_threads()


@pytest.mark.mpi
def test_the_fastest_measured_plan_stays_dense_measured_again_beside_it(engine) -> None:
    passed = _worker_passes(2, "race", engine)
    assert any(line.startswith("ok auto race:") for line in passed), passed


@pytest.mark.mpi
def test_the_two_fastest_within_1_2x_are_measured_again(engine) -> None:
    passed = _worker_passes(2, "confirm", engine)
    assert any(line.startswith("ok auto confirm:") for line in passed), passed


@pytest.mark.mpi
def test_a_first_choice_slower_than_the_dense_steps_goes_back_to_dense(engine) -> None:
    passed = _worker_passes(2, "check", engine)
    assert any(line.startswith("ok auto check slower:") for line in passed), passed
    assert any(line.startswith("ok auto check faster:") for line in passed), passed
