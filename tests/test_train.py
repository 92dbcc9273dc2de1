"""End-to-end training through the CLI: real processes, real mpirun, real HDF5 logs and checkpoints."""
from __future__ import annotations

import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from hpctrain import checkpoint
from hpctrain.h5log import STEP_COLUMNS, read_log
from hpctrain.local_launch import ENGINES, HPCTRAIN, local_env, run_cli, run_mpi
from tests.helpers import REPO

DIGITS = str(REPO / "configs" / "digits.toml")


def _train_args(tmp_path, *sets: str) -> list[str]:
    args = ["train", "--config", DIGITS, "--set", f"run.out_dir={tmp_path}"]
    for s in sets:
        args += ["--set", s]
    return args


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert errors, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


@pytest.mark.mpi
def test_two_ranks_write_the_step_log_and_checkpoints(tmp_path, engine):
    proc = run_mpi(2, _train_args(tmp_path, "train.epochs=2"), engine=engine)
    assert proc.stdout.count("hpctrain: engine ") == 1 and f"engine {engine}" in proc.stdout.replace(
        "torch.distributed", "torch")
    log = read_log(tmp_path / "digits" / "log.h5")
    steps, evals = log["steps"], log["evals"]
    assert set(STEP_COLUMNS) <= set(steps)
    n = len(steps["step"])
    assert n == 2 * (1438 // 64 + 1)            # 23 steps per epoch, the last one smaller
    assert steps["step"].tolist() == list(range(1, n + 1))
    assert np.all(steps["global_batch"] == 64)
    assert steps["samples_seen"][-1] == 2 * (1438 - 1438 % 2)
    assert np.all(steps["wire_bytes"] == steps["dense_bytes"])   # no compression: fp32 on the wire
    assert steps["dense_bytes"][0] == 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)
    assert np.all(steps["comm_time_s"] <= steps["step_time_s"])
    assert evals["epoch"].tolist() == [1, 2] and evals["val_accuracy"][-1] > 0.8
    assert log["attrs"]["world_size"] == 2 and "digits" in log["attrs"]["config"]
    ckpts = checkpoint.list_checkpoints(tmp_path / "digits")
    assert [p.name for p in ckpts] == [f"step-{23:09d}.pt", f"step-{46:09d}.pt"]
    state = checkpoint.load(ckpts[-1])
    assert state["step"] == 46 and state["sampler"] == {"epoch": 2, "cursor": 0}


@pytest.mark.mpi
@pytest.mark.parametrize("compression", ["none", "topk", "auto"])
def test_resume_on_the_other_engine_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, compression, engine):
    """Runs and checkpoints on `engine`, resumes on the other one (2 ranks: sums are exact either way).
    auto decides after step 3 (on a link so slow that timing noise cannot change its choice) and
    the resume keeps that choice: the same compressor per layer, no decision after the resume."""
    other = next(e for e in ENGINES if e != engine)
    common = [f"compression.name={compression}", "compression.min_numel=256", "compression.link=1kbit",
              "compression.check_steps=0",        # a check of measured step times would not repeat exactly
              "log.layers_every=1", "train.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=10"]
    run_mpi(2, _train_args(tmp_path, "run.name=full", *common), engine=engine)
    run_mpi(2, _train_args(tmp_path, "run.name=cut", "train.max_steps=12", *common), engine=engine)
    run_mpi(2, _train_args(tmp_path, "run.name=cut", *common) + ["--resume", str(tmp_path / "cut/checkpoints" / f"step-{10:09d}.pt")],
            engine=other)
    full, cut = read_log(tmp_path / "full/log.h5"), read_log(tmp_path / "cut/log.h5")
    assert cut["steps"]["step"].tolist() == full["steps"]["step"].tolist()
    np.testing.assert_array_equal(cut["steps"]["loss"], full["steps"]["loss"])
    np.testing.assert_array_equal(cut["evals"]["val_loss"], full["evals"]["val_loss"])
    layers = cut["layers"]
    assert layers["compressor"].tolist() == full["layers"]["compressor"].tolist()
    after = {n: c for s, n, c in zip(layers["step"], layers["name"], layers["compressor"]) if s > 10}
    assert after == {n: c for s, n, c in zip(layers["step"], layers["name"], layers["compressor"]) if s == 10}
    decided = [s for s, reason in zip(cut["events"]["step"], cut["events"]["reason"])
               if reason.startswith("compression auto")]
    assert decided == ([3] if compression == "auto" else [])
    if compression == "auto":
        assert set(after.values()) != {"dense"}, after


