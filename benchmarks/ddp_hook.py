"""DDP + `hpctrain.ddp_comm_hook` against `hpctrain.DistributedOptimizer`, same compressor, same run.

    python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/ddp_hook.py --epochs 3

cnn1d on MNIST-1D (10000 samples), Adam at lr 0.005 with a cosine schedule, global batch 128 split
over the ranks (each rank takes every world-th sample of each global batch), the first epoch sent
dense (`warmup_steps`), Gloo on the CPU. Every run starts from the same weights and sees the same
batches. Plain DDP (no hook) is the dense reference. Rank 0 prints one row per run: final
validation accuracy, this rank's payload bytes per step after the warm-up (what the hook or the
optimizer hands to the network), and the mean wall time of a training step.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpctrain import comm  # noqa: E402
from hpctrain.compression import AdaComp, LowRank, Policy  # noqa: E402
from hpctrain.data import load_splits  # noqa: E402
from hpctrain.ddp import ddp_comm_hook  # noqa: E402
from hpctrain.models import build_model  # noqa: E402
from hpctrain.optimizer import DistributedOptimizer  # noqa: E402

COMPRESSORS = {"adacomp": AdaComp, "lowrank": lambda: LowRank(rank=4)}
GLOBAL_BATCH, LR = 128, 0.005


@torch.no_grad()
def accuracy(model: nn.Module, val, rank: int, world: int) -> float:
    model.eval()
    x, y = val.get(np.arange(rank, len(val), world))
    hits = torch.tensor([(model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).sum().item()], dtype=torch.float64)
    td.all_reduce(hits)
    model.train()
    return hits.item() / len(val)


def run(how: str, compressor: str | None, splits, epochs: int) -> tuple[float, float, float]:
    """Train once; (validation accuracy, payload bytes per step after warm-up, seconds per step)."""
    rank, world = td.get_rank(), td.get_world_size()
    torch.manual_seed(0)
    model = build_model("cnn1d", splits.input_shape, splits.num_classes, {})
    steps_per_epoch = len(splits.train) // GLOBAL_BATCH
    policy = Policy(default=COMPRESSORS[compressor](), warmup_steps=steps_per_epoch) if compressor else None
    net: nn.Module = model
    if how == "ddp":
        net = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        if policy is not None:
            state, hook = ddp_comm_hook(policy, model=net)
            net.register_comm_hook(state, hook)
    else:
        optimizer = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=LR),
                                         named_parameters=model.named_parameters(), compression=policy)
    total, wire, times = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(splits.train))
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / total))
            x, y = splits.train.get(order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH][rank::world])
            before = state.wire_bytes if how == "ddp" and policy else 0
            start = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            if how == "ddp":
                sent = state.wire_bytes - before if policy else sum(p.numel() * 4 for p in model.parameters())
            else:
                sent = optimizer.new_step_stats().wire_bytes
            if epoch >= 1 or policy is None:
                wire += sent
    measured = total - (steps_per_epoch if policy is not None else 0)
    return accuracy(model, splits.val, rank, world), wire / measured, float(np.mean(times[steps_per_epoch:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    td.init_process_group("gloo")
    comm.init(backend="torch")
    splits = load_splits(SimpleNamespace(name="mnist1d", num_samples=10000, val_fraction=0.2))
    rows = [("DDP (plain allreduce)", "ddp", None)]
    for name in COMPRESSORS:
        rows += [(f"DDP + hpctrain hook, {name}", "ddp", name), (f"DistributedOptimizer, {name}", "opt", name)]
    if td.get_rank() == 0:
        print(f"cnn1d on MNIST-1D, {td.get_world_size()} ranks (Gloo), {args.epochs} epochs of "
              f"{len(splits.train) // GLOBAL_BATCH} steps, first epoch dense; bytes are rank 0's payloads per "
              "step after it", flush=True)
        print(f"{'run':<36} {'val acc':>8} {'wire B/step':>12} {'step ms':>8}", flush=True)
    for label, how, name in rows:
        acc, wire, seconds = run(how, name, splits, args.epochs)
        if td.get_rank() == 0:
            print(f"{label:<36} {acc:>8.4f} {wire:>12,.0f} {seconds * 1e3:>8.2f}", flush=True)
    td.barrier()


if __name__ == "__main__":
    main()
