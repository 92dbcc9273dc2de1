"""`hpctrain score`: its options, turned into a `ScoreOptions`, and `run`, which imports the
scoring code (torch) only when the command runs."""
from __future__ import annotations

import argparse

from hpctrain.data.scoring.options import METHODS, ScoreOptions


def parse_methods(text: str) -> tuple[str, ...]:
    """--method's comma-separated list, each once, in order; a bad name is a usage error."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} (comma-separated)")
    return tuple(dict.fromkeys(methods))


def options(args: argparse.Namespace) -> ScoreOptions:
    """The parsed command line as options (a bad combination fails here, in one line)."""
    return ScoreOptions(data=args.data, methods=args.method, checkpoint=args.checkpoint, extractor=args.extractor,
                        extractor_state=args.extractor_state, config=args.config, overrides=tuple(args.set),
                        epochs=args.epochs, seeds=args.seeds, density=args.density, k=args.k, out=args.out)


def run(args: argparse.Namespace) -> int:
    opts = options(args)
    from hpctrain.data.scoring.compute import compute_scores     # torch: not for `hpctrain score --help`
    return compute_scores(opts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="shard directory (or any data.name; then give --out)")
    parser.add_argument("--method", required=True, type=parse_methods,
                        help=f"one or more (comma-separated) of {', '.join(METHODS)}; one model serves them all")
    parser.add_argument("--checkpoint", help="score with this trained model (else: a short pre-training run)")
    parser.add_argument("--extractor", help="feature-density: frozen extractor, a TorchScript or torch.export "
                                            "(.pt2) file, or module:factory")
    parser.add_argument("--extractor-state", help="state dict file for a module:factory extractor")
    parser.add_argument("--config", help="run config (model, optimizer, batch, seed) for the short pre-training run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--epochs", type=int, default=ScoreOptions.epochs,
                        help=f"epochs of the short pre-training run (default {ScoreOptions.epochs})")
    parser.add_argument("--seeds", type=int, default=ScoreOptions.seeds,
                        help="average the scores of this many short runs, seeded run.seed, run.seed+1, … "
                             f"(default {ScoreOptions.seeds})")
    parser.add_argument("--density", choices=("knn", "centroid"), default=ScoreOptions.density,
                        help="feature-density measure")
    parser.add_argument("--k", type=int, default=ScoreOptions.k,
                        help=f"neighbours for --density knn (default {ScoreOptions.k})")
    parser.add_argument("--out", help="scores file (default DATA/scores.h5)")
    parser.set_defaults(func=run)
