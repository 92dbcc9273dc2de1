"""`hpctrain.ddp_comm_hook` inside torch DDP on real ranks (torchrun, Gloo, 2 ranks): the checks live
in tests/mpi_workers/ddp_hook_checks.py, all in one launch; rank 0 reports one `ok ...` line each."""
from __future__ import annotations

import sys

import pytest

from hpctrain.local_launch import run_torchrun
from tests.helpers import REPO
from tests.mpi_workers.optimizer_checks import COMPRESSORS

WORKER = [sys.executable, str(REPO / "tests" / "mpi_workers" / "ddp_hook_checks.py")]


@pytest.fixture(scope="module")
def passed() -> list[str]:
    proc = run_torchrun(2, [], program=WORKER, timeout=120)
    return [line for line in proc.stdout.splitlines() if line.startswith("ok ")]


def test_no_compression_gives_plain_ddp_gradients(passed):
    assert any(line.startswith("ok none: DDP+hook == plain DDP") for line in passed), passed


@pytest.mark.parametrize("name", [n for n in COMPRESSORS if n != "none"])
def test_each_compressor_averages_as_simulate_of_all_ranks(passed, name):
    assert any(line.startswith(f"ok {name}: DDP+hook == simulate of all ranks") for line in passed), passed


def test_state_dict_round_trip_restores_residuals(passed):
    assert any(line.startswith("ok state_dict: residuals of ['fc1.weight', 'fc2.weight'] restored") for line in passed), passed


def test_per_layer_rules_are_honoured(passed):
    assert any(line.startswith("ok rules: '*.bias' = None sent dense") for line in passed), passed


def test_a_non_finite_gradient_reaches_every_rank_and_no_residual(passed):
    assert any(line.startswith("ok non-finite: one rank's NaN gradient reaches every rank") for line in passed), passed
