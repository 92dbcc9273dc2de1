"""`hpctrain train`: its options, and `run`, which starts `hpctrain.train.Trainer`.

Apart from hpctrain.train (which imports torch) so `hpctrain train --help` does not import torch.
"""
from __future__ import annotations

import argparse

from hpctrain import comm, preempt
from hpctrain.config import check_world_size, load_config
from hpctrain.errors import AgreedError, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run configuration (TOML); defaults apply where omitted")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (TOML syntax), e.g. --set train.lr=0.1")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT|latest|auto",
                        help="continue from a checkpoint: a path, 'latest' in the run directory (the "
                             "default when the flag is bare), or 'auto' (latest if any, else start fresh)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in a run directory that holds one: the old run is moved aside "
                             "to RUN_DIR.old-<time> (nothing is deleted)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stop = preempt.StopSignals().install()      # from the start: a signal during start-up stops at step 1
    from hpctrain.train import Trainer, init_comm   # torch: not for `hpctrain train --help`

    try:
        cfg = load_config(args.config, args.set)      # every rank validates before any work starts
    except UserError as exc:                          # the same on every rank: said once
        raise AgreedError(str(exc)) from None
    if args.resume is not None and args.overwrite:
        raise AgreedError("--overwrite starts a fresh run and --resume continues one; give only one of them")
    init_comm(cfg)
    preempt.watch_launcher()
    try:
        check_world_size(cfg, comm.size())
    except UserError as exc:
        raise AgreedError(str(exc)) from None
    try:
        code = Trainer(cfg, stop, resume=args.resume, overwrite=args.overwrite, prepare=True).fit()
    except BaseException:
        stop.restore()      # from here a launcher's SIGTERM ends the process
        raise
    if code == preempt.REQUEUE_EXIT_CODE:
        stop.exit_on_signal(code)   # checkpoint written: a launcher ending the step as a peer exits keeps the 75
    else:
        stop.restore()
    return code
