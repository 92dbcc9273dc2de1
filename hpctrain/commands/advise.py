"""`hpctrain advise LOG.h5`: its options, and `run`, which imports hpctrain.advise (torch, through
hpctrain.cost) only when the command runs, so `hpctrain advise --help` answers at once."""
from __future__ import annotations

import argparse
from pathlib import Path

from hpctrain.compression.registry import COMPRESSORS
from hpctrain.cost.links import DEFAULT_INTRA
from hpctrain.cost.overlap import DEFAULT_OVERLAP

METHODS = ("dense", *COMPRESSORS)


def run(args: argparse.Namespace) -> int:
    from hpctrain import advise     # torch, through hpctrain.cost: not for `hpctrain advise --help`
    print(advise.advise(advise.AdviseOptions(
        args.log, args.ranks, args.link, args.latency_us, args.ranks_per_node, args.intra_link, args.site, args.nodes,
        args.overlap, args.methods, args.skip_steps, not args.no_measure, args.min_run_time, args.memory_gbs)))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="log.h5 of a short run (`hpctrain train`)")
    parser.add_argument("--ranks", help="comma-separated world sizes (default 4,64,1024,8192; with --site: nodes × ranks per node)")
    parser.add_argument("--link", help="comma-separated inter-node rates (default 1gbit,25gbit,200gbit)")
    parser.add_argument("--latency-us", type=float, help="inter-node latency per step in µs (default by rate: 50, 10 or 5)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing a node's NICs (default 1)")
    parser.add_argument("--intra-link", help=f"rate between ranks of a node (default {DEFAULT_INTRA})")
    parser.add_argument("--site", help="a site of jobs/sites/ with a [links] table (frontier, perlmutter, summit)")
    parser.add_argument("--nodes", type=int, help="with --site: how many nodes")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help=f"fraction of compute that can hide communication (default {DEFAULT_OVERLAP})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--skip-steps", type=int, help="set-up steps left out of the compute time (default 10%%, at least 1)")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not time codecs or simulate ratios here: use modelled codec times and assumed ratios")
    parser.add_argument("--min-run-time", type=float, default=0.15, help="seconds of timing per codec and layer (default 0.15)")
    parser.add_argument("--memory-gbs", type=float, default=1500.0,
                        help="device memory bandwidth in GB/s for modelled codec times (default 1500, an A100)")
    parser.set_defaults(func=run)
