"""Job templates: rendering against golden files and jsrun arithmetic, Slurm layouts, the engine
each site runs, bash -n and shellcheck on every site, one-line validation errors, and a real Slurm
that runs the job on the torch engine (srun alone) and on Horovod (srun --mpi=pmix).

Regenerate the golden files after an intended template change with
`HPCTRAIN_UPDATE_GOLDEN=1 pytest tests/test_jobs.py -k golden` and review the diff.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpctrain import jobs
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.local_launch import run_cli
from hpctrain.preempt import REQUEUE_EXIT_CODE
from tests.helpers import REPO
from tests.slurm_cluster import SlurmCluster, install_packages

GOLDEN = Path(__file__).parent / "golden"
CONFIG = "configs/digits.toml"
# Fixed paths so golden files do not depend on the machine; @REPO@ stands for the checkout.
GPFS = "/gpfs/alpine/abc123/scratch/alice/runs"
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


def parse(*argv: str, action: str = "render") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    jobs.add_arguments(parser)
    return parser.parse_args([action, "--config", CONFIG, *argv])


def plan(*argv: str) -> jobs.Job:
    return jobs.plan_job(parse(*argv), REPO, ["hpctrain"])


def render(*argv: str) -> str:
    return jobs.render(plan(*argv))


def jsrun_flags(script: str) -> dict[str, str]:
    """The jsrun line's flags as {flag: value}."""
    line = next(line for line in script.splitlines() if line.startswith("jsrun "))
    words = shlex.split(line.rstrip("\\"))[1:]
    return {words[i]: words[i + 1] for i in range(0, len(words), 2)}


def directives(script: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in script.splitlines() if line.startswith(prefix)]


# --- golden files ------------------------------------------------------------------------------

