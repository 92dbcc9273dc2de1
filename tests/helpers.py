"""The repository root, for tests that read its configs and scripts (launchers are
`hpctrain.local_launch`, synthetic gradients `hpctrain.compression.synthetic`)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
