"""`python -m analysis.summary ...` from a checkout: summary table of one or more step logs.

A thin script: the code is `hpctrain.analysis.summary` (shipped in the wheel; use that in imports).
"""
import sys

from hpctrain.analysis.summary import *  # noqa: F401,F403  (names of the old `analysis.summary` module)
from hpctrain.analysis.summary import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis.summary"))
