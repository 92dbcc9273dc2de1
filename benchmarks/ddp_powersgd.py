"""The peer to beat: torch DistributedDataParallel over Gloo with torch's own PowerSGD hook
(`--hook powersgd`), or with hpctrain's compressors as a DDP hook (`--hook hpctrain`: the
config's `[compression]` policy through `hpctrain.ddp_comm_hook`).

Run by `benchmarks/link.py` under mpirun, on the same run config as `hpctrain train`: the
same model, data split, seed, sampler (each rank's slice of every global batch), optimizer,
LR schedule, step count and evaluation points, so the two step logs line up row for row.

    mpirun -np 4 python benchmarks/ddp_powersgd.py --config configs/mnist1d.toml \\
        --set train.max_steps=40 --rank 4 --port 29517

Rank and world size come from Open MPI's environment; the ranks meet at a TCP store on
127.0.0.1:PORT (so inside a throttled network namespace all traffic shares its loopback).
The whole model is one DDP bucket (`bucket_cap_mb=1000`): PowerSGD then runs once per step
over every gradient (torch's hook over Gloo on CPU also fails with several buckets).
PowerSGD starts after `compression.warmup_steps` plain-allreduce steps, at least 2 (torch's
minimum with error feedback), which is when hpctrain's compressors start under the same config.

The step log is the same HDF5 schema `hpctrain train` writes (`hpctrain.h5log`): `wire_bytes`
is what this rank hands to Gloo (P and Q, plus the tensors PowerSGD leaves uncompressed),
from the hook's own element counts; `comm_time_s` is from the hook's call (end of backward,
one bucket) to its result being ready.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hpctrain  # noqa: E402
from benchmarks.script import one_line_errors  # noqa: E402
from hpctrain.compression import policy_from_config  # noqa: E402
from hpctrain.config import Config, load_config  # noqa: E402
from hpctrain.data import Dataset, filtering, load_splits  # noqa: E402
from hpctrain.data.sampler import GlobalBatchSampler  # noqa: E402
from hpctrain.errors import UserError  # noqa: E402
from hpctrain.h5log import StepLog  # noqa: E402
from hpctrain.models import build_model  # noqa: E402
from hpctrain.train import OPTIMIZERS, lr_at, seed_everything  # noqa: E402

MIN_START_ITER = 2      # torch's smallest start_powerSGD_iter with error feedback and warm start


def check_supported(cfg: Config) -> None:
    """The peer replays plain fixed-batch training only; anything else would not be a like-for-like run."""
    unsupported = {"batch.policy": cfg.batch.policy != "fixed", "batch.max_local": cfg.batch.max_local != 0,
                   "train.backward_passes_per_step": cfg.train.backward_passes_per_step != 1,
                   "data.keep_fraction": cfg.data.keep_fraction != 1, "data.dynamic": cfg.data.dynamic}
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UserError(f"ddp_powersgd.py replays plain fixed-batch training only; reset {', '.join(bad)} to the default")


def launcher_rank_size() -> tuple[int, int, int]:
    """(rank, world size, local rank) from Open MPI's environment."""
    try:
        return tuple(int(os.environ[f"OMPI_COMM_WORLD_{key}"]) for key in ("RANK", "SIZE", "LOCAL_RANK"))
    except KeyError:
        raise UserError("ddp_powersgd.py reads its rank from Open MPI; launch it with mpirun -np N") from None


def device_and_backend(local_rank: int) -> tuple[torch.device, str]:
    """A GPU per local rank with NCCL where CUDA is visible, else the CPU with Gloo."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


class Meter:
    """A hook's state, plus what the current step sent and how long its exchange took."""

    def __init__(self, state: object, hook=None):
        self.state, self.hook = state, hook      # `hook`: the wrapped hook, where it is not torch's PowerSGD
        self.wire_bytes = 0
        self.comm_time_s = 0.0

    def take(self) -> tuple[int, float]:
        """This step's (wire bytes, comm seconds), and reset for the next step."""
        taken = (self.wire_bytes, self.comm_time_s)
        self.wire_bytes, self.comm_time_s = 0, 0.0
        return taken


def metered_powersgd_hook(meter: Meter, bucket):  # no hints here: DDP rejects string annotations
    """torch's `powerSGD_hook` on a `dist.GradBucket`, counting the elements it hands to the
    network and timing it; returns the hook's future."""
    start = time.perf_counter()
    state, buffer = meter.state, bucket.buffer()
    if state.iter < state.start_powerSGD_iter:          # the hook's plain-allreduce phase
        numel = buffer.numel()
        future = powersgd.powerSGD_hook(state, bucket)
    else:
        before = state.total_numel_after_compression
        future = powersgd.powerSGD_hook(state, bucket)
        numel = state.total_numel_after_compression - before
    meter.wire_bytes += numel * buffer.element_size()
    return _timed(meter, future, start)


def metered_hpctrain_hook(meter: Meter, bucket):  # no hints here: DDP rejects string annotations
    """hpctrain's hook, with its own count of the payload bytes it hands to the network."""
    start, before = time.perf_counter(), meter.state.wire_bytes
    future = meter.hook(meter.state, bucket)
    meter.wire_bytes += meter.state.wire_bytes - before
    return _timed(meter, future, start)


