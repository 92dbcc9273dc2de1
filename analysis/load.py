"""`python -m analysis.load ...` from a checkout: show what a step log holds, or print one group as CSV.

A thin script: the code is `hpctrain.analysis.load` (shipped in the wheel; use that in imports).
"""
import sys

from hpctrain.analysis.load import *  # noqa: F401,F403  (names of the old `analysis.load` module)
from hpctrain.analysis.load import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis.load"))
