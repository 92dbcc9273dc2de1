"""`python -m analysis.report ...` from a checkout: plots, summary table and HTML page of step logs (the same as `hpctrain report`).

A thin script: the code is `hpctrain.analysis.report` (shipped in the wheel; use that in imports).
"""
import sys

from hpctrain.analysis.report import *  # noqa: F401,F403  (names of the old `analysis.report` module)
from hpctrain.analysis.report import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis.report"))
