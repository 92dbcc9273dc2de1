"""The fusion mode, chosen once at construction: when each parameter's update runs.

A mode answers three questions: where an averaged gradient goes when its exchange lands
(`place`) and what happens then (`landed`), what `step()` does, and what `flush()` does.

* "none": gradients land in `p.grad`; `step()` waits for all of them, then runs the wrapped
  optimizer's update once.
* "backward": the parameters whose exchanges have completed are updated from backward's hooks
  while backward continues, and the rest in `step()` as their exchanges land.
* "forward": `step()` snapshots the hyper-parameters and returns; each update happens before the
  parameter's module runs its next forward (a forward pre-hook; while one waits for its
  exchange, the updates of those already exchanged are applied). Pending updates are applied by
  `flush()` (and by `state_dict()`): call it on every rank before evaluation or a checkpoint. A
  parameter read by a module that does not own it (so that no pre-hook of its owner runs first)
  cannot be forward-fused; that is detected and reported.

Both fused modes give exactly the updates of "none". A mode keeps no reference to its optimizer
(it is handed one per call), so a discarded optimizer is freed at once, hooks and all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from hpctrain.errors import InvalidArgument, UserError

if TYPE_CHECKING:
    from hpctrain.optimizer.distributed import _DistributedOptimizer as Optimizer

Fusion = Literal["none", "backward", "forward"]


def _snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters now (tensor LRs are updated in place by schedulers)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}


class NoFusion:
    name = "none"
    gradients_in_place = True       # the averaged gradients are in p.grad after synchronize()
    updates_as_landed = False       # False: a step with a non-finite gradient can still be skipped whole
    forward_pre_hook = False        # needs the global forward pre-hook

    def place(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        """Put the averaged gradient where the update reads it: p.grad (adopted, not copied: it is
        a fresh tensor of p.grad's shape and dtype)."""
        p.grad = averaged

    def before_gradient(self, p: torch.Tensor, name: str) -> None:
        """Backward reached `p` (before its gradient is counted)."""

    def submitted(self, opt: Optimizer) -> None:
        """A compressed gradient has joined the exchange queue (from backward's hooks)."""

    def landed(self, opt: Optimizer, params: list[torch.Tensor]) -> None:
        """These exchanges have just finished, their averages placed."""

    def before_forward(self, opt: Optimizer, module: nn.Module) -> None:
        """`module` is about to run its forward."""

    def step(self, opt: Optimizer) -> None:
        opt._synchronized_gradients()
        opt._base.step(opt)

    def flush(self, opt: Optimizer) -> None:
        """Apply the pending updates."""


class BackwardFusion(NoFusion):
    name = "backward"
    updates_as_landed = True

    def submitted(self, opt: Optimizer) -> None:
        opt._update(opt._sync.progress(wait=False))

    def landed(self, opt: Optimizer, params: list[torch.Tensor]) -> None:
        opt._update(params)

    def step(self, opt: Optimizer) -> None:
        opt._synchronized_gradients()        # which applies the updates still due as their exchanges land


class ForwardFusion(NoFusion):
    name = "forward"
    gradients_in_place = False
    updates_as_landed = True
    forward_pre_hook = True

    def __init__(self) -> None:
        self.deferred: dict[torch.Tensor, dict[str, Any]] = {}    # param → hyper-parameters at step() time
        self.averaged: dict[torch.Tensor, torch.Tensor] = {}      # param → averaged gradient, once exchanged

    def place(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        self.averaged[p] = averaged        # step() hands p.grad back to the next backward

    def before_gradient(self, p: torch.Tensor, name: str) -> None:
        if p in self.deferred:
            raise UserError(f"fusion='forward': {name} was used before its module's forward ran, so it "
                            "missed its pending update (another module reads it directly); use fusion='backward'")

    def landed(self, opt: Optimizer, params: list[torch.Tensor]) -> None:
        # A forward-fused update applied before its module's forward is the same update: its
        # hyper-parameters were taken at step().
        self._apply(opt, [p for p in params if p in self.deferred])

    def before_forward(self, opt: Optimizer, module: nn.Module) -> None:
        if self.deferred:
            self._apply(opt, [p for p in module.parameters(recurse=False) if p in self.deferred])

    def step(self, opt: Optimizer) -> None:
        self.flush(opt)             # the updates this step's forward did not reach (parameters it did not use)
        opt._send_rest()
        # Snapshot the hyper-parameters now: a scheduler may change the LR before the update lands.
        exchanged = opt._sync.compressors
        self.deferred = {p: snapshot for group in opt.param_groups for snapshot in [_snapshot(group)]
                         for p in group["params"] if p in exchanged}
        for p in exchanged:
            p.grad = None           # the pending update owns the gradient; zero_grad cannot touch it

    def flush(self, opt: Optimizer) -> None:
        self._apply(opt, list(self.deferred))

    def _apply(self, opt: Optimizer, params: list[torch.Tensor]) -> None:
        """Apply the pending updates of `params` (waiting for their exchanges)."""
        if any(p not in self.averaged for p in params):
            opt._drain()                       # which applies some of them already
            params = [p for p in params if p in self.deferred]
        if not params:
            return
        hyper = {p: self.deferred.pop(p) for p in params}
        current = [p.grad for p in params]
        for p in params:
            p.grad = self.averaged.pop(p)
        try:
            opt._update(params, hyper)
        finally:
            for p, grad in zip(params, current):
                p.grad = grad


FUSIONS = {mode.name: mode for mode in (NoFusion, BackwardFusion, ForwardFusion)}


def fusion_mode(name: str, max_grad_norm: float | None) -> NoFusion:
    """The mode called `name`, checked against the other arguments."""
    if name not in tuple(FUSIONS):
        raise InvalidArgument(f"fusion={name!r}: choose 'none', 'backward' or 'forward'")
    if name != "none" and max_grad_norm is not None:
        raise InvalidArgument(f"max_grad_norm (global gradient clipping) needs every gradient before any update; "
                              f"it cannot be combined with fusion={name!r}: use fusion='none' or drop "
                              "max_grad_norm")
    return FUSIONS[name]()
