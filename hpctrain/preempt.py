"""Walltime, preemption and a vanished launcher.

* `StopSignals`: SIGTERM, SIGUSR1 and SIGINT (what schedulers send at walltime or preemption,
  and Ctrl-C) only *request* a stop. The trainer sends the request with the loss allreduce it
  does every step anyway, so every rank learns of a signal that reached any one of them at the
  same step, with no extra message; they finish that step, write a checkpoint together and exit
  with `REQUEUE_EXIT_CODE`. Repeated signals change nothing (a launcher's follow-up SIGTERM must not
  cut the checkpoint short); a second Ctrl-C interrupts at once. Once the checkpoint is written,
  `exit_on_signal` makes a signal end the process with that code: srun --kill-on-bad-exit
  terminates the ranks still exiting when the first one leaves with 75, and a rank killed by that
  SIGTERM would turn the step's exit code from "requeue" into "failed".
* `watch_launcher`: a rank whose launcher (mpirun, torchrun's agent, slurmstepd) is gone exits
  at once, without writing anything more: its parent process changing is the sign.

`REQUEUE_EXIT_CODE` = 75 (EX_TEMPFAIL in sysexits.h: "try again later"). The job templates
requeue on it: Slurm's script runs `scontrol requeue`, LSF's `#BSUB -Q "75"` requeues by itself;
`hpctrain train --resume=auto` then continues from the checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

REQUEUE_EXIT_CODE = 75
# Exit code of a rank that found its launcher gone (128 + SIGHUP: "hung up").
ORPHAN_EXIT_CODE = 129
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Turns the stop signals into a flag (`requested`), from `install()` until `restore()`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.restore()                     # Ctrl-C twice: stop now
            raise KeyboardInterrupt
        if self.signum is None:                # a scheduler's repeated SIGTERM must not cut the checkpoint short
            self.signum = signum

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def exit_on_signal(self, code: int) -> None:
        """From now on any stop signal exits at once with `code` (nothing is left to write)."""
        self.restore()

        def leave(signum: int, frame: Any) -> None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, leave)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, TypeError):
                pass
        self._previous.clear()


def watch_launcher(poll_s: float = 0.5) -> threading.Thread | None:
    """Exit this process as soon as its parent (the launcher) is gone; None outside a launcher."""
    from hpctrain.comm import launcher

    if launcher.detect().launcher == "none":
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(ORPHAN_EXIT_CODE)

    thread = threading.Thread(target=watch, name="hpctrain-launcher-watch", daemon=True)
    thread.start()
    return thread
