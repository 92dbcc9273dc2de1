"""The small-tensor bypass: one fused dense allreduce per step, with every rank's non-finite flag.

Tensors below the policy's `min_numel` (and shapes the chosen compressor cannot take) are not
worth encoding; `compression = "auto"` may put larger ones here too (`set_params`). After
backward their gradients, in construction order (the same group on every rank), and the step's
non-finite flags (`NonFiniteFlags.to_send`) leave as one grouped allreduce of plain sums: the
gradients prescaled by 1/gradient_predivide_factor before it and scaled to the average (or sum)
after it.
"""
from __future__ import annotations

import torch

from hpctrain.comm.base import Communicator, Work
from hpctrain.optimizer.reduction import Reduction


class Bypass:
    def __init__(self, params: list[torch.Tensor], name: str, communicator: Communicator, reduction: Reduction):
        self.params = params          # construction order: the same on every rank
        self._base_name = name        # unique as long as parameter names are
        self._comm = communicator
        self._reduction = reduction
        self._work: Work | None = None
        self._changes = 0             # membership changes so far (`set_params`)

    @property
    def _name(self) -> str:
        """The collective's name: one per membership, so no engine sees one name with two layouts."""
        return f"{self._base_name}@{self._changes}" if self._changes else self._base_name

    def set_params(self, params: list[torch.Tensor]) -> None:
        """Carry these parameters from the next step on (between steps: nothing in flight)."""
        self.params = params
        self._changes += 1

    @property
    def in_flight(self) -> bool:
        return self._work is not None

    def done(self) -> bool:
        return self._work.done()

    def launch(self, flags: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Start the allreduce of the bypassed gradients (`p.grad`) and `flags`; returns the bytes
        sent per parameter."""
        scale = self._reduction.prescale
        sent = [self._comm.sendable(p.grad if scale == 1.0 else p.grad * scale) for p in self.params]
        self._work = self._comm.grouped_allreduce_async(sent + [flags], name=self._name, average=False,
                                                        **self._reduction.group_kw)
        return [(p, t.numel() * t.element_size()) for p, t in zip(self.params, sent)]

    def finish(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Wait for it: the bypassed parameters' reduced gradients (in `params` order, in their
        dtypes), and every rank's flags."""
        *summed, flags = self._work.wait()
        self._work = None
        scale = self._reduction.sum_scale
        return [tensor.mul_(scale).to(p.dtype) for p, tensor in zip(self.params, summed)], flags
