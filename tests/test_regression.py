"""`hpctrain train` for any task: float targets (HDF5 files and shards) with mse/l1, val_loss and PSNR
in the step log, custom losses by `module:function`, max_grad_norm; classification unchanged.
Real processes and real launchers, on small synthetic data."""
from __future__ import annotations

import math
import subprocess

import h5py
import numpy as np
import pytest

from hpctrain.config import DataConfig, load_config
from hpctrain.data import load_splits, shards
from hpctrain.errors import UserError
from hpctrain.h5log import EVAL_COLUMNS, StepLog, read_log
from hpctrain.local_launch import run_cli, run_mpi
from tests.helpers import REPO

DIGITS = str(REPO / "configs" / "digits.toml")
SMALL = ["train.epochs=2", "batch.initial=32", "checkpoint.every_epochs=0", "log.layers_every=0",
         "train.progress=false", "model.name=mlp", "model.args={width=32, depth=1}"]


def _regression_file(path, n=320, shape=(4, 2), val=False):
    """x [n, 16] → y [n, *shape] float, a fixed linear map plus noise (learnable by an MLP)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    w = rng.normal(size=(16, int(np.prod(shape)))).astype(np.float32) / 4
    y = (x @ w + 0.05 * rng.normal(size=(n, w.shape[1]))).reshape(n, *shape)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
        if val:
            f["x_val"], f["y_val"] = x[:64] + 0.01, y[:64]
    return y


def _train(tmp_path, data, *sets):
    args = ["train", "--config", DIGITS, "--set", f"run.out_dir={tmp_path}", "--set", f"data.name='{data}'"]
    for s in (*SMALL, *sets):
        args += ["--set", s]
    return args


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert errors and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_float_targets_train_with_mse_and_the_log_has_val_loss_and_psnr(tmp_path):
    y = _regression_file(tmp_path / "reg.h5")
    proc = run_cli(_train(tmp_path, tmp_path / "reg.h5", "train.loss=mse", "train.max_grad_norm=1.0",
                          "train.optimizer=adam", "train.lr=0.01", "train.epochs=3"))
    assert "val_psnr" in proc.stdout and "val_accuracy" not in proc.stdout
    evals = read_log(tmp_path / "digits" / "log.h5")["evals"]
    assert set(EVAL_COLUMNS) <= set(evals)
    assert np.isnan(evals["val_accuracy"]).all()
    loss, db = evals["val_loss"], evals["val_psnr"]
    assert len(loss) == 3 and loss[-1] < loss[0] < float(np.var(y)) * 1.5
    peak = float(y.max() - y.min())      # train.psnr_peak = 0: the targets' range
    # PSNR is 10 log10(peak^2 / MSE); with mse as the loss, the MSE is val_loss itself
    np.testing.assert_allclose(db, 10 * np.log10(peak ** 2 / loss), rtol=1e-4)


@pytest.mark.mpi
def test_two_ranks_regress_float_targets_from_shards(tmp_path, engine):
    _regression_file(tmp_path / "reg.h5", val=True)
    run_cli(["shard", "--input", tmp_path / "reg.h5", "--out", tmp_path / "sh", "--shard-size", "100", "--task", "auto"])
    manifest = shards.read_manifest(tmp_path / "sh")
    assert manifest["task"] == "regression" and manifest["target_shape"] == [4, 2]
    run_mpi(2, _train(tmp_path, tmp_path / "sh", "train.loss=l1", "train.psnr_peak=2.0"), engine=engine)
    log = read_log(tmp_path / "digits" / "log.h5")
    assert log["evals"]["epoch"].tolist() == [1, 2] and np.isfinite(log["evals"]["val_psnr"]).all()
    assert log["steps"]["global_batch"][0] == 32 and log["attrs"]["world_size"] == 2


def test_regression_splits_shards_and_filtering_keep_labels_apart(tmp_path):
    y = _regression_file(tmp_path / "reg.h5", shape=(3,))
    file_splits = load_splits(DataConfig(name=str(tmp_path / "reg.h5")), task="regression")
    assert file_splits.task == "regression" and file_splits.num_outputs == 3
    assert file_splits.train.labels.dtype == np.int64 and not file_splits.train.labels.any()   # one stratum
    with pytest.raises(UserError, match="use --task regression"):      # a file's y is class labels by default
        shards.shard(str(tmp_path / "reg.h5"), tmp_path / "sh", shard_size=70)
    shards.shard(str(tmp_path / "reg.h5"), tmp_path / "sh", shard_size=70, chunk_kib=1, task="regression", overwrite=True)
    sh = load_splits(DataConfig(name=str(tmp_path / "sh")), task=None)
    assert sh.task == "regression" and sh.target_range == pytest.approx((y.min(), y.max()), rel=1e-6)
    positions = np.array([5, 200, 3, 77])
    np.testing.assert_array_equal(sh.train.get(positions)[1], file_splits.train.get(positions)[1])
    with pytest.raises(UserError, match="holds regression targets but the loss needs classification"):
        load_splits(DataConfig(name=str(tmp_path / "sh")))
    with pytest.raises(UserError, match="is a regression dataset"):
        load_splits(DataConfig(name="digits-denoise"))
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["x"], f["y"] = np.zeros((10, 2), np.float32), np.r_[np.zeros(9), np.nan].astype(np.float32)
    with pytest.raises(UserError, match=r"non-finite target"):
        load_splits(DataConfig(name=str(tmp_path / "nan.h5")), task="regression")


def test_fractional_labels_with_cross_entropy_and_bad_settings_are_one_line(tmp_path):
    with h5py.File(tmp_path / "soft.h5", "w") as f:
        f["x"], f["y"] = np.zeros((40, 4), np.float32), np.linspace(0, 3, 40)
    line = _one_line(run_cli(_train(tmp_path, tmp_path / "soft.h5"), check=False))
    assert "non-integer labels" in line and "y[1]" in line and "train.loss" in line
    with pytest.raises(UserError, match="train.fusion"):
        load_config(None, ["train.max_grad_norm=1.0", "train.fusion=backward"])
    with pytest.raises(UserError, match="train.loss = 'hinge'"):
        load_config(None, ["train.loss=hinge"])


def test_custom_loss_by_module_function_on_classification(tmp_path):
    (tmp_path / "my_losses.py").write_text(
        "import torch\n"
        "def smooth_ce(output, target):\n"
        "    return torch.nn.functional.cross_entropy(output, target, label_smoothing=0.1)\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    run_cli(_train(tmp_path, "digits", "train.loss='my_losses:smooth_ce'", "model.args={width=64, depth=1}"), env=env)
    evals = read_log(tmp_path / "digits" / "log.h5")["evals"]
    assert evals["val_accuracy"][-1] > 0.7 and np.isnan(evals["val_psnr"]).all()
    line = _one_line(run_cli(_train(tmp_path, "digits", "run.name=x", "train.loss='my_losses:missing'"),
                             env=env, check=False))
    assert "my_losses:missing" in line and "cannot be loaded" in line


def test_old_logs_without_val_psnr_still_read_and_resume(tmp_path):
    path = tmp_path / "log.h5"
    with StepLog(path) as log:                       # a writer that leaves val_psnr out gets NaN
        log.append("evals", {"step": 1, "epoch": 1, "val_loss": 0.5, "val_accuracy": 0.9, "wall_time_s": 1.0})
    with h5py.File(path, "a") as f:                  # as written before the column existed
        del f["evals"]["val_psnr"]
    old = read_log(path)
    assert "val_psnr" not in old["evals"] and old["evals"]["val_accuracy"].tolist() == [0.9]
    with StepLog(path, resume=True) as log:
        log.append("evals", {"step": 2, "epoch": 2, "val_loss": 0.4, "val_accuracy": math.nan,
                             "wall_time_s": 2.0, "val_psnr": 30.0})
    evals = read_log(path)["evals"]
    assert evals["step"].tolist() == [1, 2] and np.isnan(evals["val_psnr"][0]) and evals["val_psnr"][1] == 30.0
