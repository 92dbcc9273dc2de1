"""The two gradient norms the noise scale needs, measured as the optimizer exchanges gradients.

The gns policy (`gns.py`) compares each rank's local gradient with the averaged one. A
`GradNormObserver` registered with a `hpctrain.DistributedOptimizer` sees both sides of every
exchange: it adds up |g_local|² from the squared norms the optimizer computes anyway (its
finiteness check, one dot product per gradient) as gradients leave, and takes |g_averaged|²
once every averaged gradient is in `p.grad` (fusion 'none' or 'backward'; with 'forward' the
averages are kept aside and nothing is measured).

    norms = GradNormObserver.attach(optimizer)
    ...; optimizer.step()
    local_sqnorm, global_sqnorm = norms.take()      # NaN if this step was not measured
"""
from __future__ import annotations

import math
from typing import Any

import torch

from hpctrain.optimizer import squared_norm


class GradNormObserver:
    """The optimizer's `GradientObserver` for batch growth: the last step's |g_local|², |g_averaged|²."""

    def __init__(self) -> None:
        self.local_sqnorm = math.nan          # |g_local|² before compression
        self.global_sqnorm = math.nan         # |g_averaged|² after the exchange
        self._local: torch.Tensor | float = 0.0
        self._handle: Any = None

    @classmethod
    def attach(cls, optimizer: Any) -> GradNormObserver:
        """A new observer, registered with `optimizer` (a `hpctrain.DistributedOptimizer`)."""
        observer = cls()
        observer._handle = optimizer.register_gradient_observer(observer)
        return observer

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> tuple[float, float]:
        """(|g_local|², |g_averaged|²) of the step just exchanged, then NaN until the next one."""
        norms = self.local_sqnorm, self.global_sqnorm
        self.local_sqnorm = self.global_sqnorm = math.nan
        return norms

    # -- the optimizer's GradientObserver interface --------------------------------------
    def before_exchange(self, param: torch.Tensor, grad: torch.Tensor, sqnorm: torch.Tensor) -> None:
        self._local = self._local + sqnorm.double()

    def after_exchange(self, params: list[torch.Tensor]) -> None:
        self.local_sqnorm = float(self._local)
        self.global_sqnorm = float(sum(squared_norm(p.grad).double() for p in params))
        self._local = 0.0
