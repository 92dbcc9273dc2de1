"""Analysis of hpctrain step logs: load (pandas), summarise, plot, and report (HTML).

Everything here runs on one process without Horovod, so logs can be studied on a login node:
`hpctrain report LOG.h5 ...`, or `python -m hpctrain.analysis.load|summary|plots|report|scores ...`
(from a checkout, the card's thin scripts `python -m analysis.load ...` run the same code).
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence


def run_script(add_arguments: Callable[[argparse.ArgumentParser], None], description: str,
               prog: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m hpctrain.analysis.<name>` (and `analysis/<name>.py`): same one-line errors as the `hpctrain` CLI."""
    from hpctrain.cli import run_guarded

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.func(args))