GOLDEN_CASES = {
    "lsf_summit_1node": ["--site", "summit", "--account", "abc123", "--out-dir", GPFS, "--set", "batch.initial=96"],
    "lsf_summit_4nodes_3gpus": [
        "--scheduler", "lsf", "--nodes", "4", "--gpus-per-node", "3", "--walltime", "0:45", "--account", "abc123",
        "--queue", "debug", "--name", "digits-small", "--out-dir", GPFS, "--set", "batch.initial=96",
        "--set", "horovod.fusion_threshold_mb=16", "--set", "horovod.cycle_time_ms=2.5"],
    "slurm_frontier_2nodes": ["--site", "frontier", "--account", "abc123", "--nodes", "2", "--out-dir", GPFS],
    "slurm_perlmutter_1node": ["--site", "perlmutter", "--account", "m1234", "--out-dir", GPFS],
    "slurm_local_horovod": ["--site", "local", "--engine", "horovod", "--out-dir", GPFS],
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_matches_golden(case):
    text = render(*GOLDEN_CASES[case]).replace(str(REPO), "@REPO@")
    golden = GOLDEN / f"{case}.sh"
    if os.environ.get("HPCTRAIN_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("nodes,gpus", [(1, 6), (2, 6), (16, 6), (4608, 6), (3, 3), (5, 1), (2, 4)])
def test_jsrun_arithmetic(nodes, gpus):
    ranks = nodes * gpus
    script = render("--site", "summit", "--account", "abc123", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                    "--out-dir", GPFS, "--set", f"batch.initial={ranks * 8}")
    flags = jsrun_flags(script)
    cores = 42 // gpus
    assert flags == {"-n": str(ranks), "-a": "1", "-c": str(cores), "-g": "1", "-r": str(gpus),
                     "--bind": f"packed:{cores}"}
    assert int(flags["-r"]) * int(flags["-c"]) <= 42 and int(flags["-r"]) * int(flags["-g"]) <= 6
    assert f"-nnodes {nodes}" in directives(script, "#BSUB")
    assert f'export OMP_NUM_THREADS="{cores}"' in script


# --- Slurm (Frontier, Perlmutter) -----------------------------------------------------------------

def test_frontier_one_rank_per_gcd_bound_closest():
    script = render("--site", "frontier", "--account", "abc123", "--nodes", "2", "--out-dir", GPFS)
    sbatch = directives(script, "#SBATCH")
    for flag in ("-A abc123", "-N 2", "--ntasks-per-node=8", "-c 7", "--gpus-per-task=1", "--gpu-bind=closest",
                 "-t 02:00:00", "-p batch", "--requeue"):
        assert flag in sbatch
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.startswith("srun -N 2 -n 16 --ntasks-per-node=8 -c 7 --kill-on-bad-exit=1 --cpu-bind=cores "
                           "--gpus-per-task=1 --gpu-bind=closest")
    # OLCF's PyTorch guide: RCCL over Slingshot, MIOpen caches in /tmp, srun without torchrun.
    assert 'export HPCTRAIN_BACKEND="torch"' in script and 'export NCCL_SOCKET_IFNAME="hsn0"' in script
    assert 'export MIOPEN_USER_DB_PATH="/tmp/' in script and 'export MIOPEN_CUSTOM_CACHE_DIR="/tmp/' in script
    assert "torchrun" not in srun


def test_perlmutter_gpus_per_node_and_hardware_threads():
    script = render("--site", "perlmutter", "--account", "m1234", "--nodes", "3", "--gpus-per-node", "2",
                    "--walltime", "12:30", "--out-dir", GPFS, "--set", "batch.initial=96")
    sbatch = directives(script, "#SBATCH")
    for flag in ("-A m1234", "-N 3", "--ntasks-per-node=2", "-c 64", "--gpus-per-node=2", "-t 12:30:00",
                 "-q regular", "-C gpu"):
        assert flag in sbatch
    assert not any(flag.startswith("-p ") for flag in sbatch)
    assert 'export OMP_NUM_THREADS="32"' in script  # 64 hardware threads = 32 cores per rank


def test_train_command_environment_and_run_dir():
    job = plan("--site", "local", "--out-dir", "runs-x", "--name", "trial", "--set", "train.epochs=1",
               "--set", "horovod.fusion_threshold_mb=32", "--set", "horovod.cycle_time_ms=0.5")
    assert job.run_dir == REPO / "runs-x" / "trial"
    assert job.engine == "torch" and job.env["HPCTRAIN_BACKEND"] == "torch"
    assert job.env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert not any(key.startswith("HOROVOD_") for key in job.env)  # Horovod's knobs only for Horovod
    horovod = plan("--site", "local", "--engine", "horovod", "--set", "horovod.fusion_threshold_mb=32",
                   "--set", "horovod.cycle_time_ms=0.5")
    assert horovod.env["HPCTRAIN_BACKEND"] == "horovod"
    assert horovod.env["HOROVOD_FUSION_THRESHOLD"] == str(32 * 1024 * 1024)
    assert horovod.env["HOROVOD_CYCLE_TIME"] == "0.5"
    assert job.train_command == [
        "hpctrain", "train", "--config", str(REPO / CONFIG), "--resume=auto", "--set", "train.epochs=1",
        "--set", "horovod.fusion_threshold_mb=32", "--set", "horovod.cycle_time_ms=0.5",
        "--set", f'run.out_dir="{REPO / "runs-x"}"', "--set", 'run.name="trial"']
    script = jobs.render(job)
    # The script's own shell must hand the same words to hpctrain.
    launch = script[script.index("\nsrun ") + 1:script.index(" || rc=$?")].replace("\\\n", " ")
    assert shlex.split(launch)[-len(job.train_command):] == job.train_command
    assert f"#SBATCH -o {job.run_dir}/job-%j.out" in script


SITES = ["summit", "frontier", "perlmutter", "local"]
SITE_ENGINES = {"summit": "horovod", "frontier": "torch", "perlmutter": "torch", "local": "torch"}


def exports(script: str) -> dict[str, str]:
    return dict(re.findall(r'^export ([A-Za-z_][A-Za-z0-9_]*)="(.*)"$', script, re.M))


@pytest.mark.parametrize("site", SITES)
def test_each_site_names_its_engine(site):
    assert jobs.load_site(site).engine == SITE_ENGINES[site]
    script = render("--site", site, "--account", "abc123", "--out-dir", GPFS, "--set", "batch.initial=96")
    env = exports(script)
    engine = SITE_ENGINES[site]
    assert env["HPCTRAIN_BACKEND"] == engine
    assert ("HOROVOD_FUSION_THRESHOLD" in env) == (engine == "horovod")
    assert f"# Engine: {'torch.distributed' if engine == 'torch' else 'Horovod'}" in script
    # The launcher is the scheduler's own: no torchrun, no mpirun in any job.
    commands = [line for line in script.splitlines() if not line.startswith("#")]
    assert not any("torchrun" in line or "mpirun" in line for line in commands)
    launch = next(line for line in script.splitlines() if line.startswith(("srun ", "jsrun ")))
    assert launch.startswith("jsrun " if site == "summit" else "srun ")
    if launch.startswith("srun "):
        assert " --kill-on-bad-exit=1 " in launch


@pytest.mark.parametrize("argv,engine", [
    (["--site", "frontier", "--engine", "horovod"], "horovod"),
    (["--site", "summit", "--engine", "torch"], "torch"),
    (["--site", "local", "--set", 'dist.backend="horovod"'], "horovod"),  # the run config names it
    (["--site", "summit", "--set", 'dist.backend="torch"', "--engine", "torch"], "torch"),
    (["--site", "summit", "--set", 'dist.backend="auto"'], "horovod"),  # auto: the site decides
])
def test_engine_override(argv, engine):
    job = plan("--account", "abc123", "--set", "batch.initial=96", *argv)
    assert job.engine == engine and job.env["HPCTRAIN_BACKEND"] == engine
    assert exports(jobs.render(job))["HPCTRAIN_BACKEND"] == engine


def test_engine_cli_option(tmp_path):
    proc = run_cli(["jobs", "render", "--site", "local", "--engine", "horovod", "--config", CONFIG,
                    "--out-dir", tmp_path])
    assert 'export HPCTRAIN_BACKEND="horovod"' in proc.stdout and "HOROVOD_FUSION_THRESHOLD" in proc.stdout
    proc = run_cli(["jobs", "render", "--site", "local", "--engine", "mpi", "--config", CONFIG,
                    "--out-dir", tmp_path], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hpctrain: error: --engine 'mpi' is not an engine; choose one of torch, horovod"]


@pytest.mark.parametrize("site", SITES)
def test_scripts_pass_bash_n_and_shellcheck(site, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(render("--site", site, "--account", "abc123", "--nodes", "2", "--out-dir", str(tmp_path),
                             "--set", "batch.initial=96"))
    subprocess.run(["bash", "-n", str(script)], check=True)
    proc = subprocess.run([SHELLCHECK, "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_templates_and_site_file_overrides(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(jobs.JOBS_DIR, templates, ignore=shutil.ignore_patterns("sites"))
    slurm = templates / "slurm.sh.tmpl"
    slurm.write_text(slurm.read_text().replace("set -euo pipefail", "set -euo pipefail\nmodule load mine"))
    site = tmp_path / "mycluster.toml"
    site.write_text('scheduler = "slurm"\ngpus_per_node = 2\ncpus_per_node = 16\nqueue = "gpu"\n'
                    'setup = ["source /opt/env.sh"]\n[env]\nNCCL_DEBUG = "WARN"\n')
    args = parse("--site-file", str(site), "--templates", str(templates))
    text = jobs.render(jobs.plan_job(args, REPO, ["hpctrain"]), args.templates)
    assert "module load mine" in text and "source /opt/env.sh" in text and 'export NCCL_DEBUG="WARN"' in text
    assert "#SBATCH -p gpu" in text and "#SBATCH --gpus-per-node=2" in text and "#SBATCH -c 8" in text
    assert "hpctrain job for mycluster" in text


# --- validation: one clear line --------------------------------------------------------------------

def write_site(tmp_path: Path, body: str) -> str:
    path = tmp_path / "site.toml"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("argv,message", [
    (["--site", "summit", "--account", "a", "--gpus-per-node", "8"], "--gpus-per-node 8 is more than a summit node has (6)"),
    (["--site", "local", "--gpus-per-node", "1"], "site 'local' has no GPUs"),
    (["--site", "local", "--ranks-per-node", "3"], "--ranks-per-node 3 is more than the 2 CPUs"),
    (["--site", "summit", "--account", "a", "--ranks-per-node", "2"], "summit runs one rank per GPU"),
    (["--site", "local", "--nodes", "0"], "at least one node"),
    (["--site", "local", "--walltime", "2h"], "walltime '2h' is not HH:MM"),
    (["--site", "local", "--walltime", "1:75"], "walltime '1:75' is not HH:MM"),
    (["--site", "local", "--walltime", "0:00"], "more than zero"),
    (["--site", "perlmutter"], "site 'perlmutter' charges every job to a project: pass --account"),
    (["--site", "summit"], "pass --account PROJECT (lsf -P)"),
    (["--site", "nosuch"], "unknown site 'nosuch'; choose one of frontier, local, perlmutter, summit"),
    (["--scheduler", "pbs"], "unknown scheduler 'pbs'"),
    (["--site", "summit", "--scheduler", "slurm"], "site 'summit' uses lsf, not slurm"),
    ([], "no site given"),
    (["--site", "local", "--name", "my run"], "--name 'my run' may not contain spaces"),
    (["--site", "local", "--nodes", "3"], "batch.initial = 64 is not divisible by world size 6"),
    (["--site", "local", "--set", "horovod.cycle_time_ms=0"], "horovod.cycle_time_ms = 0.0 positive"),
    (["--site", "local", "--set", "horovod.fusion_mb=1"], "unknown key 'horovod.fusion_mb'"),
    (["--site", "local", "--site-file", "x.toml"], "either --site or --site-file"),
    (["--site", "local", "--engine", "mpi"], "--engine 'mpi' is not an engine; choose one of torch, horovod"),
    (["--site", "local", "--engine", "torch", "--set", 'dist.backend="horovod"'],
     "--engine torch contradicts dist.backend = 'horovod' in the run config"),
])
def test_impossible_requests_fail_in_one_line(argv, message):
    with pytest.raises(UserError) as info:
        plan(*argv)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("body,message", [
    ('scheduler = "pbs"\n', "scheduler = 'pbs' is not supported; use 'lsf' or 'slurm'"),
    ('scheduler = "slurm"\ngpus_per_nod = 4\n', "unknown key 'gpus_per_nod'"),
    ('scheduler = "slurm"\ngpu_request = "some"\n', "gpu_request = 'some' is not allowed"),
    ('scheduler = "slurm"\nqueue = "two words"\n', "queue 'two words' may not contain spaces"),
    ('scheduler = "slurm"\n[env]\nX = "a\\"b"\n', "env X = 'a\"b'"),
    ('scheduler = "slurm\n', "is not valid TOML"),
    ('scheduler = "slurm"\nengine = "mpi"\n', "engine = 'mpi' is not allowed; choose one of 'torch', 'horovod'"),
    ('scheduler = "slurm"\n[env]\nHPCTRAIN_BACKEND = "torch"\n', "env HPCTRAIN_BACKEND; set engine = 'torch' or 'horovod'"),
])
def test_bad_site_files_fail_in_one_line(tmp_path, body, message):
    with pytest.raises(UserError) as info:
        plan("--site-file", write_site(tmp_path, body))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parse_job_id_from_scheduler_output():
    assert jobs.parse_job_id("lsf", "Job <123456> is submitted to queue <batch>.\n") == "123456"
    assert jobs.parse_job_id("slurm", "4242\n") == "4242"
    assert jobs.parse_job_id("slurm", "4242;perlmutter\n") == "4242"
    assert jobs.parse_job_id("slurm", "sbatch: error: Batch job submission failed\n") is None


def test_submit_without_sbatch_says_so_in_one_line(tmp_path):
    proc = run_cli(["jobs", "submit", "--site", "local", "--config", CONFIG, "--out-dir", tmp_path],
                   env={"PATH": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hpctrain: error: sbatch not found on PATH; submit from a slurm login node, "
        "or run `hpctrain jobs render` there and submit the script yourself"]
    assert not any(tmp_path.rglob("job.sh"))


def test_missing_bsub_is_found_before_submitting(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="^bsub not found on PATH; submit from a lsf login node"):
        jobs.submit_program("lsf")


def test_render_cli_prints_the_script_and_writes_nothing(tmp_path):
    """The script on stdout, nothing on stderr, no file or directory made (the job or `submit` makes
    the run directory), and no path of the rendering machine's environment unless --python asks."""
    (tmp_path / "cwd").mkdir()
    argv = ["jobs", "render", "--site", "local", "--config", REPO / CONFIG, "--out-dir", tmp_path / "out", "--name", "r1"]
    proc = run_cli(argv, cwd=tmp_path / "cwd")
    assert proc.stdout.startswith("#!/bin/bash\n") and f"#SBATCH -o {tmp_path}/out/r1/job-%j.out" in proc.stdout
    assert proc.stderr == ""
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "cwd"]
    assert 'mkdir -p "$RUN_DIR"' in proc.stdout            # the job makes it, as does `submit`
    for path in {sys.executable, sys.prefix, str(Path(sys.executable).parent)}:
        assert path not in proc.stdout
    assert " \\\n    hpctrain train --config " in proc.stdout   # the `hpctrain` on the job's PATH

    pinned = run_cli([*argv, "--python", sys.executable], cwd=tmp_path / "cwd")
    assert f"\n    {shlex.quote(sys.executable)} -m hpctrain train --config " in pinned.stdout
    assert "pins one" not in pinned.stdout and "pins one" in proc.stdout
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "cwd"]


def test_python_option(tmp_path):
    assert jobs.hpctrain_command(None, tmp_path) == ["hpctrain"]
    assert jobs.hpctrain_command("python3", tmp_path) == ["python3", "-m", "hpctrain"]   # looked up on the nodes
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    # Absolute, but not resolved: a venv's python is a symlink out of the venv.
    assert jobs.hpctrain_command("venv/bin/python", tmp_path) == [str(venv_python), "-m", "hpctrain"]
    with pytest.raises(UserError, match="^--python venv/bin/nope: no such file"):
        jobs.hpctrain_command("venv/bin/nope", tmp_path)


def test_templates_and_sites_come_from_the_checkout_jobs_dir():
    assert jobs.JOBS_DIR == jobs.jobs_dir() == REPO / "jobs"
    assert jobs.available_sites() == sorted(p.stem for p in (REPO / "jobs" / "sites").glob("*.toml"))


# --- a real one-node Slurm -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    why_not = install_packages()
    if why_not:
        pytest.skip(f"no Slurm: {why_not}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit_and_wait(slurm: SlurmCluster, out_dir: Path, max_steps: int, monkeypatch, capsys, *extra: str) -> str:
    """`hpctrain jobs submit` in this process (saves a torch import), then wait for the job to end."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    # The job's own export must decide the engine, not whatever the submitting shell passes on.
    monkeypatch.setenv("HPCTRAIN_BACKEND", "auto")
    args = parse("--site", "local", "--python", sys.executable, "--out-dir", str(out_dir), "--set", "train.epochs=1",
                 "--set", f"train.max_steps={max_steps}", "--set", "train.progress=false", *extra, action="submit")
    assert args.func(args) == 0
    job_id = capsys.readouterr().out.strip()
    assert re.fullmatch(r"\d+", job_id), job_id
    state = slurm.wait_job(job_id)
    output = "".join(p.read_text() for p in sorted((out_dir / "digits").glob(f"job-{job_id}.*")))
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{output}"
    return job_id


def test_slurm_job_trains_two_ranks_on_torch_engine_and_resumes_when_resubmitted(slurm, tmp_path, monkeypatch,
                                                                                    capsys):
    first = submit_and_wait(slurm, tmp_path, max_steps=3, monkeypatch=monkeypatch, capsys=capsys)
    run_dir = tmp_path / "digits"
    commands = [line for line in (run_dir / jobs.SCRIPT_NAME).read_text().splitlines() if not line.startswith("#")]
    assert not any("mpirun" in line or "torchrun" in line for line in commands)  # srun alone starts the ranks
    assert any(line.startswith("srun ") for line in commands)
    log = read_log(run_dir / "log.h5")
    assert log["attrs"]["world_size"] == 2
    assert list(log["steps"]["step"]) == [1, 2, 3]
    out = (run_dir / f"job-{first}.out").read_text()
    assert "hpctrain: engine torch.distributed (gloo), 2 rank(s)" in out.splitlines()

    second = submit_and_wait(slurm, tmp_path, max_steps=5, monkeypatch=monkeypatch, capsys=capsys)
    log = read_log(run_dir / "log.h5")
    assert list(log["steps"]["step"]) == [1, 2, 3, 4, 5]
    assert list(log["evals"]["step"]) == [3, 5]  # a fresh start would have rewritten the log
    assert [line.split()[0] for line in (run_dir / "jobs.txt").read_text().splitlines()] == [first, second]
    assert (run_dir / f"job-{second}.out").is_file()


@pytest.mark.mpi
def test_slurm_job_trains_on_horovod_via_srun_pmix(slurm, tmp_path, monkeypatch, capsys):
    pytest.importorskip("horovod.torch")
    job_id = submit_and_wait(slurm, tmp_path, 2, monkeypatch, capsys, "--engine", "horovod")
    run_dir = tmp_path / "digits"
    assert list(read_log(run_dir / "log.h5")["steps"]["step"]) == [1, 2]
    out = (run_dir / f"job-{job_id}.out").read_text()
    assert any(line.startswith("hpctrain: engine horovod") and line.endswith("2 rank(s)") for line in out.splitlines()), out


def test_slurm_step_ends_when_one_rank_fails(slurm, tmp_path):
    """The rendered srun line (--kill-on-bad-exit=1) takes the step down when one rank exits non-zero,
    instead of leaving its peers waiting in a collective until the timeout."""
    script = render("--site", "local", "--out-dir", str(tmp_path))
    srun = next(line for line in script.splitlines() if line.startswith("srun ")).rstrip(" \\")
    payload = "if [ \"$SLURM_PROCID\" = 1 ]; then exit 3; fi; sleep 120"
    wrap = f"{srun} bash -c {shlex.quote(payload)}"
    proc = slurm.command("sbatch", "--parsable", "-N", "1", "-n", "2", "-o", str(tmp_path / "out"), "--wrap", wrap)
    assert proc.returncode == 0, proc.stderr
    start = time.monotonic()
    state = slurm.wait_job(jobs.parse_job_id("slurm", proc.stdout), timeout=90)
    assert state == "FAILED" and time.monotonic() - start < 60, (state, (tmp_path / "out").read_text())


def test_slurm_step_keeps_the_requeue_code_when_one_rank_exits_first(slurm, tmp_path):
    """Ranks that checkpointed on a stop signal all exit 75, but not at the same instant: srun
    --kill-on-bad-exit terminates the ones still tearing down as the first leaves. Those must
    exit 75 too, or the step's code says "failed" and the script does not requeue."""
    script = render("--site", "local", "--out-dir", str(tmp_path))
    srun = next(line for line in script.splitlines() if line.startswith("srun ")).rstrip(" \\")
    payload = ("import os, sys, time; from hpctrain import preempt; "
               "preempt.StopSignals().install().exit_on_signal(preempt.REQUEUE_EXIT_CODE); "
               "sys.exit(preempt.REQUEUE_EXIT_CODE) if os.environ['SLURM_PROCID'] == '1' else time.sleep(120)")
    rc_file = tmp_path / "rc"
    wrap = f"cd {REPO}; {srun} {sys.executable} -c {shlex.quote(payload)}; echo $? > {rc_file}"
    proc = slurm.command("sbatch", "--parsable", "-N", "1", "-n", "2", "-o", str(tmp_path / "out"), "--wrap", wrap)
    assert proc.returncode == 0, proc.stderr
    slurm.wait_job(jobs.parse_job_id("slurm", proc.stdout), timeout=90)
    assert rc_file.read_text().strip() == str(REQUEUE_EXIT_CODE), (tmp_path / "out").read_text()


def test_slurm_walltime_signal_checkpoints_and_requeues(slurm, tmp_path, monkeypatch, capsys):
    """A job past its time limit: Slurm sends SIGUSR1 (--signal=USR1@30 on a one-minute job), every rank
    checkpoints the step in flight and exits 75, the script requeues the job (same id), and the
    requeued job resumes from that checkpoint."""
    from hpctrain import checkpoint

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("HPCTRAIN_BACKEND", "auto")
    args = parse("--site", "local", "--python", sys.executable, "--out-dir", str(tmp_path), "--walltime", "0:01",
                 "--set", "train.epochs=100000",
                 "--set", "train.progress=false", "--set", "checkpoint.every_epochs=0", action="submit")
    assert args.func(args) == 0
    job_id = capsys.readouterr().out.strip()
    run_dir = tmp_path / "digits"
    assert "#SBATCH --signal=USR1@30" in (run_dir / jobs.SCRIPT_NAME).read_text()
    deadline = time.monotonic() + 240
    out = ""
    while time.monotonic() < deadline:
        out = "".join(p.read_text() for p in sorted(run_dir.glob(f"job-{job_id}.*")))
        if out.count("hpctrain: engine ") >= 2 and "resuming from" in out:
            break
        time.sleep(2)
    slurm.command("scancel", job_id)
    assert "SIGUSR1 received: every rank stopped after step" in out, out
    assert "requeueing job" in out and "resuming from" in out, out
    stopped = int(re.search(r"stopped after step (\d+)", out)[1])
    assert f"step-{stopped:09d}.pt" in out                      # resumed from the step in flight
    assert checkpoint.list_checkpoints(run_dir)