def test_missing_config_file_is_one_line(tmp_path):
    line = _one_line_error(run_cli(["train", "--config", tmp_path / "missing.toml"], check=False))
    assert "missing.toml" in line and "not found" in line


def test_unknown_config_key_is_one_line(tmp_path):
    line = _one_line_error(run_cli(_train_args(tmp_path, "train.epoch=3"), check=False))
    assert "unknown key 'train.epoch' (did you mean 'epochs'?)" in line


@pytest.mark.mpi
def test_forbidden_world_size_is_one_line(tmp_path):
    proc = run_mpi(2, _train_args(tmp_path, "run.world_sizes=[1, 4]"), check=False)
    assert "world size 2 is not allowed by run.world_sizes = [1, 4]" in _one_line_error(proc)


def test_truncated_checkpoint_is_one_line(tmp_path):
    run_cli(_train_args(tmp_path, "train.max_steps=3"))
    (ckpt,) = checkpoint.list_checkpoints(tmp_path / "digits")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    line = _one_line_error(run_cli(_train_args(tmp_path) + ["--resume", ckpt], check=False))
    assert ckpt.name in line and "truncated or corrupt" in line


def _nan_dataset(path, nan_rows):
    x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    x[nan_rows] = np.nan
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, np.arange(256) % 4


@pytest.mark.mpi
def test_non_finite_loss_on_one_rank_takes_the_job_down(tmp_path, engine):
    data = tmp_path / "nan.h5"
    _nan_dataset(data, nan_rows=list(range(0, 256, 32)))      # some land in the training split
    start = time.monotonic()
    proc = run_mpi(2, _train_args(tmp_path, f"data.name='{data}'", "train.epochs=3", "batch.initial=16"),
                   check=False, timeout=120, engine=engine)
    assert "non-finite loss" in _one_line_error(proc)
    assert time.monotonic() - start < 60


@pytest.mark.mpi
def test_missing_data_file_on_one_rank_aborts_all(tmp_path, engine):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _nan_dataset(tmp_path / "a" / "data.h5", nan_rows=[])
    args = [str(a) for a in HPCTRAIN + _train_args(tmp_path, "data.name='data.h5'")]
    cmd = (["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp",
            "-np", "1", "-wdir", str(tmp_path / "a")] + args + [":", "-np", "1", "-wdir", str(tmp_path / "b")] + args)
    proc = subprocess.run(cmd, env=local_env({"PYTHONPATH": str(REPO), "HPCTRAIN_BACKEND": engine}),
                          capture_output=True, text=True, timeout=120)
    line = _one_line_error(proc)
    assert "[rank 1]" in line and "data.h5" in line


def test_killed_run_leaves_a_readable_log_and_an_intact_checkpoint(tmp_path):
    proc = subprocess.Popen(HPCTRAIN + _train_args(tmp_path, "train.epochs=500", "checkpoint.every_steps=7",
                                                   "checkpoint.every_epochs=0"),     # only step checkpoints
                            cwd=REPO, env=local_env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log_path = tmp_path / "digits" / "log.h5"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if log_path.exists() and checkpoint.list_checkpoints(tmp_path / "digits"):
            try:
                if len(read_log(log_path)["steps"]["step"]) >= 30:
                    break
            except Exception:
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = read_log(log_path)["steps"]["step"]
    assert len(steps) >= 30 and steps.tolist() == list(range(1, len(steps) + 1))
    last = checkpoint.list_checkpoints(tmp_path / "digits")[-1]
    assert checkpoint.load(last)["step"] % 7 == 0
    run_cli(_train_args(tmp_path, "train.epochs=1") + ["--resume=auto"], timeout=120)
