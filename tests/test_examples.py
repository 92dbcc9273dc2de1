"""examples/ as CI runs them: each script for a few steps on 2 ranks under mpirun (Horovod engine)
and torchrun (torch.distributed engine), checked through the step log it writes."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from hpctrain.data.shards import shard
from hpctrain.h5log import read_log
from hpctrain.local_launch import run_mpi, run_torchrun
from tests.helpers import REPO

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("examples") / "digits"
    shard("digits", out, shard_size=500)
    return str(out)


def _launch(launcher: str, script: str, args: list[str]):
    program = [sys.executable, str(EXAMPLES / script)]
    if launcher == "mpirun":
        return run_mpi(2, args, program=program, timeout=120)
    return run_torchrun(2, args, program=program, timeout=120)


ENGINE = {"mpirun": "engine horovod", "torchrun": "engine torch"}


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_classification_example(tmp_path, digits, launcher):
    log_file = tmp_path / "log.h5"
    proc = _launch(launcher, "classify_digits.py", ["--data", digits, "--epochs", "1", "--steps", "6",
                                                    "--log-file", log_file])
    assert ENGINE[launcher] in proc.stdout and "2 rank(s)" in proc.stdout, proc.stdout
    log = read_log(log_file)
    assert log["steps"]["step"].tolist() == list(range(1, 7))
    assert set(log["steps"]["global_batch"]) <= {64, 128} and log["steps"]["global_batch"][0] == 64
    assert np.all(log["steps"]["wire_bytes"] < log["steps"]["dense_bytes"])      # top-k compressed
    assert log["evals"]["epoch"].tolist() == [1] and 0 < log["evals"]["val_accuracy"][0] <= 1
    assert log["attrs"]["world_size"] == 2


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_regression_example_grows_the_batch(tmp_path, digits, launcher):
    log_file = tmp_path / "log.h5"
    proc = _launch(launcher, "denoise_digits.py", ["--data", digits, "--epochs", "2", "--steps", "95",
                                                   "--policy", "schedule", "--log-file", log_file])
    assert ENGINE[launcher] in proc.stdout and "PSNR" in proc.stdout, proc.stdout
    log = read_log(log_file)
    batches = log["steps"]["global_batch"]
    assert batches.tolist() == [16] * 89 + [14] + [32] * 5       # 1438 = 89 × 16 + 14; grown as epoch 2 begins
    assert log["events"]["new_batch"].tolist() == [32] and log["evals"]["epoch"].tolist() == [1, 2]
    assert log["evals"]["val_loss"][1] < log["evals"]["val_loss"][0]
