"""DistributedOptimizer under real `mpirun`: the checks live in tests/mpi_workers/optimizer_checks.py,
packed into few launches (each costs seconds); rank 0 reports one `ok ...` line per check."""
from __future__ import annotations

import sys
import time

import pytest

from hpctrain.local_launch import run_mpi
from tests.helpers import REPO
from tests.mpi_workers.optimizer_checks import COMPRESSORS, OPTIMIZERS

pytestmark = pytest.mark.mpi

WORKER = [sys.executable, str(REPO / "tests" / "mpi_workers" / "optimizer_checks.py")]


def _passed(np: int, check: str, engine: str) -> list[str]:
    proc = run_mpi(np, [check], program=WORKER, timeout=240, engine=engine)
    return [line for line in proc.stdout.splitlines() if line.startswith("ok ")]


def test_two_ranks_get_the_same_mean_of_decoded_payloads_for_every_compressor(engine):
    passed = _passed(2, "exchange", engine)
    for name in COMPRESSORS:
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(line.startswith(f"ok exchange {name} {dtype}:") for line in passed), (name, dtype, passed)
        assert f"ok exchange {name}: backward_passes_per_step=2 exchanges the sum of both passes" in passed


def test_four_ranks_fused_updates_equal_unfused_after_50_steps(engine):
    passed = _passed(4, "fusion", engine)
    for compression in ("None", "topk"):
        for optimizer in OPTIMIZERS:
            expected = f"ok fusion {optimizer} compression={compression}: backward and forward == none after 50 steps"
            assert expected in passed


def test_the_torch_engines_buckets_start_fewer_collectives_and_change_no_result():
    passed = _passed(2, "buckets", "torch")
    assert any(line.startswith("ok buckets:") for line in passed), passed


def test_a_grouped_allgather_equals_one_allgather_per_tensor(engine):
    assert "ok grouped allgather: every tensor as its own allgather gives it" in _passed(2, "grouped", engine)


def test_layers_move_onto_the_bypass_and_off_it_between_steps(engine):
    assert any(line.startswith("ok placement:") for line in _passed(2, "placement", engine))


def test_nan_gradient_on_one_rank_names_the_parameter_and_step_and_aborts_the_job(engine):
    start = time.monotonic()
    proc = run_mpi(2, ["nan"], program=WORKER, check=False, timeout=120, engine=engine)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert errors == ["hpctrain: error: [rank 1] non-finite gradient (NaN/Inf) in parameter 'fc1.weight' at step 3; "
                      "it was not fed into the residual memory — lower train.lr or check the data"], proc.stderr
    assert "was not reported" not in proc.stderr
    assert time.monotonic() - start < 60
