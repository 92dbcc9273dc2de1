"""PNG plots of one or more step logs, overlaid (one colour per run).

Every plot is a function `Sequence[Log] -> Figure` listed in `PLOTS`; `write_plots` saves them
all. A group a run did not log (no batch-size events, no per-layer stats) is said so on the
plot instead of failing, so the same set of files comes out of every log.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hpctrain.atomic import write_atomic
from hpctrain.analysis.load import Log, load_logs

SMOOTH_FRACTION = 0.02  # per-step rates are noisy: show a rolling mean over 2% of the steps


def _figure(rows: int = 1, cols: int = 1, sharex: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=sharex, squeeze=False)
    return fig, axes.ravel()


def _color(i: int) -> str:
    return f"C{i % 10}"


def _say_none(fig: Figure, message: str) -> None:
    for ax in fig.axes:
        ax.set_axis_off()
    fig.text(0.5, 0.5, message, ha="center", va="center", color="0.4")


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _smooth(values: pd.Series) -> pd.Series:
    window = max(1, int(len(values) * SMOOTH_FRACTION))
    return values.replace([np.inf, -np.inf], np.nan).rolling(window, min_periods=1).mean()


def plot_loss_and_accuracy(logs: Sequence[Log]) -> Figure:
    """Loss and validation accuracy against steps (top row) and wall time (bottom row), in one figure.

    Two separate figures looked identical whenever step times were steady; side by side, the rows
    show at once whether a run that needs fewer steps also needs less time."""
    fig, axes = _figure(2, 2)
    fig.set_figheight(6.4)
    rows = (("step", "optimizer step", lambda log: log.steps["step"], lambda log: log.evals["step"]),
            ("wall time (s)", "wall-clock time",
             lambda log: log.step_wall_time(), lambda log: log.evals["wall_time_s"]))
    for (xlabel, against, step_x, eval_x), (loss_ax, acc_ax) in zip(rows, axes.reshape(2, 2)):
        for i, log in enumerate(logs):
            loss_ax.plot(step_x(log), log.steps["loss"], color=_color(i), lw=0.8, alpha=0.8, label=f"{log.name} train")
            loss_ax.plot(eval_x(log), log.evals["val_loss"], "o--", color=_color(i), ms=3, label=f"{log.name} val")
            acc_ax.plot(eval_x(log), log.evals["val_accuracy"], "o-", color=_color(i), ms=3, label=log.name)
        loss_ax.set(xlabel=xlabel, ylabel="loss", title=f"loss vs {against}")
        acc_ax.set(xlabel=xlabel, ylabel="validation accuracy", title=f"validation accuracy vs {against}")
    for ax in axes[2:]:
        ax.set_facecolor("#eef3f8")       # the time row looks different at a glance
    _legend(axes[0])
    _legend(axes[1])
    return fig


def plot_batch_and_lr(logs: Sequence[Log]) -> Figure:
    """Global batch and learning rate per step; dotted lines mark batch-size decisions."""
    fig, (batch_ax, lr_ax) = _figure(2, 1, sharex=True)
    for i, log in enumerate(logs):
        batch_ax.step(log.steps["step"], log.steps["global_batch"], where="post", color=_color(i), label=log.name)
        lr_ax.plot(log.steps["step"], log.steps["lr"], color=_color(i), label=log.name)
        for j, step in enumerate(log.events["step"]):
            label = f"{log.name} batch-size event" if j == 0 else None
            for ax in (batch_ax, lr_ax):
                ax.axvline(step, color=_color(i), ls=":", lw=1, label=label if ax is batch_ax else None)
    batch_ax.set(ylabel="global batch", title="global batch size and learning rate")
    lr_ax.set(xlabel="step", ylabel="learning rate")
    if not any(len(log.events) for log in logs):
        batch_ax.set_title("global batch size and learning rate (no batch-size events logged)")
    _legend(batch_ax)
    return fig


def plot_bytes_per_step(logs: Sequence[Log]) -> Figure:
    fig, (ax,) = _figure()
    for i, log in enumerate(logs):
        ax.plot(log.steps["step"], log.steps["wire_bytes"], color=_color(i), label=f"{log.name} wire")
        ax.plot(log.steps["step"], log.steps["dense_bytes"], "--", color=_color(i), label=f"{log.name} dense")
    ax.set(xlabel="step", ylabel="bytes per step", title="bytes sent (wire) vs uncompressed (dense)")
    if any(len(log.steps) for log in logs):
        ax.set_yscale("log")
    _legend(ax)
    return fig


def warmup_steps(log: Log) -> int:
    """compression.warmup_steps of the run: its first steps send every parameter dense."""
    return int(log.config.get("compression", {}).get("warmup_steps", 0) or 0)


def layer_table(log: Log) -> pd.DataFrame:
    """Per parameter: mean wire and dense bytes per logged step after the dense warm-up (the steps
    `hpctrain.advise` also leaves out), and their ratio dense/wire."""
    layers = log.layers[log.layers["step"] > warmup_steps(log)]
    table = layers.groupby("name", sort=False)[["wire_bytes", "dense_bytes"]].mean()
    table["ratio"] = table["dense_bytes"] / table["wire_bytes"].where(table["wire_bytes"] > 0)
    return table


def plot_bytes_per_layer(logs: Sequence[Log]) -> Figure:
    """Per parameter: wire vs dense bytes and the compression ratio, one bar per run."""
    tables = [(i, log, layer_table(log)) for i, log in enumerate(logs)]
    with_layers = [(i, log, table) for i, log, table in tables if len(table)]
    names = list(dict.fromkeys(n for _, _, table in with_layers for n in table.index))
    fig, (bytes_ax, ratio_ax) = _figure(1, 2)
    fig.set_figheight(max(3.6, 0.35 * len(names) * max(1, len(with_layers)) + 1.2))
    if not names:
        in_warmup = any(len(log.layers) for log in logs)
        _say_none(fig, "every per-layer record is from the dense warm-up (compression.warmup_steps); "
                       "log a longer run" if in_warmup else
                       "no per-layer records logged (log.layers_every = 0, or the run is too short)")
        return fig
    y = np.arange(len(names))
    height = 0.8 / len(with_layers)
    for k, (i, log, table) in enumerate(with_layers):
        table = table.reindex(names)
        offset = y - 0.4 + height * (k + 0.5)
        bytes_ax.barh(offset, table["dense_bytes"], height, color="none", edgecolor=_color(i), ls="--",
                      label=f"{log.name} dense")
        bytes_ax.barh(offset, table["wire_bytes"], height, color=_color(i), label=f"{log.name} wire")
        ratio_ax.barh(offset, table["ratio"], height, color=_color(i), label=log.name)
    for ax in (bytes_ax, ratio_ax):
        ax.set_yticks(y, names, fontsize="small")
        ax.invert_yaxis()
    warmups = [(warmup_steps(log), log.name) for _, log, _ in with_layers]
    said = str(warmups[0][0]) if len(warmups) == 1 else ", ".join(f"{w} ({name})" for w, name in warmups)
    fig.suptitle(f"records of the steps after the dense warm-up only (compression.warmup_steps = {said})",
                 fontsize="small", color="0.3")
    bytes_ax.set(xscale="log", xlabel="bytes per logged step", title="wire vs dense bytes per parameter")
    ratio_ax.set(xlabel="dense / wire", title="compression ratio per parameter")
    _legend(bytes_ax)
    return fig


def _plot_rolling(logs: Sequence[Log], per_step: Callable[[Log], pd.Series], ylabel: str, title: str) -> Figure:
    """One smoothed per-step quantity of every log against the step."""
    fig, (ax,) = _figure()
    for i, log in enumerate(logs):
        ax.plot(log.steps["step"], _smooth(per_step(log)), color=_color(i), label=log.name)
    ax.set(xlabel="step", ylabel=ylabel, ylim=(0, None), title=title)
    _legend(ax)
    return fig


def plot_comm_share(logs: Sequence[Log]) -> Figure:
    return _plot_rolling(logs, lambda log: log.steps["comm_time_s"] / log.steps["step_time_s"],
                         "comm time / step time", "share of step time spent communicating (rolling mean)")


def plot_throughput(logs: Sequence[Log]) -> Figure:
    return _plot_rolling(logs, lambda log: log.steps["global_batch"] / log.steps["step_time_s"],
                         "samples / s", "throughput (rolling mean)")


PLOTS: dict[str, tuple[str, Callable[[Sequence[Log]], Figure]]] = {
    "loss_accuracy": ("Loss and validation accuracy vs step (top) and vs wall time (bottom)", plot_loss_and_accuracy),
    "batch_lr": ("Global batch size and learning rate, batch-size events marked", plot_batch_and_lr),
    "bytes_per_step": ("Wire vs dense bytes per step", plot_bytes_per_step),
    "bytes_per_layer": ("Wire vs dense bytes and compression ratio per parameter", plot_bytes_per_layer),
    "comm_share": ("Communication time share", plot_comm_share),
    "throughput": ("Throughput", plot_throughput),
}


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_plots(logs: Sequence[Log], out_dir: Path) -> dict[str, Path]:
    """Save every plot in `PLOTS` as `out_dir/<name>.png`; returns name -> path."""
    return {name: write_atomic(out_dir / f"{name}.png", figure_png(make(logs)))
            for name, (_, make) in PLOTS.items()}


def _write_plots(args: argparse.Namespace) -> None:
    for path in write_plots(load_logs(args.logs), args.out).values():
        print(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", type=Path, help="log.h5 files written by `hpctrain train`")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="directory for the PNGs (default: plots)")
    parser.set_defaults(func=_write_plots)


DESCRIPTION = "PNG plots of one or more step logs."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpctrain.analysis.plots") -> int:
    """`python -m hpctrain.analysis.plots` (or the checkout's `python -m analysis.plots`)."""
    from hpctrain.analysis import run_script
    return run_script(add_arguments, DESCRIPTION, prog, argv)


if __name__ == "__main__":
    sys.exit(main())
