"""Hierarchical exchange of the sparse compressors (`hpctrain.optimizer.hierarchical`,
`hpctrain.comm.nodes`): one-process simulations of a world of P ranks, then 4 real ranks as
2 simulated nodes × 2 (HPCTRAIN_RANKS_PER_NODE) on both engines."""
from __future__ import annotations

import sys

import pytest
import torch

from hpctrain.comm import nodes as node_layout
from hpctrain.compression import AdaComp, Threshold, TopK, simulate
from hpctrain.compression.base import ParamState
from hpctrain.optimizer.hierarchical import Traffic, simulate_hierarchical
from hpctrain.local_launch import run_mpi
from tests.helpers import REPO

SPARSE = {"topk": lambda: TopK(0.05), "threshold": lambda: Threshold(density=0.05),
          "adacomp": lambda: AdaComp(conv_bin=5, fc_bin=50)}


def grads(ranks: int, step: int, shape=(32, 96)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=g) * (1 + r) for r in range(ranks)]


@pytest.mark.parametrize("name", SPARSE)
def test_every_rank_gets_the_leaders_decode_and_only_leaders_keep_residuals(name) -> None:
    states = [ParamState("w") for _ in range(8)]
    out = simulate_hierarchical(SPARSE[name](), grads(8, 0), states, per_node=4)
    assert all(torch.equal(o, out[0]) for o in out)
    assert [s.residual is not None for s in states] == [True, False, False, False] * 2


def test_sending_everything_equals_the_mean_of_all_ranks() -> None:
    """TopK(1.0) sends every entry: the mean over nodes of node means is the plain mean."""
    g = grads(8, 1)
    out = simulate_hierarchical(TopK(1.0), g, [ParamState("w") for _ in range(8)], per_node=2)
    assert torch.allclose(out[0], torch.stack(g).mean(0), atol=1e-6)


@pytest.mark.parametrize("name", SPARSE)
def test_error_feedback_loses_nothing_in_aggregate(name) -> None:
    """Σ results + mean over nodes of the leaders' residuals = Σ over steps of the mean gradient."""
    ranks, per_node, steps = 8, 4, 6
    states = [ParamState("w") for _ in range(ranks)]
    applied = torch.zeros(32, 96)
    wanted = torch.zeros(32, 96)
    for step in range(steps):
        g = grads(ranks, step)
        applied += simulate_hierarchical(SPARSE[name](), g, states, per_node)[0]
        wanted += torch.stack(g).mean(0)
    held = torch.stack([states[leader].residual for leader in range(0, ranks, per_node)]).mean(0)
    assert torch.allclose(applied + held, wanted, atol=1e-4)


@pytest.mark.parametrize("name", SPARSE)
def test_inter_node_bytes_drop_by_the_ranks_per_node(name) -> None:
    """Payload bytes over the slow link (from payload sizes): the flat allgather brings each node
    the payloads of the P − r ranks elsewhere, the hierarchical one those of N − 1 leaders."""
    ranks, per_node = 16, 4
    g = grads(ranks, 2)
    rounds: list = []
    simulate(SPARSE[name](), g, [ParamState("w") for _ in range(ranks)], rounds)
    flat = [sum(q.nbytes for r, q in enumerate(rounds[0]) if r // per_node != node) for node in range(ranks // per_node)]
    traffic = Traffic()
    simulate_hierarchical(SPARSE[name](), g, [ParamState("w") for _ in range(ranks)], per_node, traffic)
    ratio = sum(flat) / sum(traffic.received_inter_per_node)
    assert 0.5 * per_node * (ranks - per_node) / (ranks - 1) <= ratio <= 2.0 * per_node * (ranks - per_node) / (ranks - 1)


def test_layout_groups_ranks_by_node_and_uses_only_regular_ones(monkeypatch) -> None:
    assert node_layout.layout(["a", "a", "b", "b"]) == ((0, 1), (2, 3))
    assert node_layout.layout(["b", "a", "b", "a"]) == ((0, 2), (1, 3))
    assert node_layout.worth_it(((0, 1), (2, 3)))
    assert not node_layout.worth_it(((0, 1, 2, 3),))            # one node
    assert not node_layout.worth_it(((0,), (1,)))               # one rank per node
    assert not node_layout.worth_it(((0, 1, 2), (3,)))          # uneven
    monkeypatch.setenv(node_layout.RANKS_PER_NODE_ENV, "2")
    assert node_layout.simulated_local(3, 4) == (1, 2) and node_layout.simulated_local(4, 5) == (0, 1)
    assert node_layout.node_key(3) == 1
    monkeypatch.setenv(node_layout.RANKS_PER_NODE_ENV, "zero")
    with pytest.raises(Exception, match="positive"):
        node_layout.simulated_ranks_per_node()


@pytest.mark.mpi
def test_four_ranks_as_two_nodes_match_the_simulated_hierarchical_exchange(engine) -> None:
    worker = [sys.executable, str(REPO / "tests" / "mpi_workers" / "hierarchical_checks.py")]
    proc = run_mpi(4, ["exchange"], program=worker, timeout=300, engine=engine,
                   env={node_layout.RANKS_PER_NODE_ENV: "2"})
    passed = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert any(line.startswith("ok layout:") for line in passed), proc.stdout
    for name in ("topk", "threshold", "adacomp", "topk-all"):
        assert any(line.startswith(f"ok hierarchical {name}:") for line in passed), (name, proc.stdout)
    for line in proc.stdout.splitlines():
        if line.startswith("bytes "):
            flat, hier = int(line.split()[-3]), int(line.split()[-1])
            assert hier < flat, line
