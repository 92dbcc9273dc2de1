"""Per-collective latency of each engine: what one small collective costs before any bytes count.

On steps of a few milliseconds (small models, many layers) the number of collectives, not their
bytes, sets the exchange time; the torch engine's gradient buckets exist for this (docs/engines.md).
Each row times `--repeats` collectives of 16 floats on `--ranks` ranks started by mpirun over
loopback, after 10 untimed ones, and gives the median and 90th percentile of rank 0's times:

- `horovod`: `allreduce_async(...).wait()` and a variable-length `allgather_async` on Horovod (MPI);
- `torch`: the same calls on the torch engine (Gloo, run on its communication thread);
- `torch, gloo direct`: `torch.distributed.all_reduce` from the calling thread, no hpctrain
  between: the difference to `torch` is what the communication thread adds.

    python benchmarks/latency.py --ranks 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.script import command_line, one_line_errors  # noqa: E402
from hpctrain.errors import UserError  # noqa: E402
from hpctrain.local_launch import run_mpi  # noqa: E402

WARMUP = 10
ROWS = {"horovod": "horovod", "torch": "torch", "torch, gloo direct": "direct"}


def _timed(call, repeats: int) -> list[float]:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def worker(mode: str, repeats: int) -> None:
    """One rank of a row (under mpirun); rank 0 prints one JSON line of its times."""
    import torch

    from hpctrain import comm

    communicator = comm.init(backend="horovod" if mode == "horovod" else "torch")
    tensor, mine = torch.ones(16), torch.ones(10 + communicator.rank)
    if mode == "direct":
        import torch.distributed as td
        timings = {"allreduce": _timed(lambda: td.all_reduce(tensor), repeats)}
    else:
        timings = {"allreduce": _timed(lambda: communicator.allreduce_async(tensor, name="latency.r").wait(), repeats),
                   "allgather": _timed(lambda: communicator.allgather_async(mine, name="latency.g").wait(), repeats)}
    if communicator.rank == 0:
        print("LATENCY " + json.dumps(timings), flush=True)


def measure(row: str, ranks: int, repeats: int) -> dict[str, list[float]]:
    engine = "horovod" if ROWS[row] == "horovod" else "torch"
    proc = run_mpi(ranks, ["--worker", ROWS[row], "--repeats", repeats], program=[sys.executable, str(Path(__file__))],
                   engine=engine, timeout=600)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("LATENCY ")), None)
    if line is None:
        raise UserError(f"the {row} ranks printed no timings:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("LATENCY "))


def table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    def cell(times: list[float] | None) -> str:
        if not times:
            return "–"
        return f"{statistics.median(times) * 1e3:.2f} / {statistics.quantiles(times, n=10)[-1] * 1e3:.2f}"

    base = statistics.median(results["horovod"]["allreduce"]) if "horovod" in results else None
    lines = ["| engine | allreduce ms (median / p90) | allgather ms (median / p90) | allreduce vs Horovod |",
             "|---|---:|---:|---:|"]
    for row, times in results.items():
        ratio = f"{statistics.median(times['allreduce']) / base:.2f}×" if base else "–"
        lines.append(f"| {row} | {cell(times.get('allreduce'))} | {cell(times.get('allgather'))} | {ratio} |")
    return lines


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--worker", choices=sorted(set(ROWS.values())), help=argparse.SUPPRESS)   # one mpirun'd rank
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeats)
        return 0
    if args.ranks < 2 or args.repeats < 10:
        raise UserError("--ranks must be at least 2 and --repeats at least 10")
    print(f"command: {command_line(argv)}")
    results = {row: measure(row, args.ranks, args.repeats) for row in ROWS}
    print(f"\n### {args.ranks} ranks, {args.repeats} collectives of 16 floats each, loopback\n")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
