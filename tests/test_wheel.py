"""A wheel-installed hpctrain: build the wheel, install it into a fresh virtual environment, and
render a job for every site there (templates and site profiles ship as package data); the wheel
holds the `hpctrain` package only (no top-level `analysis` or `jobs`), and `hpctrain report` works.

The fresh environment sees this environment's packages (torch, numpy, ...) through a .pth file
naming its site-packages: `venv --system-site-packages` run from a venv's python would give the
base interpreter's packages instead, and a plain path entry, unlike site-packages itself, does not
run this environment's editable-install hook (which would put the checkout's hpctrain back).
Everything runs from a temporary directory, so the checkout is not on sys.path either.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from hpctrain.local_launch import run_cli
from tests.helpers import REPO

SITES = sorted(p.stem for p in (REPO / "jobs" / "sites").glob("*.toml"))
TEMPLATES = sorted(p.name for p in (REPO / "jobs").glob("*.sh.tmpl"))
CONFIG = REPO / "configs" / "digits.toml"


def _run(cmd: list, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _source_copy(dest: Path) -> Path:
    """The files git tracks or would track (tracked and untracked, not ignored): what a release builds
    from, without the checkout's build/, egg-info or caches."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listing):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the source files")
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", "."],
         cwd=src, timeout=300)
    (built,) = (root / "dist").glob("hpctrain-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps), this environment's packages visible."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "_hpctrain_test_deps.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root, timeout=300)
    return env_dir


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return dict(env, PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1")


def test_the_wheel_holds_hpctrain_with_its_job_files_and_nothing_top_level_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"hpctrain", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    for template in TEMPLATES:
        assert f"hpctrain/_jobs/{template}" in names
    for site in SITES:
        assert f"hpctrain/_jobs/sites/{site}.toml" in names
    for module in ("__init__", "load", "summary", "plots", "report", "scores"):
        assert f"hpctrain/analysis/{module}.py" in names
    assert "hpctrain/commands/train.py" in names


def test_installed_hpctrain_renders_a_job_for_every_site(venv, tmp_path):
    env = _env(venv)
    where = _run([venv / "bin" / "python", "-c", "import hpctrain, hpctrain.jobs as j; print(hpctrain.__file__); "
                  "print(j.JOBS_DIR); print(' '.join(j.available_sites()))"], cwd=tmp_path, env=env).stdout.split("\n")
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]).is_relative_to(venv), where
    assert where[2].split() == SITES
    for site in SITES:
        argv = ["jobs", "render", "--site", site, "--account", "abc123", "--nodes", "2", "--config", CONFIG,
                "--out-dir", tmp_path / "runs", "--set", "batch.initial=96"]
        installed = _run([venv / "bin" / "hpctrain", *argv], cwd=tmp_path, env=env)
        assert installed.stdout.startswith("#!/bin/bash\n") and installed.stderr == ""
        # The same script as the checkout renders (the same templates and site profile).
        assert installed.stdout == run_cli(argv, cwd=tmp_path).stdout, site
    assert not (tmp_path / "runs").exists()       # render writes nothing


def test_no_analysis_package_but_hpctrain_report_works(venv, tmp_path):
    env = _env(venv)
    proc = subprocess.run([venv / "bin" / "python", "-c", "import analysis"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "ModuleNotFoundError: No module named 'analysis'" in proc.stderr, proc.stderr
    report = _run([venv / "bin" / "hpctrain", "report", "--help"], cwd=tmp_path, env=env)
    assert report.stdout.startswith("usage: hpctrain report")
    _run([venv / "bin" / "python", "-c", "from hpctrain.analysis.load import load_log"], cwd=tmp_path, env=env)
