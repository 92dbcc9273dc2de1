"""Overlap of communication with backward: what of the exchange the step actually waits for.

The optimizer launches a layer's exchange as soon as its gradient is ready, so communication
runs behind the rest of backward. We model the hideable window as a fraction `overlap` of the
compute time per step (backward is ~2/3 of compute, and the first layers' gradients, ready
last, cannot hide: 0.5 by default). Codec time is not hidden: it runs on the same device.
"""
from __future__ import annotations

import statistics

DEFAULT_OVERLAP = 0.5


def exposed(comm_s: float, compute_s: float, overlap: float = DEFAULT_OVERLAP) -> tuple[float, float]:
    """(communication the step waits for, communication hidden behind backward)."""
    hidden = min(comm_s, max(0.0, overlap) * compute_s)
    return comm_s - hidden, hidden


def compute_time(step_s: list[float], comm_s: list[float], skip: int) -> float:
    """Median of step − exposed comm over the steps after the first `skip` (set-up steps)."""
    values = [s - c for s, c in zip(step_s, comm_s)][skip:] or [s - c for s, c in zip(step_s, comm_s)]
    return statistics.median(values)
