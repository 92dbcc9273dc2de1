"""Run `hpctrain train` on every rank and record what each rank did at each step (for test_batch_mpi).

Usage: mpirun -np N python tests/batch_probe.py OUT.json [hpctrain train options]
Rank 0 writes OUT.json: one list per rank of {step, epoch, batch, accumulation, lr, positions}.
The real training loop runs unchanged; only `Trainer._step` is wrapped to record its input.
"""
from __future__ import annotations

import argparse
import json
import sys

from hpctrain import comm
from hpctrain.config import check_world_size, load_config
from hpctrain.commands.train import add_arguments
from hpctrain.train import Trainer


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    comm.init()
    check_world_size(cfg, comm.size())
    trainer = Trainer(cfg)
    records: list[dict] = []
    train_step = trainer._step

    def recording_step(local):
        loss = train_step(local)
        p = trainer.progress
        records.append({"step": p.step + 1, "epoch": p.epoch, "batch": p.global_batch,
                        "accumulation": trainer.optimizer.backward_passes_per_step,
                        "lr": trainer.optimizer.param_groups[0]["lr"], "positions": local.tolist()})
        return loss

    trainer._step = recording_step
    trainer.fit(resume=args.resume)
    every_rank = comm.get().allgather_object(records, name="probe")
    if comm.is_root():
        with open(out, "w") as f:
            json.dump(every_rank, f)


if __name__ == "__main__":
    main()
