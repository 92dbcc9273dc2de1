"""The card's analysis scripts, for a checkout: `python -m analysis.load|summary|plots|report|scores ...`.

Each is a thin script over the importable code in `hpctrain.analysis`, which is what the wheel
ships (there is no top-level `analysis` package in it); import from `hpctrain.analysis` in code.
"""
from hpctrain.analysis import run_script  # noqa: F401
