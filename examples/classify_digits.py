"""Classify sklearn's digits from a shard directory, with hpctrain's parts in one's own loop.

    mpirun -np 2 python examples/classify_digits.py --epochs 3      # Horovod engine
    torchrun --nproc-per-node 2 examples/classify_digits.py --epochs 3  # torch.distributed engine

ShardDataset + AdaptiveBatchSampler feed a DataLoader that is never rebuilt; DistributedOptimizer
averages top-k compressed gradients; AdaptiveBatch grows the batch (gns on 2+ ranks); StepLog
records every step (read it while it trains: `hpctrain report`, or hpctrain.h5log.read_log).
"""
import argparse, tempfile, time
from pathlib import Path

import torch
from torch import nn

import hpctrain, hpctrain.compression
from hpctrain.data import AdaptiveBatchSampler, ShardDataset
from hpctrain.data.shards import ensure_shards

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "hpctrain-examples" / "digits"))
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
parser.add_argument("--log-file", default="runs/examples/classify_digits.h5")
parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per rank")
args = parser.parse_args()

comm = hpctrain.init()                       # Horovod under mpirun/horovodrun, torch.distributed otherwise
root = hpctrain.rank() == 0
if root:
    print(f"engine {comm.describe()}, {hpctrain.size()} rank(s)", flush=True)
data = ensure_shards("digits", args.data, shard_size=500)    # written once, by every rank together
train, val = ShardDataset(data), ShardDataset(data, "val")
device = hpctrain.device()

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
opt = hpctrain.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                    named_parameters=model.named_parameters(),
                                    compression=hpctrain.compression.TopK(ratio=0.1))
hpctrain.broadcast_parameters(model.state_dict(), root_rank=0)
hpctrain.broadcast_optimizer_state(opt, root_rank=0)
policy = "gns" if hpctrain.size() > 1 else "schedule"     # gns compares per-rank and global gradients
adaptive = hpctrain.AdaptiveBatch(64, 512, policy, optimizer=opt, at_epochs=[1, 2], decide_every=5, gns_ema=0.9)
sampler = AdaptiveBatchSampler(train, adaptive, seed=0)
loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=args.workers)
log = hpctrain.StepLog(args.log_file, {"example": "classify_digits", "world_size": hpctrain.size()}) if root else None
t0 = time.perf_counter()


def note(decision) -> None:
    """Rank 0 logs rank 0's decision (every rank applied the same one)."""
    if decision and log:
        log.append("events", decision.event_row())
        print(f"step {decision.step}: global batch {decision.old_batch} -> {decision.global_batch}: {decision.reason}")


@torch.no_grad()
def evaluate() -> tuple[float, float]:
    """Validation loss and accuracy: each rank scores a slice, one allreduce sums them."""
    model.eval()
    x, y = val.get(range(hpctrain.rank(), len(val), hpctrain.size()))
    logits = model(x.to(device)).cpu()
    loss, correct = comm.allreduce_scalars([float(nn.functional.cross_entropy(logits, y, reduction="sum")),
                                            float((logits.argmax(1) == y).sum())], name="eval", average=False)
    return loss / len(val), correct / len(val)


step = seen = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        start, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        x, y = x.to(device), y.to(device)
        loss_sum = 0.0
        for xb, yb in adaptive.micro_batches(x, y):          # accumulation above max_local
            loss = nn.functional.cross_entropy(model(xb), yb)
            (loss * len(xb) / len(x)).backward()
            loss_sum += float(loss.detach()) * len(xb)
        opt.step()
        opt.zero_grad()
        decision = adaptive.step(loss=loss_sum / len(x), samples=len(x))   # collective: every rank, every step
        sampler.record_batch()                               # for a mid-epoch sampler.state_dict()
        stats, step, seen = opt.new_step_stats(), step + 1, seen + len(x) * hpctrain.size()
        if log:
            log.append("steps", {"step": step, "epoch": epoch, "loss": loss_sum / len(x), "lr": lr,
                                 "global_batch": len(x) * hpctrain.size(), "samples_seen": seen,
                                 "step_time_s": time.perf_counter() - start, "comm_time_s": stats.comm_time_s,
                                 "wire_bytes": stats.wire_bytes, "dense_bytes": stats.dense_bytes})
        note(decision)
        if step == args.steps:
            break
    val_loss, accuracy = evaluate()
    if log:
        log.append("evals", {"step": step, "epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": accuracy,
                             "wall_time_s": time.perf_counter() - t0})
        print(f"epoch {epoch + 1}: step {step}, val_loss {val_loss:.4f}, accuracy {accuracy:.3f}", flush=True)
    note(adaptive.epoch_end(val_loss=val_loss))
    if step == args.steps:
        break
if log:
    log.close()
