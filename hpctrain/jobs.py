"""`hpctrain jobs`: render LSF (jsrun) and Slurm (srun) job scripts for a run, or submit them.

A site profile (`jobs/sites/NAME.toml`, or your own with `--site-file`) holds what a machine
is: scheduler, GPUs and usable cores per node, queue and account conventions, the
communication engine that runs there (torch.distributed or Horovod) and its environment.
The script selects the engine with `export HPCTRAIN_BACKEND=...`, which wins over the run
config's `dist.backend` and over anything the submitting shell exports.
The templates (`jobs/lsf.sh.tmpl`, `jobs/slurm.sh.tmpl`, Jinja2) turn a site, a node count and
a run config into a script; everything a scheduler would reject hours later in the queue
(too many GPUs per node, a bad walltime, a missing account, a batch size the world size does
not divide) is rejected here, in one line.

The top-level `jobs/` directory of a checkout is the source of truth; a wheel ships its files as
package data (`hpctrain/_jobs/`, mapped from `jobs/` in setup.cfg), so an installed hpctrain renders
jobs too (`jobs_dir`).
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2

import hpctrain
from hpctrain.config import Config, check_world_size, load_config
from hpctrain.atomic import write_atomic
from hpctrain.errors import UserError
from hpctrain.preempt import REQUEUE_EXIT_CODE
from hpctrain.schema import build

TEMPLATES = ("lsf.sh.tmpl", "slurm.sh.tmpl")


def jobs_dir() -> Path:
    """The job templates and site profiles: those a wheel installs (`hpctrain/_jobs`, package data),
    else the checkout's top-level `jobs/` (an editable install or a plain checkout, where
    `hpctrain/_jobs` holds only its placeholder `__init__.py`)."""
    packaged = importlib.resources.files(hpctrain) / "_jobs"
    if all(packaged.joinpath(name).is_file() for name in TEMPLATES):
        return Path(str(packaged))
    return Path(hpctrain.__file__).resolve().parents[1] / "jobs"


JOBS_DIR = jobs_dir()
SITES_DIR = JOBS_DIR / "sites"
# The site `--scheduler` alone stands for.
REFERENCE_SITES = {"lsf": "summit", "slurm": "perlmutter"}
SUBMIT_COMMANDS = {"lsf": "bsub", "slurm": "sbatch"}
SCRIPT_NAME = "job.sh"
# Written by `hpctrain train` into the run directory at every checkpoint: {"checkpoint_s", "step_s"}.
TIMING_FILE = "timing.json"
# Communication engines a job can run (`dist.backend` without "auto": a job names its engine).
ENGINES = ("torch", "horovod")
# Values that go into #BSUB/#SBATCH lines, which no shell unquotes.
_DIRECTIVE_VALUE = re.compile(r"[^\s'\"#\\]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Site:
    description: str = ""
    scheduler: str = ""
    gpus_per_node: int = 0
    # CPUs a job may use per node, in the unit the launcher's -c counts (cores, or hardware threads).
    cpus_per_node: int = 1
    threads_per_core: int = 1
    # CPU-only sites: ranks per node unless --ranks-per-node says otherwise (GPU sites run one per GPU).
    ranks_per_node: int = 0
    account_required: bool = False
    account: str = ""
    # LSF -q / Slurm -p (partition); Slurm -q (QOS); Slurm -C (constraint).
    queue: str = ""
    qos: str = ""
    constraint: str = ""
    # Slurm: --gpus-per-node=G, or --gpus-per-task=1 (then gpu_bind, e.g. "closest", pins them).
    gpu_request: Literal["per-node", "per-task"] = "per-node"
    gpu_bind: str = ""
    cpu_bind: str = "cores"
    walltime: str = "01:00"
    # The communication engine: "torch" (torch.distributed: NCCL/RCCL on GPUs, Gloo on CPUs;
    # no MPI or torchrun needed) or "horovod" (needs an MPI-wired launch: jsrun, srun --mpi=pmix).
    # `hpctrain jobs render --engine` or an explicit `dist.backend` in the run config overrides it.
    engine: Literal["torch", "horovod"] = "torch"
    # Extra launcher (jsrun/srun) flags, e.g. ["--mpi=pmix"].
    launcher_args: list[str] = field(default_factory=list)
    # Shell lines run before launching (module loads); env values may use $VARS.
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Link figures for `hpctrain advise --site` (read by hpctrain/cost/links.py): inter_gbit,
    # intra_gbit, latency_us, intra_latency_us.
    links: dict[str, float] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class Layout:
    """Ranks, GPUs and CPUs per node; one rank per GPU on GPU sites."""

    nodes: int
    ranks_per_node: int
    gpus_per_node: int
    cpus_per_rank: int
    omp_threads: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class Job:
    site: Site
    layout: Layout
    engine: str
    name: str
    account: str
    queue: str
    qos: str
    walltime_minutes: int
    run_dir: Path
    work_dir: Path
    train_command: list[str]
    env: dict[str, str]
    # Seconds before the walltime the ranks get SIGUSR1 to checkpoint, and what sized it.
    signal_seconds: int = 120
    signal_basis: str = ""
    requeue_code: int = REQUEUE_EXIT_CODE

    @property
    def signal_minutes(self) -> int:
        return max(1, -(-self.signal_seconds // 60))

    @property
    def walltime(self) -> str:
        """LSF -W takes H:MM, Slurm -t takes H:MM:SS."""
        hours, minutes = divmod(self.walltime_minutes, 60)
        return f"{hours:02d}:{minutes:02d}" + (":00" if self.site.scheduler == "slurm" else "")


def available_sites() -> list[str]:
    return sorted(p.stem for p in SITES_DIR.glob("*.toml"))


def parse_walltime(text: str) -> int:
    """'HH:MM' → minutes."""
    match = re.fullmatch(r"(\d+):([0-5]\d)", text.strip())
    if not match or not int(match[1]) * 60 + int(match[2]):
        raise UserError(f"walltime {text!r} is not HH:MM (e.g. 02:00 or 0:30); give hours and minutes, more than zero")
    return int(match[1]) * 60 + int(match[2])


def _check_directive_value(what: str, value: str) -> str:
    if value and not _DIRECTIVE_VALUE.fullmatch(value):
        raise UserError(f"{what} {value!r} may not contain spaces, quotes, '#' or '\\' (it goes into a scheduler directive)")
    return value


def validate_site(site: Site) -> Site:
    where = f"site {site.name!r}"
    if site.scheduler not in REFERENCE_SITES:
        raise UserError(f"{where}: scheduler = {site.scheduler!r} is not supported; use 'lsf' or 'slurm'")
    if site.gpus_per_node < 0 or site.cpus_per_node < 1 or site.threads_per_core < 1 or site.ranks_per_node < 0:
        raise UserError(f"{where}: gpus_per_node and ranks_per_node must be >= 0, cpus_per_node and threads_per_core >= 1")
    parse_walltime(site.walltime)
    for key in ("account", "queue", "qos", "constraint", "gpu_bind", "cpu_bind"):
        _check_directive_value(f"{where}: {key}", getattr(site, key))
    for key, value in site.env.items():
        if not _ENV_NAME.fullmatch(key) or re.search(r'["`\\]', value):
            raise UserError(f"{where}: env {key} = {value!r}; names are shell identifiers and values may not contain \", ` or \\")
        if key == "HPCTRAIN_BACKEND":
            raise UserError(f"{where}: env HPCTRAIN_BACKEND; set engine = {' or '.join(map(repr, ENGINES))} instead")
    return site


def load_site(name: str | None = None, scheduler: str | None = None, site_file: str | Path | None = None) -> Site:
    """The site a command names: --site-file, --site, or the reference site of --scheduler."""
    if scheduler is not None and scheduler not in REFERENCE_SITES:
        raise UserError(f"unknown scheduler {scheduler!r}; choose 'lsf' or 'slurm'")
    if name and site_file:
        raise UserError("give either --site or --site-file, not both")
    if site_file:
        path = Path(site_file)
        if not path.is_file():
            raise UserError(f"site file {str(path)!r} not found; copy one of {SITES_DIR}/*.toml and edit it")
    elif name or scheduler:
        path = SITES_DIR / f"{name or REFERENCE_SITES[scheduler]}.toml"
        if not path.is_file():
            raise UserError(f"unknown site {name!r}; choose one of {', '.join(available_sites())} or pass --site-file FILE")
    else:
        raise UserError(f"no site given; pass --site (one of {', '.join(available_sites())}), --site-file FILE or --scheduler lsf|slurm")
    try:
        site = build(Site, tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"site file {str(path)!r} is not valid TOML: {exc}") from None
    except UserError as exc:
        raise UserError(f"site file {str(path)!r}: {str(exc).removeprefix('config: ')}") from None
    site.name = path.stem
    validate_site(site)
    if scheduler is not None and scheduler != site.scheduler:
        raise UserError(f"site {site.name!r} uses {site.scheduler}, not {scheduler}; drop --scheduler or pick another site")
    return site


def plan_layout(site: Site, nodes: int, gpus_per_node: int | None = None, ranks_per_node: int | None = None) -> Layout:
    """How many ranks go where, and how many cores each gets."""
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: a job needs at least one node")
    if site.gpus_per_node:
        gpus = site.gpus_per_node if gpus_per_node is None else gpus_per_node
        if gpus > site.gpus_per_node:
            raise UserError(f"--gpus-per-node {gpus} is more than a {site.name} node has ({site.gpus_per_node}); "
                            f"use at most {site.gpus_per_node} and add --nodes")
        if gpus < 1:
            raise UserError(f"--gpus-per-node {gpus}: {site.name} runs one rank per GPU, so give at least 1")
        if ranks_per_node not in (None, gpus):
            raise UserError(f"--ranks-per-node {ranks_per_node}: {site.name} runs one rank per GPU; "
                            f"drop it and set --gpus-per-node instead")
        ranks = gpus
    else:
        if gpus_per_node:
            raise UserError(f"--gpus-per-node {gpus_per_node}: site {site.name!r} has no GPUs; use --ranks-per-node")
        gpus, ranks = 0, ranks_per_node or site.ranks_per_node or 1
    cpus = site.cpus_per_node // ranks
    if cpus < 1:
        raise UserError(f"--ranks-per-node {ranks} is more than the {site.cpus_per_node} CPUs of a {site.name} node")
    return Layout(nodes=nodes, ranks_per_node=ranks, gpus_per_node=gpus, cpus_per_rank=cpus,
                  omp_threads=max(1, cpus // site.threads_per_core))


def choose_engine(site: Site, cfg: Config, requested: str | None = None) -> str:
    """The job's engine: --engine, else an explicit `dist.backend` in the run config, else the site's."""
    if requested is not None and requested not in ENGINES:
        raise UserError(f"--engine {requested!r} is not an engine; choose one of {', '.join(ENGINES)}")
    configured = cfg.dist.backend if cfg.dist.backend != "auto" else None
    if requested and configured and requested != configured:
        raise UserError(f"--engine {requested} contradicts dist.backend = {configured!r} in the run config; "
                        f"drop one of them")
    return requested or configured or site.engine


def job_environment(site: Site, cfg: Config, layout: Layout, engine: str) -> dict[str, str]:
    """Variables every rank needs: the engine, HDF5 on parallel file systems, threads, Horovod tuning, the site's own."""
    if cfg.horovod.fusion_threshold_mb < 0 or not cfg.horovod.cycle_time_ms > 0:
        raise UserError(f"config: horovod.fusion_threshold_mb = {cfg.horovod.fusion_threshold_mb} must be >= 0 "
                        f"and horovod.cycle_time_ms = {cfg.horovod.cycle_time_ms} positive")
    env = {
        # Wins over dist.backend and over an HPCTRAIN_BACKEND the submitting shell may pass on.
        "HPCTRAIN_BACKEND": engine,
        # GPFS/Lustre locking makes h5py opens fail or hang on many centres' file systems.
        "HDF5_USE_FILE_LOCKING": "FALSE",
        "OMP_NUM_THREADS": str(layout.omp_threads),
    }
    if engine == "horovod":
        env["HOROVOD_FUSION_THRESHOLD"] = str(cfg.horovod.fusion_threshold_mb * 1024 * 1024)
        env["HOROVOD_CYCLE_TIME"] = f"{cfg.horovod.cycle_time_ms:g}"
    return {**env, **site.env}


