"""Hierarchical exchange on real ranks grouped into simulated nodes, launched by tests/test_hierarchical.py:

    HPCTRAIN_RANKS_PER_NODE=2 mpirun -np 4 python hierarchical_checks.py exchange

Every rank, every step: the averaged gradients are identical on every rank and equal what
`simulate_hierarchical` computes from all ranks' gradients and compressor states (the leaders'
residuals included, the non-leaders' empty); TopK(1.0), which sends everything, equals the plain
mean (the maths of the node mean). Rank 0 prints one `ok ...` line per check, and a `bytes`
line per compressor: payload bytes over the inter-node link per step, flat vs hierarchical.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch

from hpctrain import comm
from hpctrain.cli import run_guarded
from hpctrain.compression import AdaComp, Policy, Threshold, TopK
from hpctrain.compression.base import Compressor
from hpctrain.optimizer import DistributedOptimizer
from hpctrain.optimizer.hierarchical import simulate_hierarchical

from optimizer_checks import MIN_NUMEL, batch, local_grads, loss_of, make_model, ok

COMPRESSORS: dict[str, Callable[[], Compressor]] = {
    "topk": lambda: TopK(0.05), "threshold": lambda: Threshold(density=0.05),
    "adacomp": lambda: AdaComp(conv_bin=5, fc_bin=50), "topk-all": lambda: TopK(1.0)}
STEPS = 3


def layout_check() -> None:
    c = comm.get()
    assert (c.local_rank, c.local_size) == (c.rank % 2, 2), (c.local_rank, c.local_size)
    nodes = c.node_groups()
    assert nodes is not None and nodes.nodes == ((0, 1), (2, 3)), nodes
    assert nodes.is_leader == (c.rank % 2 == 0) and (nodes.leaders is not None) == nodes.is_leader
    ok("layout: HPCTRAIN_RANKS_PER_NODE=2 makes 2 nodes of 2 ranks; leaders 0 and 2")


def run(label: str, hierarchical: bool) -> tuple[dict[str, torch.Tensor], int]:
    """STEPS steps; every step checked against the simulation. Final parameters, inter-node bytes/step."""
    make = COMPRESSORS[label]
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               compression=Policy(default=make(), min_numel=MIN_NUMEL, hierarchical=hierarchical))
    params = dict(model.named_parameters())
    name_of = {p: n for n, p in params.items()}
    me, inter = comm.rank(), []
    for step in range(STEPS):
        micro = [batch(step)]
        states = comm.get().allgather_object({name_of[p]: copy.deepcopy(s) for p, s in opt._states.items()})
        grads = comm.get().allgather_object(local_grads(model, micro))
        for x, y in micro:
            loss_of(model, x, y).backward()
        opt.synchronize()
        got = {n: p.grad.detach().clone() for n, p in params.items()}
        everyone = comm.get().allgather_object(got)
        for name, mine in got.items():
            assert all(torch.equal(theirs[name], mine) for theirs in everyone), f"{label}: {name} differs between ranks"
            compressor = opt._compressor[params[name]]
            column = [g[name] for g in grads]
            mean = torch.stack(column).mean(0)
            if compressor is None or not hierarchical:
                continue
            sim_states = [s[name] for s in states]
            expected = simulate_hierarchical(compressor, column, sim_states, per_node=2)[me]
            error = float((mine - expected).abs().max()) / max(float(expected.abs().max()), 1e-3)
            assert error <= 1e-5, f"{label} step {step}: {name} is {error:.3g} off the simulated hierarchical exchange"
            residual = opt._states[params[name]].residual
            if me % 2:
                assert residual is None, f"{label}: non-leader {me} holds a residual for {name}"
            else:
                assert torch.allclose(residual, sim_states[me].residual, atol=1e-5), f"{label}: {name} residual"
            if label == "topk-all":
                assert torch.allclose(mine, mean, atol=1e-6), f"{label}: {name} != mean of the gradients"
        inter.append(opt.new_step_stats().inter_bytes)
        with opt.skip_synchronize():
            opt.step()
        opt.zero_grad()
    opt.remove_hooks()
    final = {n: p.detach().clone() for n, p in params.items()}
    everyone = comm.get().allgather_object(final)
    assert all(torch.equal(theirs[n], final[n]) for theirs in everyone for n in final), f"{label}: parameters differ"
    total = sum(comm.get().allgather_object(sum(inter) // STEPS))
    return final, total


def exchange_checks() -> None:
    layout_check()
    for label in COMPRESSORS:
        flat, flat_bytes = run(label, hierarchical=False)
        hier, hier_bytes = run(label, hierarchical=True)
        if label == "topk-all":
            worst = max(float((flat[n] - hier[n]).abs().max()) for n in flat)
            assert worst <= 1e-5, f"{label}: hierarchical is {worst:.3g} from flat"
        ok(f"hierarchical {label}: identical parameters on every rank, = simulated hierarchical exchange, "
           f"leaders hold the residuals")
        if comm.rank() == 0:
            print(f"bytes {label} {comm.get().engine}: inter-node payload bytes per step, all ranks: "
                  f"flat {flat_bytes} hierarchical {hier_bytes}", flush=True)


CHECKS = {"exchange": exchange_checks}

if __name__ == "__main__":
    comm.init()
    sys.exit(run_guarded(CHECKS[sys.argv[1]]))
