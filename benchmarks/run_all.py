"""`make bench`: run every benchmark and regenerate benchmarks/out/RESULTS.md from what they print.

    python benchmarks/run_all.py --out benchmarks/out/RESULTS.md      # everything (about an hour on 2 cores)
    python benchmarks/run_all.py --only codec,link-cnn1d --quick   # a smoke run, printed only

The slow-link runs (benchmarks/link.py) train both models at 1 Gbit/s and 100 Mbit/s (the MLP
also on the unthrottled loopback, which shows each method's compute + codec floor, and for 150
steps at 1 Gbit/s, where final accuracies can be compared with torch PowerSGD's); then the
codec timing (benchmarks/codec.py) and every other benchmarks/*.py that defines `main()` run
with their defaults. Each benchmark's stdout goes to the terminal and, verbatim, into the
results file next to the exact command, its wall time and exit status, with the machine, the
commit and the load average (other work on the machine inflates every CPU-bound time).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HERE = REPO / "benchmarks"

from hpctrain.atomic import write_atomic  # noqa: E402
# Modules here that are not benchmarks of their own (helpers, the peer, this file) or that
# `jobs` runs with chosen arguments.
NOT_DISCOVERED = {"run_all", "netns", "ddp_powersgd", "link", "codec"}


@dataclass
class Job:
    name: str
    argv: list[str]          # after the interpreter, relative to the repository root
    markdown: bool = False   # output is Markdown already (else it is fenced as text)

    @property
    def command(self) -> str:
        return " ".join(["python", *self.argv])


def link_jobs(quick: bool) -> list[Job]:
    cnn = ["--rate", "1gbit", "--rate", "100mbit", "--model", "cnn1d", "--ranks", "4"]
    mlp = ["--rate", "none", "--rate", "1gbit", "--rate", "100mbit", "--model", "mlp", "--ranks", "4"]
    # The matched-accuracy run: long enough for the final accuracies to mean something.
    matched = ["--rate", "1gbit", "--model", "mlp", "--ranks", "4", "--methods", "dense,threshold,adacomp,lowrank,ddp-powersgd"]
    length = ["--steps", "6", "--evals", "2"] if quick else None
    return [Job("link-mlp", ["benchmarks/link.py", *mlp, *(length or ["--steps", "30", "--evals", "3"])], markdown=True),
            Job("link-mlp-matched", ["benchmarks/link.py", *matched, *(length or ["--steps", "150", "--evals", "5"])],
                markdown=True),
            Job("link-cnn1d", ["benchmarks/link.py", *cnn, *(length or ["--steps", "40", "--evals", "4"])], markdown=True)]


def discovered_jobs() -> list[Job]:
    """Every other benchmarks/*.py with a `main()`, run with its defaults."""
    return [Job(path.stem, [str(path.relative_to(REPO))]) for path in sorted(HERE.glob("*.py"))
            if path.stem not in NOT_DISCOVERED and re.search(r"^def main\(", path.read_text(), re.MULTILINE)]


def jobs(quick: bool) -> list[Job]:
    codec = ["benchmarks/codec.py"] + (["--sizes", "1M", "--min-run-time", "0.1"] if quick else [])
    return [*link_jobs(quick), Job("codec", codec), *discovered_jobs()]


def run(job: Job) -> tuple[str, int, float]:
    """Run one benchmark, echoing its stdout live; (stdout, exit status, wall seconds)."""
    print(f"\n=== {job.name}: {job.command}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen([sys.executable, *job.argv], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return "".join(lines), proc.returncode, time.perf_counter() - start


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or platform.machine()
    versions = []
    for package in ("torch", "horovod"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {', '.join(versions)}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def render(sections: list[tuple[Job, str, int, float]], started: str, loads: tuple[float, float]) -> str:
    out = ["# Benchmark results", "",
           "Regenerated by `make bench` (`python benchmarks/run_all.py --out benchmarks/out/RESULTS.md`); do not edit by hand.",
           "Every speedup and ratio below is measured within one run of the benchmark that prints it.", "",
           f"- started {started}, commit {commit()}",
           f"- machine: {machine()}",
           f"- load average (1 min): {loads[0]:.1f} before, {loads[1]:.1f} after — CPU-bound times grow with it", ""]
    for job, stdout, status, wall in sections:
        out += [f"## {job.name}", "", f"`{job.command}` — {wall:.0f} s wall, "
                f"{'exit 0' if status == 0 else f'**FAILED (exit {status})**'}", ""]
        body = stdout.rstrip()
        out += [body] if job.markdown else ["```", body, "```"]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results here (Markdown); without it, only print")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all); see --list")
    parser.add_argument("--quick", action="store_true", help="short link and codec runs (smoke test, not results)")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their commands, then exit")
    args = parser.parse_args(argv)
    todo = jobs(args.quick)
    if args.list:
        print("\n".join(f"{job.name:<18} {job.command}" for job in todo))
        return 0
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {job.name for job in todo})
        if unknown:
            parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(job.name for job in todo)}")
        todo = [job for job in todo if job.name in wanted]
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    before = os.getloadavg()[0]
    sections = [(job, *run(job)) for job in todo]
    if args.out is not None:
        write_atomic(args.out, render(sections, started, (before, os.getloadavg()[0])))
        print(f"\nwrote {args.out}")
    failed = [job.name for job, _, status, _ in sections if status != 0]
    if failed:
        print(f"run_all: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
