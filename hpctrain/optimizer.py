"""`DistributedOptimizer`: Horovod's optimizer wrapper, with pluggable gradient compression.

The path of one gradient, in the order the code runs it:

  backward → post-accumulate-grad hook (`_on_grad`) → policy picked the compressor at
  construction → NaN/Inf check → `compressor.exchange(grad, state)` yields a collective
  (error feedback inside: compensate → encode) → launched async through `dist`
  → `synchronize` waits, sends the results back into the exchange (decode → remember)
  → p.grad = averaged gradient → the wrapped torch optimizer's update.

Small tensors (and shapes a compressor cannot take) skip compression and ride one fused
dense allreduce at the end of backward. With `fusion="backward"` each parameter is updated
as soon as its own exchange completes, while backward continues; with `fusion="forward"`
`step()` returns at once and each update happens just before the parameter's module runs
its next forward, overlapping the remaining communication with the next step's compute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch
from torch import nn

from hpctrain import dist
from hpctrain.compression.base import Collective, Compressor, Exchange, ParamState
from hpctrain.compression.policy import Policy, as_policy
from hpctrain.errors import UserError

Fusion = Literal["none", "backward", "forward"]


class NonFiniteGradientError(UserError):
    """A gradient had NaN/Inf; raised instead of letting it into the residual memory."""


@dataclass
class StepStats:
    """What the last optimizer step sent, for the step log (bytes are this rank's)."""
    wire_bytes: int = 0
    dense_bytes: int = 0
    comm_time_s: float = 0.0
    per_param: dict[str, tuple[int, int]] = field(default_factory=dict)   # name → (wire, dense)
    local_sqnorm: float = float("nan")    # |g_local|² before compression (for the noise scale)
    global_sqnorm: float = float("nan")   # |g_averaged|² after the exchange


@dataclass
class _InFlight:
    param: torch.Tensor
    exchange: Exchange
    request: Collective
    handles: list[int]
    round: int = 0


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class (as Horovod does), so LR schedulers and
    `isinstance(opt, torch.optim.SGD)` keep working and the update maths is untouched."""

    def __init__(self, params: Any, named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
                 compression: Compressor | Policy | None, backward_passes_per_step: int,
                 fusion: Fusion, max_grad_norm: float | None):
        super(self.__class__, self).__init__(params)
        self._base = type(self).__mro__[1]
        all_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is None:
            named = [(f"param.{i}", p) for i, p in enumerate(all_params)]
        else:
            named = list(named_parameters)
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"named_parameters has duplicate names {dupes}")
        self._names = {p: n for n, p in named}
        unnamed = [p for p in all_params if p not in self._names]
        if unnamed:
            raise ValueError(f"{len(unnamed)} optimizer parameter(s) are missing from named_parameters; "
                             "pass model.named_parameters() for the same model")
        if fusion not in ("none", "backward", "forward"):
            raise ValueError(f"fusion={fusion!r}: choose 'none', 'backward' or 'forward'")
        if fusion != "none" and max_grad_norm is not None:
            raise ValueError("max_grad_norm (global gradient clipping) needs every gradient before any update; "
                             "it cannot be combined with fusion — use fusion='none'")
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        self.policy = as_policy(compression)
        self.fusion = fusion
        self.max_grad_norm = max_grad_norm
        self.backward_passes_per_step = backward_passes_per_step
        self.measure_grad_norms = False
        self.stats = StepStats()
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        trainable = [p for p in all_params if p.requires_grad]
        self._compressor = {p: self.policy.resolve(self._names[p], p) for p in trainable}
        self._states = {p: ParamState(self._names[p]) for p in trainable}
        self.compressor_names = {self._names[p]: c.name if c is not None else "dense" for p, c in self._compressor.items()}
        self._passes = {p: 0 for p in trainable}
        self._inflight: dict[torch.Tensor, _InFlight] = {}
        self._bypass: list[torch.Tensor] = []
        self._seen: set[torch.Tensor] = set()         # gradient arrived this step
        # Forward fusion: param → hyper-parameters at step() time, and its averaged gradient once exchanged.
        self._deferred: dict[torch.Tensor, dict[str, Any]] = {}
        self._averaged: dict[torch.Tensor, torch.Tensor] = {}
        self._local_sq = torch.zeros((), dtype=torch.float64)
        self._steps_done = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in trainable]
        if fusion == "forward":
            self._hooks.append(nn.modules.module.register_module_forward_pre_hook(self._before_forward))

    # -- the gradient path -------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        self._passes[p] += 1
        if self._passes[p] < self.backward_passes_per_step:
            return
        self._passes[p] = 0
        if p in self._seen:
            raise RuntimeError(f"gradient of {self._names[p]} computed twice before step(); call "
                               "optimizer.step() between backward passes, or raise backward_passes_per_step")
        self._seen.add(p)
        if p in self._deferred:          # forward fusion: last step's update must land first
            self._finish_deferred(p)
        grad = p.grad
        if self.measure_grad_norms:
            self._local_sq = self._local_sq.to(grad.device) + grad.detach().double().pow(2).sum()
        self.stats.dense_bytes += grad.numel() * 4
        compressor = self._compressor[p]
        if compressor is None:
            self._bypass.append(p)
            return
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN/Inf) in parameter {self._names[p]!r} at step {self._steps_done}; "
                "it was not fed into the residual memory — lower train.lr or check the data")
        exchange = compressor.exchange(grad, self._states[p])
        self._launch(_InFlight(p, exchange, next(exchange), []))
        if self.fusion == "backward":
            self._progress(block=False)

    def _launch(self, item: _InFlight) -> None:
        name = self._names[item.param]
        request = item.request
        launch = dist.allgather_async if request.kind == "allgather" else dist.allreduce_async
        item.handles = [launch(t, name=f"{name}.{item.round}.{i}") for i, t in enumerate(request.payloads)]
        self._count_wire(item.param, request.nbytes)
        self._inflight[item.param] = item

    def _count_wire(self, p: torch.Tensor, nbytes: int) -> None:
        self.stats.wire_bytes += nbytes
        wire, dense = self.stats.per_param.get(self._names[p], (0, p.numel() * 4))
        self.stats.per_param[self._names[p]] = (wire + nbytes, dense)

    def _progress(self, block: bool) -> None:
        """Advance every in-flight exchange whose collectives are done (all of them if `block`)."""
        h = dist.hvd()
        while self._inflight:
            ready = [item for item in self._inflight.values()
                     if block or all(h.poll(handle) for handle in item.handles)]
            if not ready:
                return
            for item in ready:
                received = [dist.synchronize(handle) for handle in item.handles]
                try:
                    item.request = item.exchange.send(received)
                except StopIteration as done:
                    del self._inflight[item.param]
                    self._finish(item.param, done.value)
                else:
                    item.round += 1
                    self._launch(item)

    def _finish(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        self._states[p].steps += 1
        if self.fusion == "forward":
            self._averaged[p] = averaged       # p.grad may be zeroed before the update lands
            return
        p.grad.copy_(averaged)
        if self.fusion == "backward":
            self._update(p, self._group_of[p])

    def _reduce_bypass(self) -> None:
        """One fused dense allreduce for small tensors, and zeros for parameters with no gradient
        this step (every rank must take part in the same collectives, as in Horovod)."""
        for p in self._compressor:
            if p not in self._seen:
                self._seen.add(p)
                p.grad = torch.zeros_like(p)
                self._bypass.append(p)
        if not self._bypass:
            return
        grads = [p.grad for p in self._bypass]
        for p in self._bypass:
            self._count_wire(p, p.grad.numel() * p.grad.element_size())
        dist.synchronize(dist.grouped_allreduce_async(grads, name="hpctrain.bypass"))
        for p in self._bypass:
            if self.fusion == "forward":
                self._averaged[p] = p.grad
            elif self.fusion == "backward":
                self._update(p, self._group_of[p])
        self._bypass = []

    def synchronize(self) -> None:
        """Wait until every gradient of this step is exchanged and written to `.grad`."""
        start = time.perf_counter()
        self._reduce_bypass()
        self._progress(block=True)
        self.stats.comm_time_s += time.perf_counter() - start
        if self.measure_grad_norms and self.fusion != "forward":
            self.stats.local_sqnorm = float(self._local_sq)
            self.stats.global_sqnorm = float(sum(p.grad.detach().double().pow(2).sum() for p in self._compressor))

    # -- the update ----------------------------------------------------------------------
    def _update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor | None = None) -> None:
        """Run the wrapped optimizer's update for one parameter, with `group`'s hyper-parameters
        (and `grad` in place of `p.grad` when given)."""
        groups, current = self.param_groups, p.grad
        self.param_groups = [dict(group, params=[p])]
        if grad is not None:
            p.grad = grad
        try:
            self._base.step(self)
        finally:
            self.param_groups, p.grad = groups, current

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._deferred:
            for p in module.parameters(recurse=False):
                if p in self._deferred:
                    self._finish_deferred(p)

    def _finish_deferred(self, p: torch.Tensor) -> None:
        if p not in self._averaged:
            self._progress(block=True)
        self._update(p, self._deferred.pop(p), self._averaged.pop(p))

    def flush(self) -> None:
        """Apply every pending (forward-fused) update now: before evaluation or a checkpoint."""
        for p in list(self._deferred):
            self._finish_deferred(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        if self.fusion == "forward":
            # Snapshot the hyper-parameters now: a scheduler may change the LR before the update lands.
            self._deferred = {p: {k: v for k, v in self._group_of[p].items() if k != "params"}
                              for p in self._compressor}
            self._reduce_bypass()
        else:
            self.synchronize()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(list(self._compressor), self.max_grad_norm)
            if self.fusion == "none":
                self._base.step(self)
        self._end_step()
        return loss

    def _end_step(self) -> None:
        self._seen.clear()
        self._local_sq = torch.zeros((), dtype=torch.float64)
        self._steps_done += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        # With forward fusion, exchanges may still read the old .grad tensors: drop, never zero, them.
        self._base.zero_grad(self, set_to_none=set_to_none or bool(self._inflight))

    def new_step_stats(self) -> StepStats:
        """Hand out the finished step's statistics and start counting the next one."""
        stats, self.stats = self.stats, StepStats()
        return stats

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self._base.state_dict(self)

    def compression_state_dict(self) -> dict[str, Any]:
        """Residual memories and compressor state, keyed by parameter name (for checkpoints)."""
        self.flush()
        return {state.name: state.state_dict() for state in self._states.values()}

    def load_compression_state_dict(self, state: dict[str, Any]) -> None:
        for p, param_state in self._states.items():
            if param_state.name in state:
                param_state.load_state_dict(state[param_state.name], p.device)

    def describe_policy(self) -> list[str]:
        """One line per parameter: which compressor it gets (printed once by rank 0)."""
        lines = []
        for p, compressor in self._compressor.items():
            what = repr(compressor) if compressor is not None else f"dense (fused bypass, numel < {self.policy.min_numel} or unsupported shape)"
            lines.append(f"{self._names[p]:<40} {str(tuple(p.shape)):<20} {what}")
        return lines

    def remove_hooks(self) -> None:
        """Detach from the model (also done when the optimizer is garbage-collected)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __del__(self) -> None:
        self.remove_hooks()


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Compressor | Policy | None = None,
                         backward_passes_per_step: int = 1,
                         fusion: Fusion = "none",
                         max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    """Wrap a torch optimizer so gradients are averaged over all ranks, compressed on the way.

    Args:
        optimizer: a constructed torch optimizer (SGD, Adam, AdamW, ...); its state is not kept.
        named_parameters: `model.named_parameters()`; names key the per-layer policy and logs.
        compression: a compressor (`hpctrain.compression.AdaComp()`, ...) or a `Policy`;
            None sends every gradient dense (fp32), exactly like `hvd.DistributedOptimizer`.
        backward_passes_per_step: local gradient accumulation steps before one exchange.
        fusion: "none", "backward" (update each parameter as soon as its gradient is reduced)
            or "forward" (update just before its module's next forward).
        max_grad_norm: clip the averaged gradient's global norm (only with fusion="none").
    """
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, fusion, max_grad_norm)
