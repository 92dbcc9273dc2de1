"""`hpctrain report`: PNG plots, a summary table (terminal + CSV) and one self-contained HTML page.

    hpctrain report LOG.h5 [LOG2.h5 ...] --out DIR     plots of the runs, overlaid
    hpctrain report scores DATA_DIR --out scores.html  the per-sample score report

The HTML page embeds its images (base64), so it can be mailed or copied off the cluster alone.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from hpctrain.atomic import write_atomic
from hpctrain.analysis.load import Log, load_logs
from hpctrain.analysis.plots import PLOTS, write_plots
from hpctrain.analysis.summary import add_target_argument, format_table, html_table, summary_table, write_csv
from hpctrain.errors import UserError

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
table.summary th { white-space: normal; vertical-align: bottom; } table.summary td { white-space: nowrap; }
table.summary td:first-child { white-space: normal; word-break: break-all; text-align: left; }
caption { caption-side: bottom; text-align: left; color: #555; padding-top: 0.3em; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def render_html(logs: Sequence[Log], table: pd.DataFrame, pngs: dict[str, Path]) -> str:
    """The report page: summary table, every plot inlined, and each run's attrs and config."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>hpctrain report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>hpctrain report</h1>",
             f"<p>{len(logs)} run(s), generated {_dt.datetime.now().isoformat(timespec='seconds')}.</p>",
             "<h2>Summary</h2>",
             html_table(table),
             "<h2>Plots</h2>"]
    for name, (caption, _) in PLOTS.items():
        data = base64.b64encode(pngs[name].read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Does compression pay? (<code>hpctrain advise</code>)</h2>")
    from hpctrain.advise import panel       # imports torch: only when a report is written
    for log in logs:
        parts.append(f"<details><summary>{html.escape(log.name)}</summary><pre>{html.escape(panel(log.path))}</pre>"
                     f"</details>")
    parts.append("<h2>Runs</h2>")
    for log in logs:
        attrs = {k: v for k, v in log.attrs.items() if k != "config"}
        parts.append(f"<details><summary>{html.escape(log.name)} ({html.escape(str(log.path))})</summary>"
                     f"<pre>{html.escape(json.dumps({**attrs, 'config': log.config}, indent=2, default=str))}</pre>"
                     f"</details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(logs: Sequence[Log], out_dir: Path, target_accuracy: float | None = None) -> dict[str, Path]:
    """Write the PNGs, summary.csv and report.html into `out_dir`; returns what was written."""
    table = summary_table(logs, target_accuracy)
    written = dict(write_plots(logs, out_dir))
    written["summary.csv"] = write_csv(table, out_dir / "summary.csv")
    written["report.html"] = write_atomic(out_dir / "report.html", render_html(logs, table, written))
    print(format_table(table))
    return written


def _report(args: argparse.Namespace) -> None:
    if args.paths[0] == "scores":
        if len(args.paths) != 2:
            raise UserError("usage: hpctrain report scores DATA_DIR --out scores.html (one directory)")
        from hpctrain.analysis.scores import write_scores_report
        out = args.out or Path("scores.html")
        write_scores_report(Path(args.paths[1]), out, args.keep_fraction, args.keep)
        print(f"wrote {out}")
        return
    if args.keep_fraction is not None or args.keep is not None:
        raise UserError("--keep-fraction and --keep set the score page's selection: `hpctrain report scores DATA_DIR ...`")
    out_dir = args.out or Path("report")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {str(out_dir)!r} is a file; give a directory for the report")
    written = write_report(load_logs(args.paths), out_dir, args.target_accuracy)
    print(f"wrote {written['report.html']}, {written['summary.csv']} and {len(PLOTS)} plots in {out_dir}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+",
                        help="log.h5 files written by `hpctrain train`, or `scores DATA_DIR`")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: report), or the HTML file for `scores` (default: scores.html)")
    add_target_argument(parser)
    from hpctrain.analysis.scores import add_selection_arguments   # `report scores` only
    add_selection_arguments(parser)
    parser.set_defaults(func=_report)


DESCRIPTION = "Plots, summary table and HTML page of step logs."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpctrain.analysis.report") -> int:
    """`python -m hpctrain.analysis.report` (or the checkout's `python -m analysis.report`)."""
    from hpctrain.analysis import run_script
    return run_script(add_arguments, DESCRIPTION, prog, argv)


if __name__ == "__main__":
    sys.exit(main())
