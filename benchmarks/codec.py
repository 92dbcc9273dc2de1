"""Codec speed: encode + decode time of every compressor as a multiple of `tensor.clone()`.

Each row times one rank's own work per step — compensate, encode, and decode of its own
payload (a world of 1 through `simulate`), with no communication — next to a plain clone of
the same fp32 tensors. The two are timed in alternation, and each is given by its fastest run
(the clone by its fastest over all rows of that size), so the ratio depends neither on the
machine's speed nor on how busy it is.
The error-feedback state carries over between timed calls (steady state, as in training, after
20 untimed steps); each step's gradient (and each cloned tensor) is one of four fixed tensors
with a random sign, so residuals random-walk. Two kinds of data: `noise`, i.i.d. Gaussian, the
worst case for the sparse codecs (AdaComp sends 3–11% of it), and `gradient-like`, the same
times a fixed per-weight magnitude e^N(0,1), from which AdaComp sends about what it sends in
training. The wire ratio is dense fp32 bytes over the bytes of the payloads handed to the
network, over the timed steps.

    python benchmarks/codec.py                      # 1M, 4M, 25M on CPU (or the GPU if visible)
    python benchmarks/codec.py --sizes 1M --device cpu --data noise
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpctrain.compression import FP16, AdaComp, Collective, LowRank, NoCompression, ParamState, Threshold, TopK, simulate  # noqa: E402
from hpctrain.compression.base import Compressor  # noqa: E402
from hpctrain.compression.synthetic import heavy_tailed_grads  # noqa: E402

DATA = ("noise", "gradient-like")
COLUMNS = 1000          # gradients are [numel / 1000, 1000] matrices ("fc"), or [numel / 1000, 100, 10] ("conv")
WARMUP_STEPS = 20       # untimed steps first: residuals, thresholds and warm starts settle
ROUNDS = 3              # codec and clone are timed alternately this many times; the fastest run counts


def codecs() -> list[tuple[str, Compressor, str]]:
    """(label, compressor, layout) rows of the table."""
    return [
        ("none", NoCompression(), "fc"),
        ("fp16", FP16(), "fc"),
        ("topk 0.01", TopK(ratio=0.01), "fc"),
        ("threshold 0.001", Threshold(density=0.001), "fc"),
        ("threshold 0.001, refresh each step", Threshold(density=0.001, refresh_every=1), "fc"),
        ("adacomp fc (bins of 500)", AdaComp(), "fc"),
        ("adacomp conv (bins of 50)", AdaComp(), "conv"),
        ("adacomp fp32 values", AdaComp(quantize=False), "fc"),
        ("lowrank 4", LowRank(rank=4), "fc"),
    ]


def parse_size(text: str) -> int:
    """'25M' → 25_000_000, '512K' → 512_000, '1000' → 1000 (multiples of 1000)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    number = int(float(text[:-1] if scale > 1 else text) * scale)
    if number <= 0 or number % COLUMNS:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of {COLUMNS}")
    return number


def gradient_pool(numel: int, data: str, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """Four [numel / 1000, 1000] gradients of this kind and their negations."""
    shape = (numel // COLUMNS, COLUMNS)
    pool = (heavy_tailed_grads(shape, 4, generator) if data == "gradient-like" else
            [torch.randn(shape, generator=generator) for _ in range(4)])
    pool = [g.to(device) for g in pool]
    return pool + [-g for g in pool]


def random_clone(pool: list[torch.Tensor]) -> Callable[[], None]:
    """clone() of a tensor drawn as the codec draws its gradients (the same cache misses)."""
    draw = random.Random(1)
    return lambda: draw.choice(pool).clone()


def steady_state_step(compressor: Compressor, pool: list[torch.Tensor]) -> tuple[Callable[[], None], Callable[[], float]]:
    """A warmed-up `one_step()` closure, and a function giving the wire ratio over the steps since."""
    state, signs = ParamState("bench.weight"), random.Random(0)
    wire = {"bytes": 0, "steps": 0}

    def one_step() -> None:
        rounds: list[list[Collective]] = []
        simulate(compressor, [signs.choice(pool)], [state], rounds)
        state.steps += 1
        wire["bytes"] += sum(ranks[0].nbytes for ranks in rounds)
        wire["steps"] += 1

    for _ in range(WARMUP_STEPS):
        one_step()
    wire.update(bytes=0, steps=0)
    return one_step, lambda: pool[0].numel() * 4 * wire["steps"] / wire["bytes"]


def best_times(statements: list[Callable[[], None]], threads: int, min_run_time: float) -> list[float]:
    """Fastest seconds per call of each statement, timed in alternation (ROUNDS rounds), so a
    busy machine slows them alike and the fastest runs are the least disturbed ones."""
    timers = [benchmark.Timer("run()", globals={"run": run}, num_threads=threads) for run in statements]
    best = [math.inf] * len(timers)
    for _ in range(ROUNDS):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], min(timer.blocked_autorange(min_run_time=min_run_time / ROUNDS).times))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                        default=[10**6, 4 * 10**6, 25 * 10**6], help="comma-separated element counts (default 1M,4M,25M)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--data", type=lambda s: s.split(","), default=list(DATA),
                        help="comma-separated kinds of gradient: noise, gradient-like (default both)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=0.6, help="seconds of timing per row and tensor (default 0.6)")
    args = parser.parse_args(argv)
    if set(args.data) - set(DATA):
        parser.error(f"--data {','.join(args.data)}: the kinds are {', '.join(DATA)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"codec time = compensate + encode + decode of one rank's own payload (no network); {where}; "
          f"torch {torch.__version__}")
    print(f"{'data':<13} {'size':>5}  {'codec':<34} {'ms':>9} {'x clone':>8} {'wire ratio':>11}")
    for data in args.data:
        for numel in args.sizes:
            print_size(data, numel, gradient_pool(numel, data, torch.Generator().manual_seed(0), device), args)
    return 0


def print_size(data: str, numel: int, pool: list[torch.Tensor], args: argparse.Namespace) -> None:
    """Time every codec on this pool of gradients and print its rows."""
    rows, clone_best = [], math.inf
    for name, compressor, layout in codecs():
        one_step, wire_ratio = steady_state_step(compressor, pool if layout == "fc" else
                                                 [g.view(-1, 100, 10) for g in pool])
        seconds, clone_s = best_times([one_step, random_clone(pool)], args.threads, args.min_run_time)
        rows.append((name, seconds, wire_ratio()))
        clone_best = min(clone_best, clone_s)
    size = f"{numel / 10**6:g}M"
    print(f"{data:<13} {size:>5}  {'clone()':<34} {clone_best * 1e3:9.2f} {1:8.1f}")
    for name, seconds, ratio in rows:
        print(f"{data:<13} {size:>5}  {name:<34} {seconds * 1e3:9.2f} {seconds / clone_best:8.1f} {ratio:10.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
