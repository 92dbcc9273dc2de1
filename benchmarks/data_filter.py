"""Importance filtering on MNIST-1D with N ranks, and shard read throughput.

1. Shard MNIST-1D (`--num-samples` generated, 80% train), score it with EL2N averaged over
   `--score-seeds` short pre-training runs (`hpctrain score --seeds`).
2. Train the same model for the same epochs on all data and on 70% of it chosen by EL2N (`--keep`
   modes), at the config's batch (128) and at a large global batch (1024, LR scaled by sqrt).
   Filtered runs take 30% fewer steps. Printed side by side: validation accuracy, training time
   (sum of step times), steps and the issue's targets (filtered within 0.3 pt of full with >= 25%
   less training time; filtered beats full at 1024).
3. Read the training split from the shards (sequentially and in random batches) and compare
   with a raw `np.load` of the same array.

    nice -n 19 .venv/bin/python benchmarks/data_filter.py [--np 4] [--num-samples 40000] [--epochs 20]
        [--score-epochs 2] [--score-seeds 4] [--seeds 0,1] [--keep hardest,middle,easiest]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpctrain.batch.orchestrator import scaled_lr  # noqa: E402
from hpctrain.config import DataConfig  # noqa: E402
from hpctrain.data import load_splits  # noqa: E402
from hpctrain.h5log import read_log  # noqa: E402
from hpctrain.local_launch import run_mpi  # noqa: E402

CONFIG = REPO / "configs" / "mnist1d.toml"
BASE_LR, BASE_BATCH, LARGE_BATCH, KEEP = 0.005, 128, 1024, 0.7


def train(name: str, data_dir: Path, out_dir: Path, ranks: int, epochs: int, batch: int, keep: str | None,
          seed: int) -> dict[str, float]:
    """One run on all data (keep None) or on KEEP of it chosen by `keep` (hardest/easiest/middle)."""
    settings = {"data.name": f'"{data_dir}"', "data.keep_fraction": 1.0 if keep is None else KEEP,
                "data.keep": f'"{keep or "hardest"}"', "train.epochs": epochs,
                "batch.initial": batch, "train.lr": scaled_lr(BASE_LR, batch, BASE_BATCH, "sqrt"),
                "run.seed": seed, "checkpoint.every_epochs": 0, "train.progress": "false",
                "run.out_dir": f'"{out_dir}"', "run.name": f'"{name}"'}
    args = ["train", "--config", CONFIG]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    run_mpi(ranks, args, timeout=3600)
    log = read_log(out_dir / name / "log.h5")
    return {"val_accuracy": float(log["evals"]["val_accuracy"][-1]), "train_s": float(log["steps"]["step_time_s"].sum()),
            "steps": len(log["steps"]["step"])}


def read_throughput(data_dir: Path, work: Path, repeats: int = 3) -> dict[str, float]:
    """Samples/s reading the train split: np.load of one .npy vs the shards ("cold" = a fresh reader,
    whose chunk cache is empty, so every chunk comes from the file; the OS page cache is warm)."""
    def fresh():
        return load_splits(DataConfig(name=str(data_dir))).train

    train = fresh()
    n = len(train)
    np.save(work / "x.npy", train.get(np.arange(n))[0])
    order = np.random.default_rng(0).permutation(n)
    in_order = [np.arange(i, min(i + 1024, n)) for i in range(0, n, 1024)]
    shuffled = [order[i:i + 128] for i in range(0, n, 128)]

    def rate(read, reader=None) -> float:
        """Best of `repeats` passes; `read(reader)` with a fresh reader per pass unless one is given."""
        times = []
        for _ in range(repeats):
            r = reader if reader is not None else fresh()
            start = time.perf_counter()
            read(r)
            times.append(time.perf_counter() - start)
        return n / min(times)

    loaded = np.load(work / "x.npy")
    return {"np.load (whole array)": rate(lambda _: np.load(work / "x.npy"), reader=train),
            "in-memory array, random batches of 128": rate(lambda _: [loaded[b] for b in shuffled], reader=train),
            "shards, in order, batches of 1024 (cold)": rate(lambda r: [r.get(b) for b in in_order]),
            "shards, random batches of 128 (cold)": rate(lambda r: [r.get(b) for b in shuffled]),
            "shards, random batches of 128 (chunk cache warm)": rate(lambda r: [r.get(b) for b in shuffled], reader=train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=4, help="ranks (default 4)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of every run (default 20)")
    parser.add_argument("--num-samples", type=int, default=40000,
                        help="MNIST-1D samples to generate, 80%% of them training (default 40000)")
    parser.add_argument("--score-epochs", type=int, default=2, help="epochs of each EL2N pre-training run (default 2)")
    parser.add_argument("--score-seeds", type=int, default=4,
                        help="EL2N is averaged over this many independently initialised pre-training runs (default 4)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; results are averaged")
    parser.add_argument("--keep", default="hardest", help="comma-separated data.keep modes to compare (default hardest)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    modes: list[str | None] = [None] + args.keep.split(",")

    with tempfile.TemporaryDirectory(prefix="data_filter-") as tmp:
        work = Path(tmp)
        data = work / "mnist1d"
        run_mpi(args.np, ["shard", "--input", "mnist1d", "--num-samples", args.num_samples, "--out", data,
                          "--shard-size", 2000])
        start = time.perf_counter()
        run_mpi(args.np, ["score", "--data", data, "--method", "el2n", "--config", CONFIG, "--epochs", args.score_epochs,
                          "--seeds", args.score_seeds], timeout=3600)
        score_s = time.perf_counter() - start
        results: dict[tuple[int, str | None], list[dict[str, float]]] = {}
        for batch in (BASE_BATCH, LARGE_BATCH):
            for keep in modes:
                for seed in seeds:
                    name = f"b{batch}-{keep or 'all'}-s{seed}"
                    results.setdefault((batch, keep), []).append(
                        train(name, data, work / "runs", args.np, args.epochs, batch, keep, seed))
                    print(f"{name}: {results[(batch, keep)][-1]}", flush=True)
        throughput = read_throughput(data, work)

    mean = {k: {m: float(np.mean([r[m] for r in v])) for m in v[0]} for k, v in results.items()}
    print(f"\nMNIST-1D ({args.num_samples} samples), {args.np} ranks, {args.epochs} epochs, seeds {seeds}; EL2N "
          f"scoring ({args.score_seeds} x {args.score_epochs}-epoch pre-training) took {score_s:.1f} s wall")
    print("| global batch | data | val acc | Δ acc vs full (pt) | train s | time vs full | steps |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (batch, keep), r in mean.items():
        full = mean[(batch, None)]
        print(f"| {batch} | {'all' if keep is None else f'{KEEP:.0%} {keep} by EL2N'} | {100 * r['val_accuracy']:.2f}% "
              f"| {100 * (r['val_accuracy'] - full['val_accuracy']):+.2f} | {r['train_s']:.1f} "
              f"| {r['train_s'] / full['train_s']:.2f}× | {r['steps']:.0f} |")
    small_full, large_full = mean[(BASE_BATCH, None)], mean[(LARGE_BATCH, None)]
    for keep in modes[1:]:
        small, large = mean[(BASE_BATCH, keep)], mean[(LARGE_BATCH, keep)]
        within = small["val_accuracy"] >= small_full["val_accuracy"] - 0.003
        faster = small["train_s"] <= 0.75 * small_full["train_s"]
        beats = large["val_accuracy"] > large_full["val_accuracy"]
        print(f"targets, {keep}: batch {BASE_BATCH} within 0.3 pt {'met' if within else 'MISSED'}, "
              f">= 25% less training time {'met' if faster else 'MISSED'}; "
              f"batch {LARGE_BATCH} filtered beats full {'met' if beats else 'MISSED'}")
    reference = throughput["np.load (whole array)"]
    print("\n| read path | samples/s | ratio to np.load |\n|---|---:|---:|")
    for name, rate in throughput.items():
        print(f"| {name} | {rate:,.0f} | {rate / reference:.3f} |")


if __name__ == "__main__":
    main()
