"""One row of numbers per run: accuracy reached, time to a target accuracy, bytes, step time.

Definitions (all from the log's own columns):
  time_to_target_s   wall_time_s of the first evaluation with val_accuracy >= target
  compression_ratio  total dense_bytes / total wire_bytes (how much less went over the wire)
  comm_time_share    total comm_time_s / total step_time_s
  samples_per_s      total global_batch / total step_time_s
"""
from __future__ import annotations

import argparse
import html
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from hpctrain.atomic import write_atomic
from hpctrain.analysis.load import Log, load_logs

SUMMARY_COLUMNS = [
    "run", "world_size", "steps", "final_val_accuracy", "best_val_accuracy", "target_accuracy",
    "time_to_target_s", "step_at_target", "total_wire_bytes", "total_dense_bytes",
    "compression_ratio", "mean_step_time_s", "comm_time_share", "samples_per_s",
]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def default_target(logs: Sequence[Log]) -> float:
    """The best accuracy every run reaches, so time-to-target compares all runs at one bar."""
    bests = [log.evals["val_accuracy"].max() for log in logs if len(log.evals)]
    return min(bests) if bests else math.nan


def summarize(log: Log, target_accuracy: float) -> dict[str, Any]:
    steps, evals = log.steps, log.evals
    reached = evals[evals["val_accuracy"] >= target_accuracy]
    first = reached.iloc[0] if len(reached) else None
    step_time = steps["step_time_s"].sum()
    return {
        "run": log.name,
        "world_size": log.attrs.get("world_size", math.nan),
        "steps": len(steps),
        "final_val_accuracy": evals["val_accuracy"].iloc[-1] if len(evals) else math.nan,
        "best_val_accuracy": evals["val_accuracy"].max() if len(evals) else math.nan,
        "target_accuracy": target_accuracy,
        "time_to_target_s": first["wall_time_s"] if first is not None else math.nan,
        "step_at_target": first["step"] if first is not None else math.nan,
        "total_wire_bytes": int(steps["wire_bytes"].sum()),
        "total_dense_bytes": int(steps["dense_bytes"].sum()),
        "compression_ratio": _ratio(steps["dense_bytes"].sum(), steps["wire_bytes"].sum()),
        "mean_step_time_s": steps["step_time_s"].mean() if len(steps) else math.nan,
        "comm_time_share": _ratio(steps["comm_time_s"].sum(), step_time),
        "samples_per_s": _ratio(steps["global_batch"].sum(), step_time),
    }


def summary_table(logs: Sequence[Log], target_accuracy: float | None = None) -> pd.DataFrame:
    """One row per log; the target defaults to `default_target(logs)`."""
    target = default_target(logs) if target_accuracy is None else target_accuracy
    return pd.DataFrame([summarize(log, target) for log in logs], columns=SUMMARY_COLUMNS)


def format_table(table: pd.DataFrame) -> str:
    """The table for a terminal: 4 significant digits, runs as rows."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


# Short headers for the HTML page, so the 14 columns fit its width (the CSV keeps the full names).
HTML_HEADERS = {
    "run": "run", "world_size": "ranks", "steps": "steps", "final_val_accuracy": "final val acc",
    "best_val_accuracy": "best val acc", "time_to_target_s": "time to target (s)",
    "step_at_target": "step at target", "total_wire_bytes": "bytes on wire", "total_dense_bytes": "bytes dense",
    "compression_ratio": "dense / wire", "mean_step_time_s": "mean step (s)", "comm_time_share": "comm share",
    "samples_per_s": "samples / s",
}


def _si_bytes(value: float) -> str:
    units, k = ("B", "kB", "MB", "GB", "TB"), 0
    while abs(value) >= 1000 and k < len(units) - 1:
        value, k = value / 1000, k + 1
    return f"{value:.4g} {units[k]}"


def html_table(table: pd.DataFrame) -> str:
    """The table for the HTML report, narrow enough for the page: short wrapping headers, bytes
    in kB/MB/GB, and the target accuracy (one value for all runs) in the caption."""
    shown = table.drop(columns="target_accuracy").rename(columns=HTML_HEADERS)
    for column in ("bytes on wire", "bytes dense"):
        shown[column] = shown[column].map(_si_bytes)
    targets = table["target_accuracy"].dropna().unique()
    caption = (f"time and step at target: first evaluation with validation accuracy ≥ {targets[0]:.4g}"
               if len(targets) == 1 else "no evaluations logged: no target accuracy")
    body = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", classes="summary")
    return body.replace("<thead>", f"<caption>{html.escape(caption)}</caption>\n  <thead>", 1)


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, table.to_csv(index=False))


def _accuracy(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not an accuracy in (0, 1], e.g. 0.9")
    return value


def add_target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-accuracy", type=_accuracy, default=None, metavar="A",
                        help="accuracy for time_to_target_s (default: the best accuracy every run reaches)")


def _print_summary(args: argparse.Namespace) -> None:
    table = summary_table(load_logs(args.logs), args.target_accuracy)
    print(format_table(table))
    if args.csv:
        print(f"wrote {write_csv(table, args.csv)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", type=Path, help="log.h5 files written by `hpctrain train`")
    add_target_argument(parser)
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.set_defaults(func=_print_summary)


DESCRIPTION = "Summary table of one or more step logs."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpctrain.analysis.summary") -> int:
    """`python -m hpctrain.analysis.summary` (or the checkout's `python -m analysis.summary`)."""
    from hpctrain.analysis import run_script
    return run_script(add_arguments, DESCRIPTION, prog, argv)


if __name__ == "__main__":
    sys.exit(main())
