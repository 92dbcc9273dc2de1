"""Run the fault-injection suite (tests/test_faults.py) and print the table of docs/reliability.md:
fault | outcome | seconds until every rank has exited | data lost.

    .venv/bin/python benchmarks/faults.py [-k EXPR] [--out table.md]

Each test case measures its own seconds (from the fault to the last rank's exit) and appends a row
to the file named by HPCTRAIN_FAULT_TIMES; this script collects them. A failing case fails the run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table(rows: list[dict]) -> str:
    lines = ["| fault | outcome | seconds until every rank has exited | data lost |", "|---|---|---|---|"]
    for r in rows:
        seconds = "–" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['fault']} | {r['outcome']} | {seconds} | {r['data_lost']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of the cases)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_faults.py")]
        if args.k:
            cmd += ["-k", args.k]
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HPCTRAIN_FAULT_TIMES=str(times)))
        rows = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text)
    if any(r["data_lost"] != "no" for r in rows):
        print("some fault lost data", file=sys.stderr)
        return 1
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
