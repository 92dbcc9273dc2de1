"""Accuracy parity of every compressor against dense, same seeds and epochs, with measured ratios.

    python benchmarks/accuracy.py [--ranks 4] [--epochs 20] [--seeds 2] [--first-seed 0] [--optimizer sgd|adam]
                                  [--methods none adacomp ...]

Trains the MNIST-1D CNN once per method and seed under `mpirun -np RANKS` and prints one table:
final validation accuracy (mean over seeds, and per seed), its difference to dense, and the
wire compression ratio (dense bytes / bytes actually handed to Horovod) over the whole run, and
on the compressed conv kernels and fully-connected weights (those not riding the small-tensor
bypass) after the dense warm-up (`--warmup-steps`, i.e. `compression.warmup_steps`), taken from
each run's `layers` log group. Targets (issue 4): AdaComp within 0.5 pt of dense at ≥ 40× on
conv and ≥ 200× on fc layers; Threshold(0.001) within 0.5 pt; LowRank(4) within 1 pt.

`--optimizer sgd` (the default: momentum 0.9, LR 0.1, cosine) is the setting of the compressors'
papers (AdaComp, DGC, PowerSGD); `--optimizer adam` (LR 0.005) is the demo's config. With
either, the one-epoch dense warm-up is what keeps the sparse compressors' accuracy (README,
Measured results).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpctrain.compression.registry import NAMES  # noqa: E402
from hpctrain.config import load_config  # noqa: E402
from hpctrain.h5log import read_log  # noqa: E402
from hpctrain.models import build_model  # noqa: E402
from hpctrain.local_launch import MPIRUN_LOCAL  # noqa: E402

METHODS = list(NAMES)
OPTIMIZERS = {"sgd": ['train.optimizer="sgd"', "train.lr=0.1", "train.momentum=0.9"],
              "adam": ['train.optimizer="adam"', "train.lr=0.005"]}


def train(method: str, seed: int, ranks: int, epochs: int, out: Path, settings: list[str]) -> Path:
    name = f"{method}-seed{seed}"
    cmd = ([*MPIRUN_LOCAL, "-np", str(ranks),
            sys.executable, "-m", "hpctrain.cli", "train", "--config", str(REPO / "configs/mnist1d.toml"),
            "--set", f"run.out_dir={out}", "--set", f"run.name={name}", "--set", f"run.seed={seed}",
            "--set", f"train.epochs={epochs}", "--set", f"compression.name={method}", "--set", "log.layers_every=20",
            "--set", "checkpoint.every_epochs=0"] + [a for s in settings for a in ("--set", s)])
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
                   stdout=subprocess.DEVNULL)
    return out / name / "log.h5"


def layer_kinds() -> dict[str, str]:
    """Parameter name → "conv" | "fc" | "other", from the model the config builds."""
    cfg = load_config(REPO / "configs/mnist1d.toml")
    model = build_model(cfg.model.name, (40,), 10, cfg.model.args)
    return {n: "conv" if p.dim() >= 3 else "fc" if p.dim() == 2 else "other" for n, p in model.named_parameters()}


def summarise(log_path: Path, kinds: dict[str, str]) -> dict[str, float]:
    log = read_log(log_path)
    steps, layers = log["steps"], log["layers"]
    row = {"val_accuracy": float(log["evals"]["val_accuracy"][-1]),
           "ratio": steps["dense_bytes"].sum() / steps["wire_bytes"].sum(),
           "step_time_ms": 1000 * float(np.median(steps["step_time_s"]))}
    warmup = json.loads(log["attrs"]["config"])["compression"]["warmup_steps"]
    # Per kind: the layers the compressor handles (not the small-tensor bypass), after the dense warm-up.
    compressed = np.array([c != "dense" for c in layers["compressor"]], dtype=bool) & (layers["step"] > warmup)
    for kind in ("conv", "fc"):
        mask = compressed & np.array([kinds.get(n) == kind for n in layers["name"]], dtype=bool)
        row[kind] = layers["dense_bytes"][mask].sum() / layers["wire_bytes"][mask].sum() if mask.any() else np.nan
    return row


def ratio_cell(ratio: float) -> str:
    """A ratio for the table; "–" where no layer of that kind was compressed (all dense)."""
    return "–" if np.isnan(ratio) else f"{ratio:.1f}×"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1, help="run N seeds of every method; accuracies are means")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds run are FIRST..FIRST+N-1 (default 0)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--warmup-steps", type=int, default=63,
                        help="compression.warmup_steps: dense steps first (default 63: one epoch, as DGC's warm-up)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args(argv)
    settings = OPTIMIZERS[args.optimizer] + [f"compression.warmup_steps={args.warmup_steps}"] + args.set
    kinds = layer_kinds()
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["none"] + [m for m in args.methods if m != "none"]:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                rows.setdefault(method, []).append(summarise(train(method, seed, args.ranks, args.epochs, Path(tmp),
                                                                   settings), kinds))
                print(f"  {method}, seed {seed}: {100 * rows[method][-1]['val_accuracy']:.2f}%", file=sys.stderr, flush=True)
    dense = [r["val_accuracy"] for r in rows["none"]]
    lines = [f"MNIST-1D CNN, {args.ranks} ranks, {args.epochs} epochs, {args.optimizer} "
             f"({', '.join(OPTIMIZERS[args.optimizer])}), {args.warmup_steps} dense warm-up steps, "
             f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; ratio = dense bytes / wire bytes",
             "", "| method | val acc (mean) | per seed | Δ vs dense (pt) | per seed | ratio, whole run | ratio conv "
             "| ratio fc | median step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in rows.items():
        acc = [r["val_accuracy"] for r in runs]
        delta = [100 * (a - d) for a, d in zip(acc, dense)]
        mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
        lines.append(f"| {method} | {100 * mean['val_accuracy']:.2f}% | {' / '.join(f'{100 * a:.2f}' for a in acc)} "
                     f"| {np.mean(delta):+.2f} | {' / '.join(f'{d:+.2f}' for d in delta)} | {mean['ratio']:.1f}× "
                     f"| {ratio_cell(mean['conv'])} | {ratio_cell(mean['fc'])} | {mean['step_time_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
