"""`python -m analysis.scores ...` from a checkout: interactive HTML page of per-sample importance scores (`hpctrain report scores`).

A thin script: the code is `hpctrain.analysis.scores` (shipped in the wheel; use that in imports).
"""
import sys

from hpctrain.analysis.scores import *  # noqa: F401,F403  (names of the old `analysis.scores` module)
from hpctrain.analysis.scores import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis.scores"))