def hpctrain_command(python: str | None, work_dir: Path) -> list[str]:
    """What the job runs: the `hpctrain` on the job's PATH (the site's `setup` lines, or the environment
    the scheduler passes on from the submitting shell, provide it), or `PYTHON -m hpctrain` when
    `--python` pins an interpreter (a path is made absolute, a bare name is looked up on the nodes)."""
    if python is None:
        return ["hpctrain"]
    if "/" in python:
        path = Path(os.path.abspath(work_dir / python))   # not resolved: a venv's python is a symlink
        if not path.is_file():
            raise UserError(f"--python {python}: no such file; give the interpreter of the environment "
                            f"the job should run, e.g. --python \"$(command -v python)\"")
        python = str(path)
    return [python, "-m", "hpctrain"]


def plan_job(args: argparse.Namespace, work_dir: Path, hpctrain_command: list[str]) -> Job:
    """Everything the template needs, validated; `work_dir` is where the job starts (relative paths)."""
    site = load_site(args.site, args.scheduler, args.site_file)
    layout = plan_layout(site, args.nodes, args.gpus_per_node, args.ranks_per_node)
    account = _check_directive_value("--account", args.account or site.account)
    if site.account_required and not account:
        flag = "-P" if site.scheduler == "lsf" else "-A"
        raise UserError(f"site {site.name!r} charges every job to a project: pass --account PROJECT ({site.scheduler} {flag})")
    config_path = (work_dir / args.config).resolve()
    cfg = load_config(config_path, args.overrides)
    check_world_size(cfg, layout.ranks)
    name = _check_directive_value("--name", args.name or cfg.run.name)
    out_dir = (work_dir / (args.out_dir or cfg.run.out_dir)).resolve()
    run_dir = Path(_check_directive_value("run directory", str(out_dir / name)))
    overrides = [*args.overrides, f"run.out_dir={json.dumps(str(out_dir))}", f"run.name={json.dumps(name)}"]
    load_config(config_path, overrides)  # the exact command the job runs must load
    engine = choose_engine(site, cfg, getattr(args, "engine", None))
    train_command = [*hpctrain_command, "train", "--config", str(config_path), "--resume=auto"]
    for assignment in overrides:
        train_command += ["--set", assignment]
    walltime = parse_walltime(args.walltime or site.walltime)
    lead, basis = signal_lead(cfg, run_dir, walltime)
    return Job(site=site, layout=layout, engine=engine, name=name, account=account,
               queue=_check_directive_value("--queue", args.queue or site.queue),
               qos=_check_directive_value("--qos", args.qos or site.qos),
               walltime_minutes=walltime, run_dir=run_dir, work_dir=work_dir, train_command=train_command,
               env=job_environment(site, cfg, layout, engine), signal_seconds=lead, signal_basis=basis)


