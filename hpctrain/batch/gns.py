"""On-line gradient noise scale: McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".

Data-parallel training already computes gradients at two batch sizes every step: each rank's
local gradient (B_small = samples on that rank) and the allreduced global gradient (B_big =
the global batch). Since E|G_B|² = |G|² + tr(Σ)/B, the two squared norms give unbiased
estimates of the true gradient's squared norm |G|² and of the per-sample noise tr(Σ)
(appendix A.1, the "simple" estimator). Both are noisy, so each is smoothed with its own
bias-corrected EMA and the noise scale is the ratio of the smoothed values, B_noise = tr(Σ)/|G|².
"""
from __future__ import annotations

import math
from typing import Any


def unbiased_estimates(small_sqnorm: float, big_sqnorm: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|², tr(Σ)) from |G_small|² at batch b_small and |G_big|² at batch b_big > b_small."""
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sqnorm = (b_big * big_sqnorm - b_small * small_sqnorm) / (b_big - b_small)
    trace = (small_sqnorm - big_sqnorm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sqnorm, trace


class NoiseScaleEstimator:
    """Bias-corrected EMAs of |G|² and tr(Σ); `noise_scale` is their ratio."""

    def __init__(self, ema: float):
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self._grad_sqnorm = 0.0
        self._trace = 0.0
        self.updates = 0

    def update(self, grad_sqnorm: float, trace: float) -> None:
        self._grad_sqnorm = self.ema * self._grad_sqnorm + (1 - self.ema) * grad_sqnorm
        self._trace = self.ema * self._trace + (1 - self.ema) * trace
        self.updates += 1

    def _debiased(self, value: float) -> float:
        return value / (1 - self.ema ** self.updates)

    @property
    def grad_sqnorm(self) -> float | None:
        return self._debiased(self._grad_sqnorm) if self.updates else None

    @property
    def trace(self) -> float | None:
        return self._debiased(self._trace) if self.updates else None

    @property
    def noise_scale(self) -> float | None:
        """tr(Σ)/|G|²; inf when the signal estimate is not positive (noise dominates); None before data."""
        if not self.updates:
            return None
        grad_sqnorm = self._debiased(self._grad_sqnorm)
        return self._debiased(self._trace) / grad_sqnorm if grad_sqnorm > 0 else math.inf

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sqnorm": self._grad_sqnorm, "trace": self._trace, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_sqnorm = float(state["grad_sqnorm"])
        self._trace = float(state["trace"])
        self.updates = int(state["updates"])