def _timed(meter: Meter, future: torch.futures.Future, start: float) -> torch.futures.Future:
    def stop(done: torch.futures.Future) -> torch.Tensor:
        meter.comm_time_s += time.perf_counter() - start
        return done.value()
    return future.then(stop)


def register_hook(ddp: DistributedDataParallel, hook: str, cfg: Config, powersgd_rank: int) -> tuple[Meter, str]:
    """The chosen hook on `ddp`, metered; and how the log names the peer."""
    if hook == "hpctrain":
        meter = Meter(*hpctrain.ddp_comm_hook(policy_from_config(cfg.compression), model=ddp))
        ddp.register_comm_hook(meter, metered_hpctrain_hook)
        return meter, f"hpctrain.ddp_comm_hook {cfg.compression.name}"
    meter = Meter(powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                         start_powerSGD_iter=max(MIN_START_ITER, cfg.compression.warmup_steps)))
    ddp.register_comm_hook(meter, metered_powersgd_hook)
    return meter, f"powerSGD_hook rank {powersgd_rank}"



def to_device(dataset: Dataset, positions: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.get(positions)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, val: Dataset, rank: int, world: int, device: torch.device) -> tuple[float, float]:
    """(val loss, val accuracy) over the whole held-out split, each rank a slice (as hpctrain does)."""
    model.eval()
    mine = np.arange(rank, len(val), world)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk in np.array_split(mine, max(1, -(-len(mine) // 1024))):
        if len(chunk):
            x, y = to_device(val, chunk, device)
            logits = model(x)
            sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double()])
    tdist.all_reduce(sums)
    return float(sums[0]) / len(val), float(sums[1]) / len(val)


def train(cfg: Config, powersgd_rank: int, port: int, hook: str = "powersgd") -> None:
    check_supported(cfg)
    rank, world, local_rank = launcher_rank_size()
    device, backend = device_and_backend(local_rank)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seed_everything(cfg.run.seed)                    # same order as hpctrain's Trainer: same init
    splits = load_splits(cfg.data, cfg.run.seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args).to(device)
    positions = filtering.training_rows(splits.train, cfg.data)
    t = cfg.train
    kwargs = {"momentum": t.momentum} if t.optimizer == "sgd" else {}
    ddp = DistributedDataParallel(model, bucket_cap_mb=1000)
    optimizer = OPTIMIZERS[t.optimizer](ddp.parameters(), lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    meter, peer = register_hook(ddp, hook, cfg, powersgd_rank)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    sampler = GlobalBatchSampler(positions, cfg.run.seed, rank, world)
    loss_fn, batch = nn.CrossEntropyLoss(), cfg.batch.initial
    log = (StepLog(cfg.run_dir / "log.h5", {"config": cfg.to_json(), "world_size": world,
                                           "peer": f"torch {torch.__version__} DDP ({backend}) + {peer}, one bucket"})
           if rank == 0 else None)
    step = samples_seen = 0
    elapsed = 0.0
    try:
        for epoch in range(t.epochs):
            sampler.set_epoch(epoch)
            while not sampler.exhausted() and not (t.max_steps and step >= t.max_steps):
                local = sampler.next_batch(batch)
                start = time.perf_counter()
                ddp.train()
                lr = lr_at(cfg, t.lr, samples_seen / (t.epochs * len(positions)))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = to_device(splits.train, local, device)
                loss = loss_fn(ddp(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                mean_loss = loss.detach().double().reshape(1)
                tdist.all_reduce(mean_loss)
                step += 1
                samples_seen += len(local) * world
                step_time = time.perf_counter() - start
                elapsed += step_time
                wire, comm = meter.take()
                if log is not None:
                    log.append("steps", {"step": step, "epoch": epoch, "loss": float(mean_loss) / world, "lr": lr,
                                         "global_batch": batch, "samples_seen": samples_seen, "step_time_s": step_time,
                                         "comm_time_s": comm, "wire_bytes": wire, "dense_bytes": dense_bytes})
            stopped = bool(t.max_steps) and step >= t.max_steps
            val_loss, val_acc = evaluate(model, splits.val, rank, world, device)
            if log is not None:
                log.append("evals", {"step": step, "epoch": epoch + (0 if stopped else 1), "val_loss": val_loss,
                                     "val_accuracy": val_acc, "wall_time_s": elapsed})
                print(f"[epoch {epoch + 1}/{t.epochs}, step {step}] val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}",
                      flush=True)
            if stopped:
                break
    finally:
        if log is not None:
            log.close()
        tdist.destroy_process_group()


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the run configuration (TOML) hpctrain trains with")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, as in `hpctrain train`")
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD matrix approximation rank (default 4)")
    parser.add_argument("--port", type=int, default=29517, help="TCP port of the rendezvous store on 127.0.0.1")
    parser.add_argument("--hook", choices=("powersgd", "hpctrain"), default="powersgd",
                        help="torch's PowerSGD hook, or hpctrain's compressors (the config's [compression]) as a hook")
    args = parser.parse_args(argv)
    if args.rank < 1:
        raise UserError(f"--rank {args.rank}: the PowerSGD rank must be a positive integer")
    train(load_config(args.config, args.set), args.rank, args.port, args.hook)
    return 0


if __name__ == "__main__":
    sys.exit(main())
