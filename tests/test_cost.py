"""The communication cost model (hpctrain.cost) against hand-computed cases, and `hpctrain advise`
on a real short run's log."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hpctrain.commands import advise as advise_command
from hpctrain.compression.registry import build
from hpctrain.cost import Layer, Link, Method, Network, parse_rate, predict, site_network
from hpctrain.cost import collectives as co
from hpctrain.cost.methods import Fusion, exchange_cost
from hpctrain.errors import UserError
from hpctrain.local_launch import run_cli

GBIT = Link(1e9, 1e-6)          # β = 8 ns per byte, α = 1 µs
NO_LATENCY = Link(1e9, 0.0)


def test_rates_parse_like_tc() -> None:
    assert parse_rate("1gbit") == 1e9 and parse_rate("25gbit") == 25e9
    assert parse_rate("200gbit") == 200e9 and parse_rate("100mbit") == 1e8
    with pytest.raises(UserError, match="not a rate"):
        parse_rate("fast")
    assert Link.parse("1gbit", latency_us=7).latency_s == pytest.approx(7e-6)


def test_ring_allreduce_by_hand() -> None:
    # 4 ranks, 1 MB: 2(P−1) = 6 steps of α; 2(P−1)/P · N = 1.5 MB at 8 ns per byte.
    cost = co.ring_allreduce(1e6, 4, Link(1e9, 1e-5))
    assert cost.latency_s == pytest.approx(6e-5)
    assert cost.bandwidth_s == pytest.approx(1.5e6 * 8e-9)


def test_ring_beats_recursive_doubling_above_the_crossover() -> None:
    # P = 8: ring 14α + 1.75·Nβ, doubling 3α + 3·Nβ → equal at N = 11α / (1.25β) = 1100 bytes.
    assert co.allreduce_crossover_bytes(8, GBIT) == pytest.approx(1100)
    small, large = 1000, 1200
    assert co.doubling_allreduce(small, 8, GBIT).seconds < co.ring_allreduce(small, 8, GBIT).seconds
    assert co.ring_allreduce(large, 8, GBIT).seconds < co.doubling_allreduce(large, 8, GBIT).seconds
    # allreduce picks the cheapest of ring, doubling and the double binary tree
    for n in (10, 1e3, 1e6, 1e9):
        chosen = co.allreduce(n, 8, GBIT)
        assert chosen.seconds == min(co.ring_allreduce(n, 8, GBIT).seconds, co.doubling_allreduce(n, 8, GBIT).seconds,
                                     co.tree_allreduce(n, 8, GBIT).seconds)


def test_allgather_fan_in_makes_sparse_lose_to_dense_beyond_2c() -> None:
    # Ratio c: each rank receives (P−1)·N/c against the ring's 2(P−1)/P·N → equal at P = 2c.
    dense, c = 4e6, 43
    sparse = dense / c
    def bandwidth(fn, n, p):
        return fn(n, p, NO_LATENCY).bandwidth_s
    assert bandwidth(co.allgatherv, sparse, 80) < bandwidth(co.ring_allreduce, dense, 80)
    assert bandwidth(co.allgatherv, sparse, 86) == pytest.approx(bandwidth(co.ring_allreduce, dense, 86))
    assert bandwidth(co.allgatherv, sparse, 90) > bandwidth(co.ring_allreduce, dense, 90)


def test_lowrank_sends_two_rounds_per_power_iteration() -> None:
    layer = Layer("w", (256, 512))
    ops = Method("lowrank", build("lowrank", {"rank": 4})).ops([layer])
    assert [(op.round, op.nbytes) for op in ops] == [("grad", 256 * 4 * 4), ("Q0", 512 * 4 * 4)]
    twice = Method("lowrank", build("lowrank", {"rank": 4, "power_iterations": 2})).ops([layer])
    assert [op.round for op in twice] == ["grad", "Q0", "P1", "Q1"]
    network = Network(GBIT)
    cost, count = exchange_cost(ops, 16, network)
    assert count == 2          # P and Q cannot share a fused buffer: Q waits for P
    assert cost.latency_s == pytest.approx(co.flat_allreduce(4096, 16, network).latency_s
                                           + co.flat_allreduce(8192, 16, network).latency_s)
    _, count = exchange_cost(Method("lowrank", build("lowrank", {"rank": 4})).ops([layer, Layer("v", (128, 128))]),
                             16, network)
    assert count == 2          # two layers: their Ps share a buffer, and their Qs


def test_fused_dense_and_bypass() -> None:
    layers = [Layer("a.weight", (64, 64)), Layer("a.bias", (64,)), Layer("b.weight", (64, 64))]
    dense = Method("dense").ops(layers)
    assert sum(op.nbytes for op in dense) == 4 * (2 * 64 * 64 + 64)
    _, count = exchange_cost(dense, 8, Network(GBIT))
    assert count == 1                       # one fusion buffer
    sparse = Method("adacomp", build("adacomp", None), default_ratio=100).ops(layers)
    assert [op.kind for op in sparse] == ["allgather", "allreduce", "allgather"]   # the bias rides the bypass
    assert sparse[0].nbytes == pytest.approx(64 * 64 * 4 / 100)
    # Horovod: one allgather per layer (ready on different cycles); the torch engine's buckets fuse
    # the two, except in the hierarchical exchange, which runs each among the node leaders alone
    network = Network(GBIT, ranks_per_node=4)
    assert exchange_cost(sparse, 8, network)[1] == 3
    cost, count = exchange_cost(sparse, 8, network, fusion=Fusion.of("torch"))
    assert count == 2
    assert cost.bandwidth_s == pytest.approx(co.flat_allgatherv(2 * sparse[0].nbytes, 8, network).bandwidth_s
                                             + co.flat_allreduce(64 * 4, 8, network).bandwidth_s)
    assert exchange_cost(sparse, 8, network, hierarchical=True, fusion=Fusion.of("torch"))[1] == 3


def test_hierarchical_divides_inter_node_bytes_by_ranks_per_node() -> None:
    network = Network(inter=Link(100e9, 0.0), intra=Link(1e12, 0.0), ranks_per_node=8)
    ranks, k, dense = 1024, 1e5, 4e7
    flat = co.flat_allgatherv(k, ranks, network)
    hier = co.hierarchical_allgatherv(k, dense, ranks, network)
    assert flat.inter_bytes == pytest.approx((ranks - 1) * k)
    assert hier.inter_bytes == pytest.approx((ranks // 8 - 1) * k)
    assert flat.inter_bytes / hier.inter_bytes == pytest.approx(8, rel=0.01)
    assert hier.seconds < flat.seconds
    # dense allreduce: the hierarchical form moves the same inter-node bytes as the ring
    assert co.hierarchical_allreduce(dense, ranks, network).inter_bytes == pytest.approx(
        2 * (128 - 1) / 128 * dense)


def test_shared_link_queues_every_rank() -> None:
    shared = Network(NO_LATENCY, shared=True)
    cost = co.flat_allreduce(1e6, 4, shared)
    assert cost.bandwidth_s == pytest.approx(2 * 3 * 1e6 * 8e-9)      # 2(P−1)·N through one link


def test_predict_terms_and_winner() -> None:
    layers = [Layer(f"l{i}.weight", (1024, 1024)) for i in range(8)]
    methods = [Method("dense"), Method("adacomp", build("adacomp", None), default_ratio=250)]
    slow = predict(methods, layers, compute_s=0.01, ranks=8, network=Network(Link.parse("1gbit")), overlap=0.0)
    d = slow.get("dense")
    assert d.step_s == pytest.approx(d.compute_s + d.latency_s + d.bandwidth_s)
    assert slow.winner.method == "adacomp" and "adacomp" in slow.reason
    fast = predict(methods, layers, compute_s=1.0, ranks=8, network=Network(Link.parse("200gbit")))
    assert fast.winner.method == "dense" and "hides behind backward" in fast.reason
    # at P ≫ 2c the sparse allgather loses to dense
    many = predict(methods, layers, compute_s=0.01, ranks=4096, network=Network(Link.parse("25gbit")), overlap=0.0)
    assert many.winner.method == "dense"


def test_sites_carry_link_figures() -> None:
    for name in ("frontier", "perlmutter", "summit"):
        network = site_network(name)
        assert network.inter.bits_per_s >= 100e9 and network.ranks_per_node in (4, 6, 8)
    with pytest.raises(UserError, match="no \\[links\\]"):
        site_network("local")


# -- hpctrain advise on a real log ----------------------------------------------------------------
def _advise(args: list[str]) -> None:
    parser = argparse.ArgumentParser()
    advise_command.add_arguments(parser)
    parsed = parser.parse_args(args)
    parsed.func(parsed)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("advise")
    run_cli(["train", "--config", "configs/digits.toml", "--set", "train.epochs=1", "--set", f"run.out_dir={out}",
             "--set", "log.layers_every=5", "--set", "checkpoint.every_epochs=0"], timeout=240)
    return out / "digits" / "log.h5"


def test_advise_prints_a_table(short_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _advise([str(short_run), "--ranks", "4,64", "--link", "1gbit,200gbit", "--ranks-per-node", "8",
             "--methods", "dense,fp16,adacomp,lowrank", "--min-run-time", "0.02"])
    out = capsys.readouterr().out
    print(out)
    assert "compute" in out and "model 'mlp' rebuilt" in out
    # one process runs the torch engine: the log says so, and its buckets fuse the allgathers too
    assert "torch engine: allreduces fused into 25 MB buffers, allgathers fused too" in out
    assert "adacomp: ratio simulated on synthetic gradients" in out
    assert out.count("P = 64 (8 node(s))") == 2 and "hier ms" in out
    assert out.count("winner (hierarchical):") == 2
    for method in ("dense", "fp16", "adacomp", "lowrank"):
        assert f"\n{method} " in out


def test_advise_site(short_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _advise([str(short_run), "--site", "frontier", "--nodes", "128", "--no-measure", "--methods", "dense,adacomp"])
    out = capsys.readouterr().out
    assert "P = 1024 (128 node(s))" in out and "frontier" in out and "ratio assumed" in out


def test_advise_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        _advise([str(tmp_path / "missing.h5")])
    damaged = tmp_path / "log.h5"
    damaged.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(UserError):
        _advise([str(damaged)])
    with pytest.raises(UserError, match="--ranks"):
        _advise([str(damaged), "--ranks", "four"])
