"""`hpctrain` entry point: dispatch to one module per subcommand, turn errors into one line.

Each subcommand's module defines `add_arguments(parser)` (which sets `func`) and is imported
only when that subcommand runs, so `hpctrain jobs render` does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Callable, Sequence

from hpctrain import __version__
from hpctrain.errors import PeerFailure, UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hpctrain.train", "train a model (launch under mpirun, srun, jsrun or horovodrun)"),
    "shard": ("hpctrain.data.shards", "write HDF5 shards from a dataset, or verify them"),
    "score": ("hpctrain.data.scoring", "compute per-sample importance scores of a shard directory"),
    "report": ("analysis.report", "plots, tables and HTML pages from step logs or scores"),
    "jobs": ("hpctrain.jobs", "render or submit LSF (jsrun) and Slurm (srun) job scripts"),
}


def _usage() -> str:
    lines = [f"usage: hpctrain COMMAND [options]   (hpctrain {__version__})", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`hpctrain COMMAND --help` describes a command's options."]
    return "\n".join(lines)


def run_guarded(func: Callable[[], int | None]) -> int:
    """Run a command; a UserError becomes one line, and in a multi-rank job any error aborts all ranks."""
    from hpctrain import comm

    try:
        return func() or 0
    except PeerFailure:              # the failing rank prints the one line and takes the job down
        comm.abort(None, code=2)
    except UserError as exc:
        comm.abort(str(exc), code=2)
    except KeyboardInterrupt:
        comm.abort("interrupted", code=130)
    except BrokenPipeError:          # `hpctrain ... | head` closed our stdout: not an error
        sys.stderr.close()
        return 0
    except Exception:
        traceback.print_exc()
        comm.abort("unexpected error (traceback above); please report it", code=1)
    return 1  # not reached: abort exits


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"hpctrain: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"hpctrain {command}", description=help_)
    importlib.import_module(module_name).add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
