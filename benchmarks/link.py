"""End-to-end training over a throttled link: hpctrain's compressors vs dense Horovod and torch PowerSGD.

For each `--rate`, a network namespace with its loopback throttled by `tc` (benchmarks/netns.py)
holds the whole job, and Open MPI (hence Horovod) and Gloo talk TCP over that loopback, so every
byte any rank sends shares one link of that rate. First a small allreduce probe prints the
bandwidth the ranks really get; then every method trains the same model on the same data from
the same seed for the same number of steps, one after the other, and one table compares them
(step and comm times are medians over the steps after the set-up ones):

    python benchmarks/link.py --rate 1gbit --rate 100mbit --model mlp --ranks 4 --steps 30

Methods: `dense` (fp32 allreduce: hpctrain with compression "none", exactly
hvd.DistributedOptimizer's traffic), `fp16`, each hpctrain compressor (`topk`, `threshold`,
`adacomp`, `lowrank`), `auto` (after the warm-up, the cost model's per-layer plan and two alternatives run a few steps each; the fastest stays), each on every engine of `--engines` (Horovod over MPI; torch.distributed
over Gloo; `torch-unbucketed`: the torch engine without its gradient buckets), and `ddp-powersgd` (benchmarks/ddp_powersgd.py: torch DDP over Gloo with torch's
PowerSGD hook at the same rank as `lowrank`). Speedups are against dense Horovod. Step and comm time are medians, bytes means, over
the steps after the first `WARMUP_STEPS` (set-up: first allocations, Horovod negotiation,
the dense start); every compressor, like the peer's PowerSGD hook, sends its first
`DENSE_START` steps dense (`compression.warmup_steps`), so all start from the same updates; bytes are what rank 0 hands to the network per step (indices included);
accuracy is measured on the validation split `--evals` times per run; "time to X%" is the training
time (sum of step times, evaluations excluded) until the first evaluation at or above the target.
`--rate none` runs on the plain, unthrottled loopback (no root needed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import netns  # noqa: E402
from benchmarks.script import command_line, one_line_errors  # noqa: E402
from hpctrain.errors import UserError  # noqa: E402
from hpctrain.h5log import read_log  # noqa: E402
from hpctrain.local_launch import run_mpi  # noqa: E402

CONFIG = REPO / "configs" / "mnist1d.toml"
PEER = REPO / "benchmarks" / "ddp_powersgd.py"
WARMUP_STEPS = 2
DENSE_START = 2           # torch PowerSGD's smallest start_powerSGD_iter; hpctrain gets the same
LOWRANK_RANK = 4          # hpctrain LowRank and torch PowerSGD use the same rank
GLOBAL_BATCH = 128
# The MNIST-1D CNN (~20k parameters: compute-bound) and a ~10.7M-parameter MLP whose 43 MB of
# fp32 gradients make the dense allreduce dominate the step on a 1 Gbit/s link.
MODELS: dict[str, dict[str, Any]] = {
    "cnn1d": {"model.name": "cnn1d", "train.lr": 0.005},
    "mlp": {"model.name": "mlp", "model.args": {"width": 2304, "depth": 3}, "train.lr": 0.001},
}
COMPRESSORS = ("topk", "threshold", "adacomp", "lowrank")
PEER_METHOD = "ddp-powersgd"
HOOK_METHOD = "ddp-hpctrain-lowrank"      # DDP with hpctrain's LowRank as its comm hook
DDP_METHODS = {PEER_METHOD: "powersgd", HOOK_METHOD: "hpctrain"}
AUTO = "auto"                              # compression.name = "auto": the cost model picks per layer
METHODS = ("dense", "fp16", *COMPRESSORS, AUTO, PEER_METHOD, HOOK_METHOD)
ENGINES = ("horovod", "torch")
# The torch engine with every gradient's collectives leaving on their own (buckets of 1 byte),
# beside `torch` (dist.bucket_mb's default): what its buckets are worth, in one run.
UNBUCKETED = "torch-unbucketed"
BASELINE = "dense (horovod)"


def toml_value(value: Any) -> str:
    """A Python value as the TOML text `--set key=value` expects."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def label(method: str, engine: str) -> str:
    """A row's name: the method and the engine it ran on (DDP runs have their own: Gloo)."""
    return method if method in DDP_METHODS else f"{method} ({engine})"