def signal_lead(cfg: Config, run_dir: Path, walltime_minutes: int) -> tuple[int, str]:
    """Seconds before the walltime to send the stop signal: twice (one step + one checkpoint write) plus
    a minute of margin (Slurm sends it up to a minute early or late), from the run's measured times
    (`<run_dir>/timing.json`, written at every checkpoint) or `checkpoint.write_s`; at most half the walltime."""
    measured = None
    try:
        measured = json.loads((run_dir / TIMING_FILE).read_text())
    except (OSError, ValueError):
        pass
    if isinstance(measured, dict) and isinstance(measured.get("checkpoint_s"), (int, float)):
        need = float(measured["checkpoint_s"]) + float(measured.get("step_s", 0.0))
        basis = f"measured: checkpoint {measured['checkpoint_s']:.1f} s + step {measured.get('step_s', 0.0):.2f} s"
    else:
        need = cfg.checkpoint.write_s
        basis = f"checkpoint.write_s = {cfg.checkpoint.write_s:g} s"
    lead = int(2 * need + 60)
    if lead > walltime_minutes * 30:
        lead = walltime_minutes * 30
        basis += ", capped at half the walltime"
    return max(lead, 10), basis


def _shell_command(words: list[str]) -> str:
    """Quoted for the shell, one `--set` per continued line so long commands stay readable."""
    line, lines = [], []
    for word in words:
        if word == "--set" and line:
            lines.append(shlex.join(line))
            line = []
        line.append(word)
    return " \\\n    ".join(lines + [shlex.join(line)])


