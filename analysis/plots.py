"""`python -m analysis.plots ...` from a checkout: PNG plots of one or more step logs.

A thin script: the code is `hpctrain.analysis.plots` (shipped in the wheel; use that in imports).
"""
import sys

from hpctrain.analysis.plots import *  # noqa: F401,F403  (names of the old `analysis.plots` module)
from hpctrain.analysis.plots import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis.plots"))
