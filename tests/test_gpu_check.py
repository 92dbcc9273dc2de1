"""benchmarks/gpu_check.py: its CPU mode (what CI can run of the GPU check) passes and writes the
report, and the verdict turns any failed check into a non-zero exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import CHECKS, CheckResult, Table, parse_checks, render_markdown, run_check, verdict
from hpctrain.local_launch import local_env
from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SINGLE_PROCESS = [k for k in CHECKS if k != "ranks"]


def _run_cpu_mode(out: Path, checks: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """The command CI runs, forced onto the CPU (CUDA hidden) as on a machine without a GPU."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--checks", ",".join(checks)],
                          cwd=REPO, env=local_env({"CUDA_VISIBLE_DEVICES": ""}), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"gpu_check exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report


def _assert_report(out: Path, report: dict, checks: list[str]) -> None:
    assert report["exit_code"] == 0 and report["meta"]["mode"] == "cpu"
    assert [c["key"] for c in report["checks"]] == checks
    assert all(c["status"] == "pass" and c["tables"] and c["tables"][0]["rows"] for c in report["checks"])
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# hpctrain GPU check: PASS") and "CPU mode" in md
    assert report["meta"]["git_commit"] and report["meta"]["torch"] in md


def test_cpu_mode_single_process_checks_pass_and_write_the_report(tmp_path):
    proc, report = _run_cpu_mode(tmp_path, SINGLE_PROCESS, timeout=240)
    assert sum("CPU mode" in line for line in proc.stdout.splitlines()) == 1       # says so, once
    _assert_report(tmp_path, report, SINGLE_PROCESS)
    codec_cost = next(c for c in report["checks"] if c["key"] == "codec-cost")
    labels = {row[1] for row in codec_cost["tables"][0]["rows"]}
    assert {"clone()", "adacomp fc (bins of 500)", "threshold 0.001", "lowrank 4"} <= labels


@pytest.mark.mpi
def test_cpu_mode_four_ranks_train_with_identical_parameters(tmp_path):
    _, report = _run_cpu_mode(tmp_path, ["ranks"], timeout=240)
    _assert_report(tmp_path, report, ["ranks"])
    (table,) = report["checks"][0]["tables"]
    assert all(row[4] is True and row[5] == 0.0 for row in table["rows"])       # identical on every rank


def _passing(r: CheckResult) -> None:
    r.tables.append(Table("t", ["a"], [[1.0]]))


def test_a_failed_expectation_or_an_exception_fails_the_check_and_the_exit_code():
    ok = run_check("training", "3. ok", _passing)
    failed = run_check("fusion", "5. failed", lambda r: r.expect(False, "fused updates differ"))
    crashed = run_check("amp", "6. crashed", lambda r: 1 / 0)
    skipped = CheckResult("ranks", "4. skipped", status="skip")
    assert (ok.status, failed.status, crashed.status) == ("pass", "fail", "fail")
    assert failed.failures == ["fused updates differ"] and crashed.failures == ["ZeroDivisionError: division by zero"]
    assert verdict([ok, skipped]) == 0
    assert verdict([ok, failed]) == 1 and verdict([crashed]) == 1 and verdict([]) == 0
    with pytest.raises(ValueError):
        verdict([CheckResult("x", "x", status="maybe")])


def test_the_report_names_the_failure_and_the_checks_not_run_yet():
    meta = {"date": "2026-01-01T00:00:00+00:00", "device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0",
            "python": "3.12.3", "git_commit": "abc1234", "host": "gpu01", "engine": "torch.distributed (nccl)",
            "mode": "cuda"}
    failed = run_check("fusion", "5. Optimizer fusion", lambda r: r.expect(False, "forward 0.1 away from none"))
    md = render_markdown(meta, [failed], ["fusion", "amp"])
    assert md.startswith("# hpctrain GPU check: running")
    assert "- FAILED: forward 0.1 away from none" in md and "| 6. Mixed precision | not run yet |" in md
    assert "NVIDIA H200" in md and "abc1234" in md and "CPU mode" not in md
    assert render_markdown(meta, [failed], ["fusion"]).startswith("# hpctrain GPU check: FAIL: fusion")


def test_checks_are_chosen_by_number_or_name_in_run_order():
    assert parse_checks("all") == list(CHECKS)
    assert parse_checks("5,2") == ["codec-cost", "fusion"]
    assert parse_checks("amp,1") == ["correctness", "amp"]
    with pytest.raises(Exception, match="unknown check"):
        parse_checks("7")
