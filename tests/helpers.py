"""The repository root, for tests that read its configs and scripts (launchers are
`hpctrain.local_launch`)."""
from __future__ import annotations

from pathlib import Path

from hpctrain.compression.synthetic import heavy_tailed_grads  # noqa: F401  (until every import moves)
from hpctrain.local_launch import (ENGINES, HPCTRAIN, MPIRUN, MPIRUN_LOCAL, TORCHRUN,  # noqa: F401
                                   local_env as _env, run_cli, run_mpi, run_torchrun)

REPO = Path(__file__).resolve().parents[1]
