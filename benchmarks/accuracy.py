"""Accuracy parity of every compressor against dense, same seeds and epochs, with measured ratios.

    python benchmarks/accuracy.py [--ranks 4] [--epochs 20] [--methods none adacomp ...]

Trains the MNIST-1D CNN once per method under `mpirun -np RANKS` and prints one table: final
validation accuracy, its difference to dense, and the wire compression ratio (dense bytes /
bytes actually handed to Horovod) over the whole run, and on the compressed conv kernels and
fully-connected weights (those not riding the small-tensor bypass) after the dense warm-up
(`compression.warmup_steps`), taken from each run's `layers` log group. Targets (issue 4): AdaComp within 0.5 pt of dense at ≥ 40×
on conv and ≥ 200× on fc layers; Threshold(0.001) within 0.5 pt; LowRank(4) within 1 pt.
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

from hpctrain.config import load_config  # noqa: E402
from hpctrain.h5log import read_log  # noqa: E402
from hpctrain.models import build_model  # noqa: E402

METHODS = ["none", "fp16", "topk", "threshold", "adacomp", "lowrank"]


def train(method: str, ranks: int, epochs: int, out: Path, extra: list[str]) -> Path:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = (["mpirun", *root, "--oversubscribe", "--bind-to", "none", "-np", str(ranks),
            sys.executable, "-m", "hpctrain.cli", "train", "--config", str(REPO / "configs/mnist1d.toml"),
            "--set", f"run.out_dir={out}", "--set", f"run.name={method}", "--set", f"train.epochs={epochs}",
            "--set", f"compression.name={method}", "--set", "log.layers_every=20",
            "--set", "checkpoint.every_epochs=0"] + [a for s in extra for a in ("--set", s)])
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
                   stdout=subprocess.DEVNULL)
    return out / method / "log.h5"


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
        row[kind] = layers["dense_bytes"][mask].sum() / max(layers["wire_bytes"][mask].sum(), 1)
    return row


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args(argv)
    kinds = layer_kinds()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["none"] + [m for m in args.methods if m != "none"]:
            rows[method] = summarise(train(method, args.ranks, args.epochs, Path(tmp), args.set), kinds)
            print(f"  {method}: done", file=sys.stderr, flush=True)
    dense = rows["none"]["val_accuracy"]
    lines = [f"MNIST-1D CNN, {args.ranks} ranks, {args.epochs} epochs, same seed; ratio = dense bytes / wire bytes",
             "", "| method | val acc | Δ vs dense (pt) | ratio, whole run | ratio conv | ratio fc | median step (ms) |",
             "|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        lines.append(f"| {method} | {100 * r['val_accuracy']:.2f}% | {100 * (r['val_accuracy'] - dense):+.2f} | "
                     f"{r['ratio']:.1f}× | {r['conv']:.1f}× | {r['fc']:.1f}× | {r['step_time_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
