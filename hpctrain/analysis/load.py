"""A step log as pandas DataFrames, one per group (steps, evals, events, layers), plus its attrs.

Reading goes through `hpctrain.h5log.read_log` (schema check; SWMR read, so a log that is still
being written reads consistently, rows a writer is mid-way through appending are dropped).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from hpctrain.errors import UserError
from hpctrain.h5log import GROUPS, read_log


@dataclass
class Log:
    """One run's log: `name` labels it in plots and tables; groups keep the schema's columns."""
    path: Path
    name: str
    attrs: dict[str, Any]
    steps: pd.DataFrame
    evals: pd.DataFrame
    events: pd.DataFrame
    layers: pd.DataFrame

    @property
    def config(self) -> dict[str, Any]:
        """The run's configuration as the `config` attr recorded it (empty if absent)."""
        raw = self.attrs.get("config")
        return json.loads(raw) if isinstance(raw, str) and raw else {}

    def group(self, name: str) -> pd.DataFrame:
        return getattr(self, name)

    def step_wall_time(self) -> pd.Series:
        """Wall time (s) at each step, which the log records only at evaluations.

        Estimated as the last evaluation's `wall_time_s` plus the step times since, so the
        loss and the validation accuracy can share one wall-clock axis.
        """
        train_time = self.steps["step_time_s"].cumsum().to_numpy()
        if not len(self.evals) or not len(self.steps):
            return pd.Series(train_time, index=self.steps.index)
        eval_steps = self.evals["step"].to_numpy()
        step_pos = np.searchsorted(self.steps["step"].to_numpy(), eval_steps, side="right") - 1
        train_at_eval = np.where(step_pos >= 0, train_time[np.maximum(step_pos, 0)], 0.0)
        anchor = np.searchsorted(eval_steps, self.steps["step"].to_numpy(), side="right") - 1
        since = np.maximum(anchor, 0)
        wall = self.evals["wall_time_s"].to_numpy()[since] + train_time - train_at_eval[since]
        return pd.Series(np.where(anchor >= 0, wall, train_time), index=self.steps.index)


def load_log(path: str | Path, name: str | None = None) -> Log:
    """Read one log; `name` defaults to the config's run name, else the log's directory name."""
    path = Path(path)
    raw = read_log(path)
    frames = {group: pd.DataFrame({c: raw.get(group, {}).get(c, []) for c in columns})
              for group, columns in GROUPS.items()}
    log = Log(path=path, name="", attrs=raw["attrs"], **frames)
    log.name = name or log.config.get("run", {}).get("name") or path.parent.name or path.stem
    return log


def load_logs(paths: Sequence[str | Path]) -> list[Log]:
    """Read several logs; runs with the same name are told apart by their path."""
    logs = [load_log(p) for p in paths]
    counts = Counter(log.name for log in logs)
    for log in logs:
        if counts[log.name] > 1:
            log.name = str(log.path)
    if len({log.name for log in logs}) < len(logs):
        raise UserError("the same log is given twice; pass each log.h5 once")
    return logs


def _print_logs(args: argparse.Namespace) -> None:
    for log in load_logs(args.logs):
        if args.group:
            log.group(args.group).to_csv(sys.stdout, index=False)
            continue
        counts = ", ".join(f"{g}: {len(log.group(g))}" for g in GROUPS)
        print(f"{log.name}  ({log.path})\n  rows: {counts}")
        for key, value in sorted(log.attrs.items()):
            if key != "config":
                print(f"  {key}: {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", type=Path, help="log.h5 files written by `hpctrain train`")
    parser.add_argument("--group", choices=list(GROUPS),
                        help="print this group as CSV (default: an overview of each log)")
    parser.set_defaults(func=_print_logs)


DESCRIPTION = "Show what a step log holds, or print one group as CSV."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpctrain.analysis.load") -> int:
    """`python -m hpctrain.analysis.load` (or the checkout's `python -m analysis.load`)."""
    from hpctrain.analysis import run_script
    return run_script(add_arguments, DESCRIPTION, prog, argv)


if __name__ == "__main__":
    sys.exit(main())
