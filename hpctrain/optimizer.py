"""`DistributedOptimizer`: Horovod's optimizer wrapper, with pluggable gradient compression.

The path of one gradient, in the order the code runs it:

  backward → post-accumulate-grad hook (`_on_grad`, on the last of `backward_passes_per_step`
  passes) → NaN/Inf check → the compressor the policy picked at construction:
  `compressor.exchange(grad, state)` yields a collective (error feedback inside: compensate →
  encode) → launched async through `dist` → `_progress` waits, sends the results back into the
  exchange (decode; what was not sent stays in the residual) → averaged gradient into p.grad → the wrapped torch optimizer's
  update (one call per parameter group, so its foreach kernels still batch the parameters).

Small tensors (and shapes a compressor cannot take) skip compression and ride one fused
dense allreduce started in `step()`, in construction order so every rank sends the same
group; a parameter without a gradient this step is exchanged as zeros, so no rank waits on a
collective another rank never starts (as in Horovod). With `fusion="backward"` the
parameters whose exchanges have completed are updated from the hooks while backward
continues, and the rest in `step()` as their exchanges land; with `fusion="forward"`
`step()` snapshots the hyper-parameters and returns, and each update happens before the
parameter's module runs its next forward (a forward pre-hook; while one waits for its
exchange, the updates of those already exchanged are applied). Both give exactly the updates
of `fusion="none"`. Pending updates are applied by `flush()` (and by `state_dict()`): call it
on every rank before evaluation or a checkpoint. A parameter read by a module that does not
own it (so that no pre-hook of its owner runs first) cannot be forward-fused; that is
detected and reported.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from hpctrain import comm
from hpctrain.compression.base import Collective, Compressor, Exchange, ParamState
from hpctrain.compression.policy import DENSE, Policy, as_policy
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


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weak(method: Callable[..., None]) -> Callable[..., None]:
    """A hook calling `method` only while its object lives: hooks on the model must not keep a
    discarded optimizer alive (and exchanging gradients); its `__del__` then removes them."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)
    return hook


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor|² as an fp32 scalar, by one BLAS dot product: 4-5× cheaper than `isfinite().all()`
    on the CPU, and non-finite whenever the tensor holds a NaN/Inf (or its squares overflow)."""
    flat = tensor.detach().reshape(-1).to(torch.float32)
    return torch.dot(flat, flat)


def _snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters now (tensor LRs are updated in place by schedulers)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class (as Horovod does), so LR schedulers and
    `isinstance(opt, torch.optim.SGD)` keep working and the update maths is untouched."""

    def __init__(self, params: Any, named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
                 compression: Compressor | Policy | None, backward_passes_per_step: int,
                 fusion: Fusion, max_grad_norm: float | None):
        self._hooks: list[Any] = []              # first: __del__ runs even if a check below fails
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
            raise UserError(f"named_parameters has duplicate names {dupes}; pass model.named_parameters()")
        self._names = {p: n for n, p in named}
        unnamed = [p for p in all_params if p not in self._names]
        if unnamed:
            raise UserError(f"{len(unnamed)} optimizer parameter(s) are missing from named_parameters; "
                            "pass model.named_parameters() for the same model")
        if fusion not in ("none", "backward", "forward"):
            raise UserError(f"fusion={fusion!r}: choose 'none', 'backward' or 'forward'")
        if fusion != "none" and max_grad_norm is not None:
            raise UserError(f"max_grad_norm (global gradient clipping) needs every gradient before any update; "
                            f"it cannot be combined with fusion={fusion!r}: use fusion='none' or drop max_grad_norm")
        if backward_passes_per_step < 1:
            raise UserError(f"backward_passes_per_step={backward_passes_per_step}: must be >= 1")
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
        self._bypass = [p for p in trainable if self._compressor[p] is None]   # same order on every rank
        self._bypass_due = False                      # some bypass gradient awaits the fused allreduce
        self._bypass_handle: int | None = None        # the fused allreduce, while in flight
        self._seen: set[torch.Tensor] = set()         # exchange started this step
        # Forward fusion: param → hyper-parameters at step() time, and its averaged gradient once exchanged.
        self._deferred: dict[torch.Tensor, dict[str, Any]] = {}
        self._averaged: dict[torch.Tensor, torch.Tensor] = {}
        self._local_sq = torch.zeros((), dtype=torch.float64)
        self._hooks = [p.register_post_accumulate_grad_hook(_weak(self._on_grad)) for p in trainable]
        if fusion == "forward":
            self._hooks.append(nn.modules.module.register_module_forward_pre_hook(_weak(self._before_forward)))

    # -- the gradient path -------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if p in self._deferred:
            raise UserError(f"fusion='forward': {self._names[p]} was used before its module's forward ran, so it "
                            "missed its pending update (another module reads it directly); use fusion='backward'")
        self._passes[p] += 1
        if self._passes[p] >= self.backward_passes_per_step:
            self._exchange(p)

    def _exchange(self, p: torch.Tensor) -> None:
        """`p.grad` is this rank's gradient for the step: check it, then start its exchange
        (small tensors wait for the fused bypass in `_exchange_rest`)."""
        self._passes[p] = 0
        if p in self._seen:
            raise UserError(f"gradient of {self._names[p]} computed twice before step(); call "
                            "optimizer.step() between backward passes, or raise backward_passes_per_step")
        self._seen.add(p)
        grad = p.grad
        sqnorm = squared_norm(grad)        # one pass; any NaN/Inf in grad makes it non-finite
        if not bool(torch.isfinite(sqnorm)) and not bool(torch.isfinite(grad).all()):
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN/Inf) in parameter {self._names[p]!r} at step {self._states[p].steps + 1}; "
                "it was not fed into the residual memory — lower train.lr or check the data")
        if self.measure_grad_norms:
            self._local_sq = self._local_sq.to(grad.device) + sqnorm.double()
        self.stats.dense_bytes += grad.numel() * 4
        compressor = self._compressor[p]
        if compressor is None:
            self._bypass_due = True
            return
        if self._states[p].steps < self.policy.warmup_steps:
            compressor = DENSE
        exchange = compressor.exchange(grad, self._states[p])
        self._launch(_InFlight(p, exchange, next(exchange), []))
        if self.fusion == "backward":
            self._update(self._progress(wait=False))

    def _launch(self, item: _InFlight) -> None:
        name = self._names[item.param]
        launch = comm.get().allgather_async if item.request.kind == "allgather" else comm.get().allreduce_async
        payloads = [comm.get().sendable(t) for t in item.request.payloads]
        item.handles = [launch(t, name=f"{name}.{item.round}.{i}") for i, t in enumerate(payloads)]
        self._count_wire(item.param, _nbytes(payloads))
        self._inflight[item.param] = item

    def _count_wire(self, p: torch.Tensor, nbytes: int) -> None:
        self.stats.wire_bytes += nbytes
        wire, dense = self.stats.per_param.get(self._names[p], (0, p.numel() * 4))
        self.stats.per_param[self._names[p]] = (wire + nbytes, dense)

    def _progress(self, wait: bool) -> list[torch.Tensor]:
        """Advance the exchanges whose collectives are done, after waiting for one if `wait`;
        returns the parameters whose averaged gradients have just been stored.

        The wait is for the oldest exchange in the lowest round: Horovod completes collectives
        about in launch order, and a rank never blocks on a later round that a peer (launching
        in another order, e.g. zeros for a parameter it did not use) has yet to start.
        """
        h = dist.hvd()
        done: list[torch.Tensor] = []
        while True:
            ready = [item for item in self._inflight.values() if all(h.poll(handle) for handle in item.handles)]
            if wait and not ready and self._inflight:
                ready = [min(self._inflight.values(), key=lambda item: item.round)]
            if self._bypass_handle is not None and (h.poll(self._bypass_handle) or (wait and not self._inflight)):
                done += self._finish_bypass()
            if not ready:
                return done
            wait = False
            for item in ready:
                received = [dist.synchronize(handle).to(sent.dtype)
                            for handle, sent in zip(item.handles, item.request.payloads)]
                try:
                    item.request = item.exchange.send(received)
                except StopIteration as finished:
                    del self._inflight[item.param]
                    self._store(item.param, finished.value)
                    done.append(item.param)
                else:
                    item.round += 1
                    self._launch(item)

    def _drain(self) -> None:
        """Wait for every exchange in flight, applying fused updates as they land, so the wait
        overlaps them with the remaining communication (a forward-fused update applied before its
        module's forward is the same update: its hyper-parameters were taken at `step()`)."""
        while self._inflight or self._bypass_handle is not None:
            done = self._progress(wait=True)
            if self.fusion == "backward":
                self._update(done)
            elif self.fusion == "forward":
                self._apply_deferred([p for p in done if p in self._deferred])

    def _store(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        """Put the averaged gradient where the update reads it: p.grad (adopted, not copied: it is
        a fresh tensor of p.grad's shape and dtype), or aside for forward fusion."""
        self._states[p].steps += 1
        if self.fusion == "forward":
            self._averaged[p] = averaged       # step() hands p.grad back to the next backward
        else:
            p.grad = averaged

    def _exchange_rest(self) -> None:
        """Start what backward did not: exchanges of zeros for parameters with no gradient this
        step (a partial accumulation as it is), and the small tensors' fused dense allreduce."""
        for p in self._compressor:
            if p not in self._seen:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._exchange(p)
        if self._bypass_due:
            self._bypass_due = False
            sent = [comm.get().sendable(p.grad) for p in self._bypass]
            for p, tensor in zip(self._bypass, sent):
                self._count_wire(p, _nbytes([tensor]))
            name = f"{self._names[self._bypass[0]]}.bypass"      # unique as long as parameter names are
            self._bypass_handle = comm.get().grouped_allreduce_async(sent, name=name)

    def _finish_bypass(self) -> list[torch.Tensor]:
        averaged = dist.synchronize(self._bypass_handle)
        self._bypass_handle = None
        for p, tensor in zip(self._bypass, averaged):
            self._store(p, tensor.to(p.dtype))
        return list(self._bypass)

    def synchronize(self) -> None:
        """Wait until every gradient of this step is exchanged and stored (with backward fusion,
        also apply the updates still due: `comm_time_s` then includes them)."""
        start = time.perf_counter()
        self._exchange_rest()
        self._drain()
        self.stats.comm_time_s += time.perf_counter() - start
        if self.measure_grad_norms and self.fusion != "forward":
            self.stats.local_sqnorm = float(self._local_sq)
            self.stats.global_sqnorm = float(sum(squared_norm(p.grad).double() for p in self._compressor))

    # -- the update ----------------------------------------------------------------------
    def _update(self, params: list[torch.Tensor], hyper: dict[torch.Tensor, dict[str, Any]] | None = None) -> None:
        """Run the wrapped optimizer's update on just `params`, one call per parameter group (so
        foreach kernels still batch them), with the groups' hyper-parameters or `hyper`'s snapshots."""
        if not params:
            return
        hyper = hyper or self._group_of
        groups: dict[int, tuple[dict[str, Any], list[torch.Tensor]]] = {}
        for p in params:
            groups.setdefault(id(hyper[p]), (hyper[p], []))[1].append(p)
        saved = self.param_groups
        self.param_groups = [dict(group, params=ps) for group, ps in groups.values()]
        try:
            self._base.step(self)
        finally:
            self.param_groups = saved

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._deferred:
            self._apply_deferred([p for p in module.parameters(recurse=False) if p in self._deferred])

    def _apply_deferred(self, params: list[torch.Tensor]) -> None:
        """Forward fusion: apply the pending updates of `params` (waiting for their exchanges)."""
        if any(p not in self._averaged for p in params):
            self._drain()                      # which applies some of them already
            params = [p for p in params if p in self._deferred]
        if not params:
            return
        hyper = {p: self._deferred.pop(p) for p in params}
        current = [p.grad for p in params]
        for p in params:
            p.grad = self._averaged.pop(p)
        try:
            self._update(params, hyper)
        finally:
            for p, grad in zip(params, current):
                p.grad = grad

    def flush(self) -> None:
        """Apply every pending (forward-fused) update now: on every rank, before evaluation or a checkpoint."""
        self._apply_deferred(list(self._deferred))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fusion == "forward":
            self.flush()            # the updates this step's forward did not reach (parameters it did not use)
            self._exchange_rest()
            # Snapshot the hyper-parameters now: a scheduler may change the LR before the update lands.
            self._deferred = {p: snapshot for group in self.param_groups for snapshot in [_snapshot(group)]
                              for p in group["params"] if p in self._compressor}
            for p in self._compressor:
                p.grad = None       # the pending update owns the gradient; zero_grad cannot touch it
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base.load_state_dict(self, state_dict)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}   # the groups are new dicts

    def load_compression_state_dict(self, state: dict[str, Any]) -> None:
        for p, param_state in self._states.items():
            if param_state.name in state:
                param_state.load_state_dict(state[param_state.name], p.device)

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
        named_parameters: `model.named_parameters()`; names key the per-layer policy and logs, and
            the collectives (as in Horovod: two optimizers whose exchanges may be in flight at
            once, e.g. with forward fusion, need distinct names, say with a prefix).
        compression: a compressor (`hpctrain.compression.AdaComp()`, ...) or a `Policy`;
            None sends every gradient dense (fp32), exactly like `hvd.DistributedOptimizer`.
        backward_passes_per_step: local gradient accumulation steps before one exchange.
        fusion: "none", "backward" (update each parameter as soon as its gradient is reduced)
            or "forward" (update just before its module's next forward; call `flush()` on
            every rank before reading or saving the parameters). Both are exact: the same
            updates as "none", with the hyper-parameters each had at `step()`.
        max_grad_norm: clip the averaged gradient's global norm (only with fusion="none").
    """
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, fusion, max_grad_norm)
