"""`hpctrain` entry point: dispatch to one module per subcommand, turn errors into one line.

Each subcommand's module defines `add_arguments(parser)` (which sets `func`) and is imported
only when that subcommand runs, so `hpctrain jobs render` does not pay for importing torch;
commands whose work needs torch keep their options in hpctrain/commands/, so `--help` does not either.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import signal
import sys
import time
import traceback
from typing import Callable, Sequence

from hpctrain import __version__, comm
from hpctrain.comm import launcher
from hpctrain.errors import AgreedError, PeerFailure, UserError
from hpctrain.rundir import release_all

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hpctrain.commands.train", "train a model (launch under mpirun, srun, jsrun or horovodrun)"),
    "shard": ("hpctrain.commands.shard", "write HDF5 shards from a dataset, or verify them"),
    "score": ("hpctrain.commands.score", "compute per-sample importance scores of a shard directory"),
    "report": ("hpctrain.analysis.report", "plots, tables and HTML pages from step logs or scores"),
    "jobs": ("hpctrain.jobs", "render or submit LSF (jsrun) and Slurm (srun) job scripts"),
    "advise": ("hpctrain.commands.advise", "predict per world size and link whether compression pays, from a run's log"),
}


def _usage() -> str:
    lines = [f"usage: hpctrain COMMAND [options]   (hpctrain {__version__})", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`hpctrain COMMAND --help` describes a command's options."]
    return "\n".join(lines)


# Seconds a rank other than 0 waits before printing an error of its own: when every rank hits
# the same error, rank 0's line and abort come first and this rank never prints (one message).
SECOND_RANK_GRACE_S = 3.0


def _default_signals() -> None:
    """Errors end the process: a launcher's SIGTERM to the other ranks must end them, not ask them to checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        except (ValueError, TypeError):
            pass


def _agreed_exit(exc: AgreedError) -> int:
    """An error every rank raised together: rank 0 says it (once), every rank exits without an abort."""
    launch = launcher.detect()
    if launch.rank == 0:
        if not exc.printed:
            print(f"hpctrain: error: {exc}", file=sys.stderr, flush=True)
    elif not exc.printed:
        if comm.is_initialized():        # decided from values every rank shares: rank 0 says it
            time.sleep(1.0)
        else:                            # before the engine starts (config): rank 0 says it unless only we failed
            time.sleep(SECOND_RANK_GRACE_S)
            print(f"hpctrain: error: [rank {launch.rank}] {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    return exc.code


# What the engines raise on the ranks that survive a peer's death.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "HorovodInternalError",
              "Horovod has been shut down", "ranks that are no longer active")


def _peer_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return launcher.detect().size > 1 and any(s in text for s in _PEER_GONE)


def run_guarded(func: Callable[[], int | None]) -> int:
    """Run a command; a UserError becomes one line (printed once per job, by the rank that failed, rank 0
    first), and in a multi-rank job any error aborts all ranks."""
    try:
        return func() or 0
    except AgreedError as exc:
        _default_signals()
        release_all()
        return _agreed_exit(exc)
    except PeerFailure:              # the failing rank prints the one line and takes the job down
        _default_signals()
        release_all()
        comm.abort(None, code=2)
    except UserError as exc:
        _default_signals()
        release_all()
        launch = launcher.detect()
        if launch.rank != 0 and launch.size > 1:
            time.sleep(SECOND_RANK_GRACE_S)      # rank 0 failing the same way says it and takes us down
        comm.abort(str(exc), code=2)
    except KeyboardInterrupt:
        release_all()
        comm.abort("interrupted", code=130)
    except BrokenPipeError:          # `hpctrain ... | head` closed our stdout: not an error
        sys.stderr.close()
        return 0
    except Exception as exc:
        _default_signals()
        release_all()
        if _peer_failed(exc):        # a rank died: the launcher or its own line says why
            comm.abort(None, code=2)
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
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"hpctrain: error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"hpctrain {command}", description=help_)
    importlib.import_module(module_name).add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
