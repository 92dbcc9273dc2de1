"""Denoise sklearn's digits images (regression: MSE loss, PSNR), with hpctrain's parts in one's own loop.

    mpirun -np 2 python examples/denoise_digits.py --epochs 4
    torchrun --nproc-per-node 2 examples/denoise_digits.py --epochs 4

The targets are the clean 8x8 images from the shard directory, the inputs the same images with
Gaussian noise (fresh each step; fixed for validation). Batches stay small, as in restoration:
AdaptiveBatch grows 16 -> 64 when the validation loss plateaus (or after epoch 1 with --policy schedule).
"""
import argparse, math, tempfile, time
from pathlib import Path

import torch
from torch import nn

import hpctrain, hpctrain.compression
from hpctrain.data import AdaptiveBatchSampler, ShardDataset
from hpctrain.data.shards import ensure_shards

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "hpctrain-examples" / "digits"))
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
parser.add_argument("--policy", choices=["plateau", "schedule", "fixed"], default="plateau")
parser.add_argument("--noise", type=float, default=0.3)
parser.add_argument("--log-file", default="runs/examples/denoise_digits.h5")
args = parser.parse_args()

comm = hpctrain.init()
root = hpctrain.rank() == 0
device = hpctrain.device()
torch.manual_seed(1 + hpctrain.rank())                   # each rank draws its own noise
data = ensure_shards("digits", args.data, shard_size=500)    # written once, by every rank together
train, val = ShardDataset(data), ShardDataset(data, "val")
if root:
    print(f"engine {comm.describe()}, {hpctrain.size()} rank(s), {len(train)} noisy digits to clean", flush=True)

model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.Sigmoid()).to(device)
opt = hpctrain.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=2e-3),
                                    named_parameters=model.named_parameters(),
                                    compression=hpctrain.compression.FP16())
hpctrain.broadcast_parameters(model.state_dict(), root_rank=0)
hpctrain.broadcast_optimizer_state(opt, root_rank=0)
adaptive = hpctrain.AdaptiveBatch(16, 64, args.policy, optimizer=opt, patience=1, at_epochs=[1], lr_scaling="sqrt")
sampler = AdaptiveBatchSampler(train, adaptive, seed=0)
loader = torch.utils.data.DataLoader(train, batch_sampler=sampler)
log = hpctrain.StepLog(args.log_file, {"example": "denoise_digits", "world_size": hpctrain.size()}) if root else None
x_val = val.get(range(hpctrain.rank(), len(val), hpctrain.size()))[0]
noisy_val = x_val + args.noise * torch.randn(x_val.shape, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate() -> tuple[float, float]:
    """Validation MSE over all ranks' slices, and its PSNR (pixels are in [0, 1])."""
    model.eval()
    sq = float(((model(noisy_val.to(device)).cpu() - x_val) ** 2).sum())
    total, count = comm.allreduce_scalars([sq, float(x_val.numel())], name="eval", average=False)
    return total / count, 10 * math.log10(count / total)


step, seen, t0 = 0, 0, time.perf_counter()
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for clean, _ in loader:                              # labels unused: the target is the clean image
        start, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        clean = clean.to(device)
        loss = nn.functional.mse_loss(model(clean + args.noise * torch.randn_like(clean)), clean)
        loss.backward()
        opt.step()
        opt.zero_grad()
        decision = adaptive.step(loss=loss, samples=len(clean))
        sampler.record_batch()
        stats, step, seen = opt.new_step_stats(), step + 1, seen + len(clean) * hpctrain.size()
        if log:
            log.append("steps", {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": lr,
                                 "global_batch": len(clean) * hpctrain.size(), "samples_seen": seen,
                                 "step_time_s": time.perf_counter() - start, "comm_time_s": stats.comm_time_s,
                                 "wire_bytes": stats.wire_bytes, "dense_bytes": stats.dense_bytes})
        if step == args.steps:
            break
    val_loss, psnr = evaluate()
    decision = adaptive.epoch_end(val_loss=val_loss)
    if log:
        log.append("evals", {"step": step, "epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": float("nan"),
                             "wall_time_s": time.perf_counter() - t0})
        print(f"epoch {epoch + 1}: step {step}, val_mse {val_loss:.5f}, PSNR {psnr:.2f} dB, "
              f"global batch {adaptive.global_batch}", flush=True)
        if decision:
            log.append("events", decision.event_row())
    if step == args.steps:
        break
if log:
    log.close()