def render(job: Job, templates_dir: str | Path | None = None) -> str:
    """The job script text from `<templates_dir>/<scheduler>.sh.tmpl` (default: the repo's jobs/)."""
    templates_dir = Path(templates_dir or JOBS_DIR)
    name = f"{job.site.scheduler}.sh.tmpl"
    if not (templates_dir / name).is_file():
        raise UserError(f"template {str(templates_dir / name)!r} not found; --templates must name a directory with {name}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    try:
        return env.get_template(name).render(
            job=job, site=job.site, layout=job.layout, train_command=_shell_command(job.train_command),
            launcher_args=shlex.join(job.site.launcher_args))
    except jinja2.TemplateError as exc:
        where = f"{exc.filename}:{exc.lineno}: " if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        raise UserError(f"template {str(templates_dir / name)!r}: {where}{exc}") from None


def submit_program(scheduler: str) -> str:
    """`bsub` or `sbatch`, found on PATH before anything is written."""
    command = SUBMIT_COMMANDS[scheduler]
    if shutil.which(command) is None:
        raise UserError(f"{command} not found on PATH; submit from a {scheduler} login node, "
                        f"or run `hpctrain jobs render` there and submit the script yourself")
    return command


def parse_job_id(scheduler: str, stdout: str) -> str | None:
    """The id in `sbatch --parsable` ("123" or "123;cluster") or bsub ("Job <123> is submitted to queue <q>.")."""
    match = (re.search(r"Job <(\d+)>", stdout) if scheduler == "lsf"
             else re.fullmatch(r"(\d+)(;\S*)?", stdout.strip()))
    return match[1] if match else None


def submit(script: Path, scheduler: str) -> str:
    """Hand the script to `bsub` or `sbatch`; returns the job id."""
    command = submit_program(scheduler)
    with open(script) as stdin:
        if scheduler == "lsf":  # bsub reads #BSUB lines only from stdin
            proc = subprocess.run([command], stdin=stdin, capture_output=True, text=True)
        else:
            proc = subprocess.run([command, "--parsable", str(script)], capture_output=True, text=True)
    job_id = parse_job_id(scheduler, proc.stdout)
    if proc.returncode != 0 or job_id is None:
        said = " ".join((proc.stderr + proc.stdout).split())
        raise UserError(f"{command} {script} failed (exit {proc.returncode}): {said or 'no output'}")
    return job_id


def _render_command(args: argparse.Namespace) -> int:
    """Print the script; nothing is written (the job, or `submit`, makes the run directory)."""
    job = plan_job(args, Path.cwd(), hpctrain_command(args.python, Path.cwd()))
    sys.stdout.write(render(job, args.templates))
    return 0


def _submit_command(args: argparse.Namespace) -> int:
    job = plan_job(args, Path.cwd(), hpctrain_command(args.python, Path.cwd()))
    submit_program(job.site.scheduler)
    script = job.run_dir / SCRIPT_NAME
    write_atomic(script, render(job, args.templates), mode=0o755)   # makes the run directory, where the scheduler writes
    job_id = submit(script, job.site.scheduler)
    print(f"submitted {script} as job {job_id}; output in {job.run_dir}", file=sys.stderr)
    print(job_id)
    return 0


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RUN.toml", help="the run's TOML config (see configs/)")
    parser.add_argument("--site", metavar="NAME", help=f"site profile in {SITES_DIR}: {', '.join(available_sites())}")
    parser.add_argument("--site-file", metavar="FILE", help="your own site profile (TOML, same keys as jobs/sites/*.toml)")
    parser.add_argument("--scheduler", metavar="{lsf,slurm}", help="lsf or slurm; alone, it picks that scheduler's reference site ("
                        + ", ".join(f"{k}: {v}" for k, v in REFERENCE_SITES.items()) + ")")
    parser.add_argument("--engine", metavar="{torch,horovod}", help="communication engine (default: dist.backend "
                        "if the run config names one, else the site's `engine`)")
    parser.add_argument("--templates", metavar="DIR", help=f"directory with lsf.sh.tmpl/slurm.sh.tmpl (default {JOBS_DIR})")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs (= ranks) per node; default all of the site's")
    parser.add_argument("--ranks-per-node", type=int, metavar="R", help="ranks per node on CPU-only sites")
    parser.add_argument("--walltime", metavar="HH:MM", help="HH:MM (default from the site)")
    parser.add_argument("--account", metavar="PROJECT", help="project to charge (LSF -P, Slurm -A)")
    parser.add_argument("--queue", metavar="QUEUE", help="LSF queue (-q) or Slurm partition (-p)")
    parser.add_argument("--qos", metavar="QOS", help="Slurm quality of service (-q)")
    parser.add_argument("--name", metavar="NAME", help="job and run name (default run.name); the run directory is OUT_DIR/NAME")
    parser.add_argument("--out-dir", metavar="DIR", help="where run directories go (default run.out_dir, from the current directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, passed on to `hpctrain train` (repeatable)")
    parser.add_argument("--python", metavar="PATH", help="the job runs `PATH -m hpctrain` (default: the `hpctrain` "
                        "on the job's PATH); e.g. --python \"$(command -v python)\" pins this environment's interpreter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="action", required=True, metavar="{render,submit}")
    render_parser = commands.add_parser(
        "render", help="print a job script", description="Print a job script for RUN.toml, and nothing else: "
        "no file or directory is written. The scheduler writes the job's output into the run directory, "
        "which must exist when the job starts: `hpctrain jobs submit` makes it, or mkdir -p it before sbatch/bsub.")
    _add_job_options(render_parser)
    render_parser.set_defaults(func=_render_command)
    submit_parser = commands.add_parser(
        "submit", help="write RUN_DIR/job.sh and submit it with bsub or sbatch; prints the job id",
        description="Render RUN_DIR/job.sh and submit it (bsub < job.sh or sbatch job.sh); prints the job id.")
    _add_job_options(submit_parser)
    submit_parser.set_defaults(func=_submit_command)
