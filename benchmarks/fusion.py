"""Optimizer fusion: step time with fusion "none", "backward" and "forward", side by side in one run.

    python benchmarks/fusion.py                               # 4 ranks, wide MLP (~23M params), Adam
    python benchmarks/fusion.py --ranks 4 --width 2048 --depth 6 --batch 8 --device cuda
    python benchmarks/fusion.py --rate 10gbit                 # over a throttled link (root)

Launches itself under `mpirun -np RANKS`. Every rank builds one copy of the same wide MLP per
fusion mode (same seed), each wrapped by its own `hpctrain.DistributedOptimizer`; the modes are
timed in alternation (rounds of `--steps` steps, the order rotated each round, after untimed
warm-up steps), so drifting machine load hits all of them alike. A step is forward + backward +
`step()` + `zero_grad()` on a small per-rank batch, so the update is a visible share of it;
forward fusion's last pending update is applied (`flush()`) inside the timed block. Reported:
the median over rounds of the slowest rank's mean step time, and the median over rounds of its
ratio to "none" in the same round (paired, so a busy spell cancels out); also the CPU time all
ranks used per step, which other work on the machine disturbs less than the wall time. For
context, the same ranks also time the parts alone: forward + backward without communication,
and the wrapped optimizer's plain update.

With `--rate`, the ranks run in a network namespace whose loopback `tc` throttles to that rate
(benchmarks/netns.py) and talk TCP over it, as on a cluster link: waiting for the network then
leaves the CPU idle, and fusion can fill that wait with updates — the overlap the Optimizer
Fusion paper measures. Without it, Open MPI uses shared memory, and the copies that make up
communication themselves compete for the cores the updates need.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import netns  # noqa: E402
from hpctrain import comm  # noqa: E402
from hpctrain.cli import run_guarded  # noqa: E402
from hpctrain.compression import registry  # noqa: E402
from hpctrain.optimizer import DistributedOptimizer  # noqa: E402
from hpctrain.local_launch import MPIRUN, MPIRUN_LOCAL  # noqa: E402

MODES = ("none", "backward", "forward")
INPUTS, CLASSES = 1024, 10


def wide_mlp(width: int, depth: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    size = INPUTS
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, CLASSES)).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], steps: int, device: torch.device,
          finish: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Per step: seconds on the slowest rank (every rank starts together), and CPU seconds used
    by all ranks together (every thread: Horovod's and MPI's too)."""
    comm.get().barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    finish()
    sync(device)
    mine = ((time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps)
    everyone = comm.get().allgather_object(mine, name="fusion.time")
    return max(wall for wall, _ in everyone), sum(cpu for _, cpu in everyone)


def worker(args: argparse.Namespace) -> None:
    comm.init()
    device = comm.pick_device(args.device)
    g = torch.Generator().manual_seed(comm.rank())
    x = torch.randn(args.batch, INPUTS, generator=g).to(device)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
    models, optimizers, steps = {}, {}, {}
    for mode in MODES:
        model = models[mode] = wide_mlp(args.width, args.depth, device)
        opt = optimizers[mode] = DistributedOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-4), [(f"{mode}.{n}", p) for n, p in model.named_parameters()],
            compression=registry.build(args.compression), fusion=mode)

        def step(model=model, opt=opt) -> None:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        steps[mode] = step
    for mode in MODES:                                     # allocations, Adam state, Horovod negotiation
        timed(steps[mode], args.warmup, device, optimizers[mode].flush)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            times[mode].append(timed(steps[mode], args.steps, device, optimizers[mode].flush))

    for opt in optimizers.values():
        opt.remove_hooks()
    model = models["none"]
    plain = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def compute() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
    compute_alone = statistics.median(timed(compute, args.steps, device)[0] for _ in range(args.rounds))
    update_alone = statistics.median(timed(plain.step, args.steps, device)[0] for _ in range(args.rounds))

    if comm.is_root():
        params = sum(p.numel() for p in model.parameters())
        threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
        link = f"link {args.rate}" if args.rate else "shared-memory link"
        print(f"{comm.size()} ranks on {device} ({threads} thread(s) each, {link}), "
              f"MLP {INPUTS}-{args.width}x{args.depth}-{CLASSES} "
              f"({params / 1e6:.1f}M params), batch {args.batch} per rank, Adam, compression {args.compression}; "
              f"{args.rounds} rounds x {args.steps} steps per mode; load average {os.getloadavg()[0]:.1f}\n")
        print(f"parts alone: forward+backward {compute_alone * 1e3:.1f} ms, Adam update {update_alone * 1e3:.1f} ms\n")
        print("| fusion | step time (ms) | vs none | fastest-slowest round (ms) | CPU ms/step, all ranks | vs none |")
        print("|---|---:|---:|---|---:|---:|")
        for mode in MODES:
            wall, cpu = ([t[k] for t in times[mode]] for k in (0, 1))
            ratios = [(t[0] / base[0], t[1] / base[1]) for t, base in zip(times[mode], times["none"])]
            print(f"| {mode} | {statistics.median(wall) * 1e3:.1f} | {statistics.median(r[0] for r in ratios):.3f}x "
                  f"| {min(wall) * 1e3:.0f}-{max(wall) * 1e3:.0f} | {statistics.median(cpu) * 1e3:.0f} "
                  f"| {statistics.median(r[1] for r in ratios):.3f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    parser.add_argument("--compression", default="none", help="a compressor name, as in [compression] name")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--rate", help="run over TCP on a loopback throttled to this tc rate (e.g. 10gbit; needs root)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)     # the mpirun'd part itself
    args = parser.parse_args(argv)
    if args.worker:
        return run_guarded(lambda: worker(args))
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    launcher = MPIRUN if args.rate else MPIRUN_LOCAL       # TCP only over the throttled link
    cmd = [*launcher, "-np", str(args.ranks), sys.executable, str(Path(__file__).resolve()), "--worker", *forwarded]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not args.rate:
        return subprocess.run(cmd, env=env).returncode
    try:
        with netns.throttled_namespace(args.rate) as ns, ns.entered():
            return subprocess.run(cmd, env=env).returncode
    except netns.NetnsUnavailable as exc:
        print(f"fusion.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