def run_settings(model: str, method: str, steps: int, evals: int, out_dir: Path, engine: str = "horovod") -> dict[str, Any]:
    """Config overrides for one run. The data set is sized so that an epoch lasts steps / evals
    steps: hpctrain evaluates at epoch ends, and the cosine LR spans exactly the benchmark."""
    steps_per_epoch = max(1, steps // evals)
    train_samples = steps_per_epoch * GLOBAL_BATCH
    return {**MODELS[model], "train.optimizer": "adam", "train.lr_schedule": "cosine",
            "train.max_steps": steps, "train.epochs": math.ceil(steps / steps_per_epoch),
            "batch.initial": GLOBAL_BATCH, "data.name": "mnist1d", "data.val_fraction": 0.2,
            "data.num_samples": math.ceil(train_samples / 0.8), "checkpoint.every_epochs": 0,
            "train.progress": False, "compression.name": {"dense": "none", PEER_METHOD: "none", HOOK_METHOD: "lowrank"}.get(method, method),
            "compression.lowrank.rank": LOWRANK_RANK, "compression.warmup_steps": DENSE_START, "run.seed": 0, "run.name": f"{method}-{engine}",
            "run.out_dir": str(out_dir), "dist.backend": "torch" if engine == UNBUCKETED else engine,
            **({"dist.bucket_mb": 2.0 ** -20} if engine == UNBUCKETED else {})}


def set_args(settings: dict[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={toml_value(value)}")]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (in the network namespace the calling thread is in)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the bandwidth probe (runs under mpirun) ------------------------------------------------
def probe_main(megabytes: float, repeats: int) -> None:
    """Each rank: time `repeats` allreduces of `megabytes` MB (on the engine HPCTRAIN_BACKEND
    names, Horovod by default under mpirun); rank 0 prints one JSON line."""
    import torch

    from hpctrain import comm

    comm.init()
    tensor = torch.ones(int(megabytes * 2**20) // 4)
    comm.get().allreduce_async(tensor, name="probe").wait()       # connections up, negotiation cached
    times = []
    for _ in range(repeats):
        comm.get().barrier()
        start = time.perf_counter()
        comm.get().allreduce_async(tensor, name="probe").wait()
        times.append(time.perf_counter() - start)
    if comm.is_root():
        print("PROBE " + json.dumps({"bytes": tensor.numel() * 4, "seconds": float(np.median(times)),
                                     "ranks": comm.size()}), flush=True)


@dataclass
class Probe:
    bytes: int
    seconds: float
    ranks: int

    def describe(self, rate: str) -> str:
        """Bus bandwidth as nccl-tests defines it (each rank sends 2(n-1)/n of the buffer);
        on one shared loopback all n ranks' traffic crosses the same throttled link."""
        per_rank = 2 * (self.ranks - 1) / self.ranks * self.bytes * 8 / self.seconds
        total = per_rank * self.ranks
        limit = f"; tc limit {netns.parse_rate(rate) / 1e9:g} Gbit/s" if rate != "none" else ""
        return (f"allreduce probe: {self.bytes / 2**20:g} MiB over {self.ranks} ranks in {self.seconds * 1e3:.0f} ms "
                f"→ bus bandwidth {per_rank / 1e9:.3f} Gbit/s per rank, {total / 1e9:.3f} Gbit/s through the link{limit}")


def measure_bandwidth(ranks: int, megabytes: float, engine: str = "horovod") -> Probe:
    proc = run_mpi(ranks, ["--probe", "--probe-mb", megabytes], program=[sys.executable, str(Path(__file__))],
                   timeout=600, engine=engine)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return Probe(**json.loads(line[len("PROBE "):]))


# -- one training run, and its summary --------------------------------------------------------
@dataclass
class Result:
    method: str
    step_s: float = math.nan
    comm_s: float = math.nan
    samples_per_s: float = math.nan
    wire_bytes: float = math.nan
    dense_bytes: float = math.nan
    final_accuracy: float = math.nan
    evals: list[tuple[float, float]] | None = None      # (training seconds, val accuracy)
    error: str = ""

    def time_to(self, target: float) -> float:
        return next((t for t, acc in self.evals or [] if acc >= target), math.nan)


def summarize(method: str, log: dict[str, Any]) -> Result:
    """Medians over the steps after the set-up ones (robust to a neighbour's burst on a shared VM)."""
    steps, evals = log["steps"], log["evals"]
    keep = steps["step"] > WARMUP_STEPS
    step_s = float(np.median(steps["step_time_s"][keep]))
    return Result(method, step_s=step_s, comm_s=float(np.median(steps["comm_time_s"][keep])),
                  samples_per_s=float(steps["global_batch"][keep].mean()) / step_s,
                  wire_bytes=float(steps["wire_bytes"][keep].mean()), dense_bytes=float(steps["dense_bytes"][keep].mean()),
                  final_accuracy=float(evals["val_accuracy"][-1]),
                  evals=list(zip(evals["wall_time_s"].tolist(), evals["val_accuracy"].tolist())))


def train(method: str, engine: str, model: str, ranks: int, steps: int, evals: int, out_dir: Path) -> Result:
    """Run one method to completion; a failed run becomes a row that says why."""
    settings = run_settings(model, method, steps, evals, out_dir, engine)
    sets = set_args(settings)
    if method in DDP_METHODS:
        args = ["--config", CONFIG, *sets, "--rank", LOWRANK_RANK, "--port", free_port(), "--hook", DDP_METHODS[method]]
        program = [sys.executable, str(PEER)]
    else:
        args, program = ["train", "--config", CONFIG, *sets], None
    run_dir = out_dir / settings["run.name"]
    try:     # Gloo inside the namespace: its one loopback
        run_mpi(ranks, args, program=program, timeout=3600, env={"GLOO_SOCKET_IFNAME": "lo"})
    except AssertionError as failure:      # run_mpi's report: the command, then all output
        report = run_dir / "failure.log"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(str(failure))
        return Result(label(method, engine), error=f"{failure_reason(str(failure))} (see {report})")
    return summarize(label(method, engine), read_log(run_dir / "log.h5"))


def failure_reason(output: str) -> str:
    """The most telling line of a failed run: hpctrain's one-line error, else the exception."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in ("hpctrain: error:", "Error:", "error"):
        hits = [line for line in lines if pattern in line]
        if hits:
            return hits[-1][:200]
    return lines[-1][:200] if lines else "no output"


# -- the table ----------------------------------------------------------------------------
def default_target(results: list[Result]) -> float:
    """95% of dense Horovod's final accuracy (or of the best final accuracy if dense is absent)."""
    dense = next((r for r in results if r.method == BASELINE and not r.error), None)
    pool = [dense] if dense else [r for r in results if not r.error]
    return 0.95 * max((r.final_accuracy for r in pool), default=math.nan)


def table(results: list[Result], target: float) -> list[str]:
    dense = next((r for r in results if r.method == BASELINE and not r.error), None)
    lines = [f"| method | step (ms) | comm (ms) | samples/s | MB sent/step | compression | speedup vs dense "
             f"| final val acc | time to {100 * target:.1f}% (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | failed: {r.error} ||||||||")
            continue
        speedup = dense.step_s / r.step_s if dense else math.nan
        reach = r.time_to(target)
        lines.append(f"| {r.method} | {1e3 * r.step_s:.0f} | {1e3 * r.comm_s:.0f} | {r.samples_per_s:.0f} "
                     f"| {r.wire_bytes / 1e6:.3f} | {r.dense_bytes / r.wire_bytes:.0f}× | {speedup:.2f}× "
                     f"| {100 * r.final_accuracy:.1f}% | {'not reached' if math.isnan(reach) else f'{reach:.1f}'} |")
    return lines


def verdict(results: list[Result]) -> list[str]:
    """The issue's targets: the best hpctrain compressor vs dense Horovod and vs torch PowerSGD,
    at matched final accuracy (within 1 pt of PowerSGD's, when such a compressor exists)."""
    ok = {r.method: r for r in results if not r.error}
    ours = [ok[label(m, e)] for m in COMPRESSORS for e in ENGINES if label(m, e) in ok]
    if not ours:
        return []
    peer = ok.get(PEER_METHOD)
    matched = [r for r in ours if peer is None or r.final_accuracy >= peer.final_accuracy - 0.01]
    best = min(matched or ours, key=lambda r: r.step_s)
    lines = [f"- best hpctrain compressor: {best.method} ({'at matched accuracy' if matched else 'none matches the peer accuracy'})"]
    if BASELINE in ok:
        ratio = ok[BASELINE].step_s / best.step_s
        lines.append(f"  - vs dense Horovod: {ratio:.2f}× faster per step (target ≥ 3×: {'met' if ratio >= 3 else 'MISSED'})")
    if peer is not None:
        ratio = peer.step_s / best.step_s
        lines.append(f"  - vs torch DDP + PowerSGD: {ratio:.2f}× faster per step, final val acc "
                     f"{100 * best.final_accuracy:.1f}% vs {100 * peer.final_accuracy:.1f}% "
                     f"(target: faster at matched accuracy: {'met' if ratio > 1 and matched else 'MISSED'})")
    return lines


@contextlib.contextmanager
def link(rate: str) -> Iterator[None]:
    """Inside a namespace throttled to `rate`, or on the plain loopback for "none"."""
    if rate == "none":
        yield
        return
    with netns.throttled_namespace(rate) as ns, ns.entered():
        yield


def benchmark(rate: str, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\n### {args.model}, {args.ranks} ranks, link {rate}, {args.steps} steps of global batch {GLOBAL_BATCH}\n",
          flush=True)
    results = []
    with link(rate):
        print(measure_bandwidth(args.ranks, args.probe_mb).describe(rate) + "\n", flush=True)
        runs = [(method, engine) for method in args.methods for engine in args.engines
                if method not in DDP_METHODS or engine == args.engines[0]]
        for method, engine in runs:
            start = time.perf_counter()
            results.append(train(method, engine, args.model, args.ranks, args.steps, args.evals,
                                 args.out / f"{args.model}-{rate}"))
            r = results[-1]
            status = f"failed: {r.error}" if r.error else f"{1e3 * r.step_s:.0f} ms/step, final val acc {100 * r.final_accuracy:.1f}%"
            print(f"  {r.method}: {status} ({time.perf_counter() - start:.0f} s wall)", file=sys.stderr, flush=True)
    target = args.target if args.target is not None else default_target(results)
    print("\n".join(table(results, target)))
    print("\n" + "\n".join(verdict(results)))
    print(f"\nload average (1 min) {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
          f"on {os.cpu_count()} cores", flush=True)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {text!r}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}")
    return methods


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", action="append", help="tc rate of the link, repeatable (default 1gbit); "
                                                        "'none' for the unthrottled loopback")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default 30)")
    parser.add_argument("--evals", type=int, default=3, help="validation evaluations per run (default 3)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines to run hpctrain's "
                                                                     "methods on (default horovod,torch; also "
                                                                     f"{UNBUCKETED})")
    parser.add_argument("--target", type=float, help="validation accuracy for 'time to' (default: 95%% of dense's final)")
    parser.add_argument("--probe-mb", type=float, default=16, help="allreduce size of the bandwidth probe (MiB)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "link", help="where the step logs go")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)      # the mpirun'd probe itself
    args = parser.parse_args(argv)
    if args.probe:
        probe_main(args.probe_mb, repeats=3 if args.probe_mb >= 1 else 25)   # tiny: a median of many (α)
        return 0
    args.rate = args.rate or ["1gbit"]
    for rate in args.rate:
        if rate != "none":
            netns.parse_rate(rate)
    args.methods = parse_methods(args.methods)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or set(args.engines) - {*ENGINES, UNBUCKETED}:
        raise UserError(f"--engines {','.join(args.engines)}: choose from {', '.join((*ENGINES, UNBUCKETED))}")
    if args.steps <= WARMUP_STEPS + 1 or not 1 <= args.evals <= args.steps:
        raise UserError(f"--steps {args.steps} --evals {args.evals}: need steps > {WARMUP_STEPS + 1} "
                        "(the first steps are set-up) and 1 <= evals <= steps")
    if GLOBAL_BATCH % args.ranks:
        raise UserError(f"--ranks {args.ranks} must divide the global batch {GLOBAL_BATCH}")
    print(f"command: {command_line(argv)}")
    for rate in args.rate:
        benchmark(rate, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
