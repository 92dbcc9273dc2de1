"""Log analysis on logs of real `hpctrain train` runs: summary numbers against h5py, every plot,
the HTML page and CSV of `hpctrain report`, reading a log while it grows, and bad logs."""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.analysis import load, report
from hpctrain.analysis.load import load_log, load_logs
from hpctrain.analysis.plots import PLOTS, layer_table, plot_bytes_per_layer, plot_loss_and_accuracy, write_plots
from hpctrain.analysis.summary import SUMMARY_COLUMNS, default_target, summary_table
from hpctrain.errors import UserError
from hpctrain.h5log import StepLog
from hpctrain.local_launch import run_cli
from tests.helpers import REPO
from tests.chromium import chromium, run_page  # noqa: F401  (chromium is a fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS = ["train", "--config", REPO / "configs" / "digits.toml", "--set", "train.epochs=2",
          "--set", "train.progress=false"]
# Two short runs that differ in what the analysis reads: batch growth with per-layer stats,
# and fp16 compression (half the bytes on the wire) with no per-layer stats at all.
RUNS = {
    "grow": ["batch.policy='schedule'", "batch.at_epochs=[1]", "batch.max=128", "log.layers_every=5"],
    "fp16": ["train.lr=0.05", "compression.name='fp16'", "log.layers_every=0"],
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")

    def train(name: str) -> Path:
        sets = [a for s in [f"run.out_dir='{out}'", f"run.name='{name}'", *RUNS[name]] for a in ("--set", s)]
        run_cli(DIGITS + sets, timeout=180)
        return out / name / "log.h5"

    with ThreadPoolExecutor(len(RUNS)) as pool:   # two cores: both runs at once
        return dict(zip(RUNS, pool.map(train, RUNS)))


def h5_group(path: Path, group: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {c: f[group][c][:] for c in f[group]}


def expected_summary(path: Path, target: float) -> dict[str, float]:
    """The summary computed straight from the HDF5 datasets, independent of analysis.load."""
    s, e = h5_group(path, "steps"), h5_group(path, "evals")
    with h5py.File(path, "r") as f:
        world_size = int(f.attrs["world_size"])
    reached = np.flatnonzero(e["val_accuracy"] >= target)
    return {
        "world_size": world_size, "steps": len(s["step"]),
        "final_val_accuracy": e["val_accuracy"][-1], "best_val_accuracy": e["val_accuracy"].max(),
        "time_to_target_s": e["wall_time_s"][reached[0]] if len(reached) else math.nan,
        "step_at_target": e["step"][reached[0]] if len(reached) else math.nan,
        "total_wire_bytes": s["wire_bytes"].sum(), "total_dense_bytes": s["dense_bytes"].sum(),
        "compression_ratio": s["dense_bytes"].sum() / s["wire_bytes"].sum(),
        "mean_step_time_s": s["step_time_s"].mean(),
        "comm_time_share": s["comm_time_s"].sum() / s["step_time_s"].sum(),
        "samples_per_s": s["global_batch"].sum() / s["step_time_s"].sum(),
    }


def assert_row_matches(row, expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(float(value), rel=1e-9, nan_ok=True), key


def run_module(module: str, args: list) -> subprocess.CompletedProcess:
    """`python -m analysis.<module> ARGS`, as someone on a login node runs it."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


# -- loading -------------------------------------------------------------------------------
def test_groups_load_as_the_hdf5_columns(logs):
    for name, path in logs.items():
        log = load_log(path)
        assert log.name == name and log.config["run"]["name"] == name
        for group in ("steps", "evals", "events", "layers"):
            raw = h5_group(path, group)
            frame = log.group(group)
            assert set(frame.columns) == set(raw)
            for column, values in raw.items():
                got = frame[column].to_numpy()
                if values.dtype.kind in "SO":
                    assert list(got) == [v.decode() for v in values]
                else:
                    np.testing.assert_array_equal(got, values)
    grow, fp16 = load_log(logs["grow"]), load_log(logs["fp16"])
    assert len(grow.events) >= 1 and len(grow.layers) > 0       # the runs cover both cases
    assert len(fp16.events) == 0 and len(fp16.layers) == 0


def test_step_wall_time_meets_each_evaluation(logs):
    log = load_log(logs["grow"])
    wall = log.step_wall_time()
    assert np.all(np.diff(wall.to_numpy()) > 0)
    at_evals = wall[log.steps["step"].isin(log.evals["step"])].to_numpy()
    np.testing.assert_allclose(at_evals, log.evals["wall_time_s"].to_numpy(), rtol=1e-9)


def test_runs_with_one_name_are_told_apart_and_one_log_twice_is_refused(logs, tmp_path):
    copy = tmp_path / "again" / "log.h5"
    copy.parent.mkdir()
    shutil.copy(logs["grow"], copy)
    assert [log.name for log in load_logs([logs["grow"], copy])] == [str(logs["grow"]), str(copy)]
    with pytest.raises(UserError, match="twice"):
        load_logs([copy, copy])


def test_load_script_prints_a_group_as_csv(logs, capsys):
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args([str(logs["grow"]), "--group", "evals"])
    args.func(args)
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    expected = h5_group(logs["grow"], "evals")
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx(expected["val_accuracy"])


# -- summary -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [None, 0.3, 0.999])
def test_summary_matches_numbers_computed_from_hdf5(logs, target):
    ordered = load_logs(list(logs.values()))
    table = summary_table(ordered, target)
    bests = [h5_group(p, "evals")["val_accuracy"].max() for p in logs.values()]
    expected_target = min(bests) if target is None else target
    assert list(table["run"]) == list(logs)
    for (_, row), path in zip(table.iterrows(), logs.values()):
        assert row["target_accuracy"] == expected_target
        assert_row_matches(row, expected_summary(path, expected_target))
    if target == 0.999:
        assert table["time_to_target_s"].isna().all()
    else:
        assert table["time_to_target_s"].notna().all()
    assert default_target(ordered) == min(bests)


def test_compression_ratio_reflects_the_compressor(logs):
    grow, fp16 = summary_table(load_logs([logs["grow"], logs["fp16"]]))["compression_ratio"]
    assert grow == 1.0          # dense allreduce: every byte goes over the wire
    assert 1.5 < fp16 <= 2.0    # fp16 halves the compressed tensors; small biases ride dense


# -- plots and report ----------------------------------------------------------------------
def test_per_layer_table_matches_hdf5(logs):
    raw = h5_group(logs["grow"], "layers")
    table = layer_table(load_log(logs["grow"]))
    names = [n.decode() for n in raw["name"]]
    assert list(table.index) == list(dict.fromkeys(names))
    for name in table.index:
        mine = np.array([n == name for n in names])
        wire, dense = raw["wire_bytes"][mine].mean(), raw["dense_bytes"][mine].mean()
        assert table.loc[name, "wire_bytes"] == pytest.approx(wire)
        assert table.loc[name, "ratio"] == pytest.approx(dense / wire)


def assert_pngs(written: dict[str, Path]) -> None:
    assert set(written) >= set(PLOTS)
    for name in PLOTS:
        data = written[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_every_plot_is_written_for_a_run_without_events_or_layer_stats(logs, tmp_path):
    written = write_plots([load_log(logs["fp16"])], tmp_path)
    assert_pngs(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in PLOTS)  # no temp files left


def test_report_cli_writes_html_csv_and_prints_the_table(logs, tmp_path):
    out = tmp_path / "report"
    proc = run_cli(["report", logs["grow"], logs["fp16"], "--out", out, "--target-accuracy", "0.3"])
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["run", "world_size", "steps"] and "grow" in proc.stdout and "fp16" in proc.stdout

    assert_pngs({p.stem: p for p in out.glob("*.png")})
    page = (out / "report.html").read_text()
    images = page.split("data:image/png;base64,")[1:]
    assert len(images) == len(PLOTS)
    for (name, _), image in zip(PLOTS.items(), images):
        assert base64.b64decode(image.split("'", 1)[0]) == (out / f"{name}.png").read_bytes()
    assert "<table" in page and "time to target (s)" in page and "src='http" not in page
    advice = page.split("Does compression pay?", 1)[1]      # hpctrain advise's panel, one per run
    assert advice.count("<details>") >= len(logs) and "winner" in advice.split("<h2>Runs</h2>")[0]

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["grow", "fp16"]
    for row, path in zip(rows, (logs["grow"], logs["fp16"])):
        assert_row_matches(row, expected_summary(path, 0.3))


def synthetic_log(path: Path, name: str, warmup_steps: int, steps: int = 200) -> Path:
    """A log written through StepLog without training: dense per-layer records during the warm-up,
    4x compressed after it; steps alternately fast and slow, so step and wall time differ."""
    config = {"run": {"name": name}, "compression": {"name": "topk", "warmup_steps": warmup_steps}}
    with StepLog(path, {"world_size": 4, "config": json.dumps(config)}) as log:
        for s in range(1, steps + 1):
            wire = 4_000_000_000 if s <= warmup_steps else 1_000_000_000
            log.append("steps", dict(step=s, epoch=s // 50, loss=1.0 / s, lr=0.1, global_batch=64, samples_seen=64 * s,
                                     step_time_s=0.01 if s < steps // 2 else 0.2, comm_time_s=0.002,
                                     wire_bytes=wire, dense_bytes=4_000_000_000))
            if s % 5 == 0 or s == 1:
                log.append_many("layers", [dict(step=s, name=n, compressor="topk", dense_bytes=40,
                                                wire_bytes=40 if s <= warmup_steps else 10, ratio=4.0)
                                           for n in ("a.weight", "a.bias")])
            if s % 50 == 0:
                log.append("evals", dict(step=s, epoch=s // 50, val_loss=1.0 / s, val_accuracy=s / steps,
                                         wall_time_s=float(s)))
    return path


def test_per_layer_ratio_leaves_out_the_dense_warmup(tmp_path):
    log = load_log(synthetic_log(tmp_path / "w" / "log.h5", "warm", warmup_steps=30))
    table = layer_table(log)
    assert table["ratio"].tolist() == [4.0, 4.0] and table["wire_bytes"].tolist() == [10, 10]
    assert (log.layers["ratio"] == 4.0).all() and (log.layers["wire_bytes"] == 40).any()   # the log has both
    warm_only = load_log(synthetic_log(tmp_path / "v" / "log.h5", "all-warm", warmup_steps=500, steps=60))
    assert len(layer_table(warm_only)) == 0
    assert any("dense warm-up" in t.get_text() for t in plot_bytes_per_layer([warm_only]).texts)


def test_loss_vs_time_is_one_figure_with_loss_vs_step():
    loss_plots = [name for name in PLOTS if "loss" in name]
    assert loss_plots == ["loss_accuracy"]
    assert PLOTS["loss_accuracy"][1] is plot_loss_and_accuracy


def test_loss_figure_has_a_step_row_and_a_wall_time_row(tmp_path):
    log = load_log(synthetic_log(tmp_path / "w" / "log.h5", "warm", warmup_steps=0))
    axes = plot_loss_and_accuracy([log]).axes
    assert [ax.get_xlabel() for ax in axes] == ["step", "step", "wall time (s)", "wall time (s)"]
    step_line, time_line = axes[0].lines[0], axes[2].lines[0]
    np.testing.assert_array_equal(step_line.get_xdata(), log.steps["step"])
    np.testing.assert_allclose(time_line.get_xdata(), log.step_wall_time())


def test_summary_table_fits_the_report_page(chromium, tmp_path):  # noqa: F811
    long_name = "a-run-name-long-enough-to-need-wrapping-" * 3
    logs = [load_log(synthetic_log(tmp_path / n / "log.h5", n, warmup_steps=20))
            for n in (long_name, "short")]
    written = report.write_report(logs, tmp_path / "report")
    script = ("var t = document.querySelector('table.summary'), d = document.documentElement;"
              "window.testResult(JSON.stringify({table: t.getBoundingClientRect().right, page: d.clientWidth,"
              " scroll: d.scrollWidth, columns: t.rows[0].cells.length}));")
    for width in (1024, 1400):
        got = json.loads(run_page(chromium, written["report.html"], script, width=width))
        assert got["columns"] == len(SUMMARY_COLUMNS) - 1          # target_accuracy is in the caption
        assert got["table"] <= got["page"] and got["scroll"] <= got["page"], (width, got)


def test_scores_mode_needs_exactly_one_directory():
    with pytest.raises(UserError, match="scores DATA_DIR"):
        report._report(argparse.Namespace(paths=["scores"], out=None, target_accuracy=None))
    with pytest.raises(UserError, match="score page's selection: `hpctrain report scores DATA_DIR"):
        report._report(argparse.Namespace(paths=["log.h5"], out=None, target_accuracy=None, keep_fraction=0.5,
                                          keep=None))


# -- a log being written, and logs this version cannot read --------------------------------
WRITER = """
import sys
from hpctrain.h5log import StepLog
with StepLog(sys.argv[1], {"world_size": 1}) as log:
    print("ready", flush=True)
    for s in range(1, 100_000):
        log.append("steps", dict(step=s, epoch=0, loss=1.0 / s, lr=0.1, global_batch=64, samples_seen=64 * s,
                                 step_time_s=0.01, comm_time_s=0.002, wire_bytes=100, dense_bytes=400))
        if s % 5 == 0:
            log.append_many("layers", [dict(step=s, name=n, compressor="topk", wire_bytes=10, dense_bytes=40,
                                            ratio=4.0) for n in ("a.weight", "a.bias")])
"""


def test_reads_a_log_while_another_process_appends(tmp_path):
    path = tmp_path / "growing" / "log.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        lengths = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and writer.poll() is None:
            log = load_log(path)
            steps = log.steps
            n = len(steps)
            np.testing.assert_array_equal(steps["step"], np.arange(1, n + 1))
            np.testing.assert_allclose(steps["loss"], 1.0 / steps["step"])
            assert (steps["samples_seen"] == 64 * steps["step"]).all()
            assert set(log.layers["name"]) <= {"a.weight", "a.bias"}
            summary_table([log], 0.5)
            lengths.append(n)
        assert writer.poll() is None, "the writer finished before the reads were done; make it write more"
    finally:
        writer.kill()
        writer.wait()
    assert len(lengths) >= 5 and lengths == sorted(lengths) and lengths[-1] > lengths[0]


def test_other_schema_version_is_one_clear_line(logs, tmp_path):
    old_log = tmp_path / "old" / "log.h5"
    old_log.parent.mkdir()
    shutil.copy(logs["fp16"], old_log)
    with h5py.File(old_log, "a") as f:
        f.attrs["schema_version"] = 0
    proc = run_cli(["report", old_log, "--out", tmp_path / "r"], check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"hpctrain: error: log {str(old_log)!r} has schema version 0, this hpctrain reads version 1; "
        "use the hpctrain version that wrote it"]
    assert not (tmp_path / "r").exists()


def test_a_file_that_is_not_hdf5_is_one_clear_line(tmp_path):
    path = tmp_path / "log.h5"
    path.write_text("not hdf5")
    with pytest.raises(UserError, match="cannot be read as HDF5"):
        load_log(path)


def test_summary_script_writes_csv(logs, tmp_path):
    proc = run_module("analysis.summary", [logs["grow"], logs["fp16"], "--csv", tmp_path / "s.csv"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path / 's.csv'}"
    with open(tmp_path / "s.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["grow", "fp16"]


def test_strings_are_cut_at_their_own_column_width(tmp_path):
    """An event's reason keeps up to 512 bytes (auto's choice names its prediction late in the
    line); a layer name 96; cuts fall on a character boundary."""
    from hpctrain.h5log import read_log

    reason = "compression auto: per layer fp16 ×3, " + "x" * 200 + " predicted 1 ms/step" + "é" * 300
    with StepLog(tmp_path / "log.h5", {"world_size": 1}) as log:
        log.append("events", {"step": 1, "old_batch": 8, "new_batch": 8, "old_lr": 0.1, "new_lr": 0.1,
                              "reason": reason, "statistic": 1.0})
        log.append("layers", {"step": 1, "name": "é" * 60, "compressor": "topk", "wire_bytes": 1,
                              "dense_bytes": 4, "ratio": 4.0})
    got = read_log(tmp_path / "log.h5")
    kept = str(got["events"]["reason"][0])
    assert "predicted 1 ms/step" in kept and len(kept.encode()) <= 512 and reason.startswith(kept)
    assert str(got["layers"]["name"][0]) == "é" * 48
