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

import contextlib
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from hpctrain import comm
from hpctrain.compression.base import Collective, Compressor, Exchange, ParamState
from hpctrain.compression.policy import DENSE, Policy, as_policy
from hpctrain.errors import InvalidArgument, PeerFailure, UserError

Fusion = Literal["none", "backward", "forward"]
# Horovod's reduction constants (hvd.Average, hvd.Sum, ...: the same ints since 0.21) and hpctrain's names.
_HOROVOD_OPS = {0: "average", 1: "sum", 2: "adasum", 3: "min", 4: "max", 5: "product"}


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
    works: list[Work]          # empty while the next round waits for its turn to launch
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
    on the CPU, and non-finite whenever the tensor holds a NaN/Inf (or its squares overflow).
    A sparse tensor's is that of its (coalesced) values."""
    if tensor.is_sparse:
        tensor = tensor.coalesce().values()
    flat = tensor.detach().reshape(-1).to(torch.float32)
    return torch.dot(flat, flat)


def _zeros_like(p: torch.Tensor, sparse_dim: int | None, dense: bool) -> torch.Tensor:
    """The gradient of a parameter this rank did not use: zeros, sparse (no rows) if its gradients are."""
    if sparse_dim is None or dense:
        return torch.zeros_like(p)
    return torch.sparse_coo_tensor(torch.empty((sparse_dim, 0), dtype=torch.int64, device=p.device),
                                   p.new_empty((0, *p.shape[sparse_dim:])), p.shape, check_invariants=False)


def _reduce_op(op: Any) -> str:
    """'average' or 'sum', from Horovod's constants (hvd.Average, hvd.Sum) or hpctrain's names."""
    name = _HOROVOD_OPS.get(op) if isinstance(op, int) and not isinstance(op, bool) else \
        op.lower() if isinstance(op, str) else None
    if name == "adasum":
        raise InvalidArgument("op=Adasum is not supported by hpctrain.DistributedOptimizer (its compressors average); "
                              "use op=hvd.Average or hvd.Sum, or Horovod's own optimizer for Adasum")
    if name not in ("average", "sum"):
        raise InvalidArgument(f"op={op!r}: choose hvd.Average / 'average' or hvd.Sum / 'sum'")
    return name


def _check_groups(groups: Any, params: list[torch.Tensor]) -> None:
    """Horovod's `groups`: None, a positive int, or lists of this optimizer's parameters, each once."""
    if groups is None:
        return
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1:
            raise InvalidArgument(f"groups={groups}: must be a positive integer or a list of lists of parameters")
        return
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
        raise InvalidArgument("groups must be a positive integer or a list of lists of parameters")
    ids = {id(p) for p in params}
    seen: set[int] = set()
    for tensor in (t for g in groups for t in g):
        if not isinstance(tensor, torch.Tensor) or id(tensor) not in ids:
            raise InvalidArgument("groups must consist of parameters of the wrapped optimizer")
        if id(tensor) in seen:
            raise InvalidArgument("a parameter can only appear once in groups")
        seen.add(id(tensor))


def _snapshot(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters now (tensor LRs are updated in place by schedulers)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class (as Horovod does), so LR schedulers and
    `isinstance(opt, torch.optim.SGD)` keep working and the update maths is untouched."""

    def __init__(self, params: Any, named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
                 compression: Compressor | Policy | None, backward_passes_per_step: int,
                 fusion: Fusion, max_grad_norm: float | None, op: Any = "average",
                 gradient_predivide_factor: float = 1.0, groups: Any = None, sparse_as_dense: bool = False,
                 process_set: Any = None):
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
            raise InvalidArgument(f"named_parameters has duplicate names {dupes}; pass model.named_parameters()")
        self._names = {p: n for n, p in named}
        unnamed = [p for p in all_params if p not in self._names]
        if unnamed:
            raise InvalidArgument(f"{len(unnamed)} optimizer parameter(s) are missing from named_parameters; "
                                  "pass model.named_parameters() for the same model")
        if fusion not in ("none", "backward", "forward"):
            raise InvalidArgument(f"fusion={fusion!r}: choose 'none', 'backward' or 'forward'")
        if fusion != "none" and max_grad_norm is not None:
            raise InvalidArgument(f"max_grad_norm (global gradient clipping) needs every gradient before any update; "
                                  f"it cannot be combined with fusion={fusion!r}: use fusion='none' or drop "
                                  "max_grad_norm")
        if backward_passes_per_step < 1:
            raise InvalidArgument(f"backward_passes_per_step={backward_passes_per_step}: must be >= 1")
        self.op = _reduce_op(op)
        if not gradient_predivide_factor > 0:
            raise InvalidArgument(f"gradient_predivide_factor={gradient_predivide_factor}: must be > 0")
        if gradient_predivide_factor != 1.0 and self.op != "average":
            raise InvalidArgument("gradient_predivide_factor is only supported with op=Average (as in Horovod)")
        _check_groups(groups, all_params)
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.groups = groups                        # accepted for Horovod compatibility; see DistributedOptimizer
        self.sparse_as_dense = bool(sparse_as_dense)
        self._comm = comm.get()
        # The ranks gradients are reduced over: a Horovod ProcessSet or a torch.distributed group (None: all).
        self.process_set = process_set
        self._members = self._comm.group_ranks(process_set)
        self._group_kw = {} if process_set is None else {"group": process_set}
        self._n = len(self._members)                 # ranks in the set
        self._me = self._members.index(self._comm.rank)
        # Horovod's scaling: 1/f before the sum, f/n after (an Average); a Sum is the average times n.
        self._prescale = 1.0 / self.gradient_predivide_factor
        self._postscale = self.gradient_predivide_factor * (self._n if self.op == "sum" else 1)
        self._sparse_dim: dict[torch.Tensor, int] = {}     # parameters whose gradients come sparse
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
        self._trainable = trainable
        self._index = {p: i for i, p in enumerate(trainable)}
        # Exchanges start in this fixed order on every rank (backward's usual order), whatever
        # order the hooks fire in: torch.distributed matches collectives by order.
        self._launch_order = [p for p in reversed(trainable) if self._compressor[p] is not None]
        self._launched = 0                            # how many of _launch_order have started this step
        self._ready: dict[torch.Tensor, torch.Tensor] = {}      # checked gradients awaiting their turn
        self._inflight: dict[torch.Tensor, _InFlight] = {}      # in launch order: the queue rounds advance in
        self._bypass = [p for p in trainable if self._compressor[p] is None]   # same order on every rank
        self._bypass_work: Work | None = None        # the fused allreduce of small tensors and the step's flags
        self._seen: set[torch.Tensor] = set()         # exchange started this step
        self._exchanged = 0                           # steps whose exchange has completed
        # Non-finite gradients: this rank's first offender (index + 1, 0 if none), kept on the
        # gradients' device and sent with the bypass, so no rank waits on a host sync per parameter.
        self._first_bad: torch.Tensor | None = None
        self._overflow: str | None = None            # who overflowed in the last exchange, if anyone
        self._synchronized = False                    # this step's gradients are exchanged and stored
        self._skip_synchronize = False
        # Forward fusion: param → hyper-parameters at step() time, and its averaged gradient once exchanged.
        self._deferred: dict[torch.Tensor, dict[str, Any]] = {}
        self._averaged: dict[torch.Tensor, torch.Tensor] = {}
        self._local_sq: torch.Tensor | float = 0.0
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
        """`p.grad` is this rank's gradient for the step: note whether it is finite, then start
        its exchange when its turn comes (small tensors wait for the fused bypass)."""
        self._passes[p] = 0
        self._synchronized = False
        if p in self._seen:
            raise UserError(f"gradient of {self._names[p]} computed twice before step(); call "
                            "optimizer.step() between backward passes, or raise backward_passes_per_step")
        self._seen.add(p)
        grad = p.grad
        if grad.is_sparse:                 # nn.Embedding(sparse=True): coalesced, as SparseAdam reads it
            grad = grad.coalesce()
            self._sparse_dim[p] = grad.sparse_dim()
            if self.sparse_as_dense or self._compressor[p] is None:    # sent dense, made sparse again after
                grad = grad.to_dense()
            p.grad = grad
        sqnorm = squared_norm(grad)        # one pass; any NaN/Inf in grad makes it non-finite
        finite = torch.isfinite(sqnorm)
        bad = torch.where(finite, 0, self._index[p] + 1).to(torch.float32)
        self._first_bad = bad if self._first_bad is None else torch.where(self._first_bad > 0, self._first_bad, bad)
        if self.measure_grad_norms:
            self._local_sq = self._local_sq + sqnorm.double()
        self.stats.dense_bytes += grad.numel() * 4
        compressor = self._compressor[p]
        if compressor is None:
            return
        if compressor.error_feedback and not grad.is_sparse:   # a non-finite gradient must not enter the residual
            grad = torch.where(finite, grad, 0) if grad.is_cuda else grad if bool(finite) else torch.zeros_like(grad)
        self._ready[p] = grad
        self._launch_ready()
        if self.fusion == "backward":
            self._update(self._progress(wait=False))

    def _launch_ready(self) -> None:
        """Start the exchanges whose turn has come: a prefix of the fixed launch order."""
        while self._launched < len(self._launch_order) and self._launch_order[self._launched] in self._ready:
            p = self._launch_order[self._launched]
            self._launched += 1
            exchange = self._start_exchange(p, self._ready.pop(p))
            self._launch(_InFlight(p, exchange, next(exchange), []))

    def _start_exchange(self, p: torch.Tensor, grad: torch.Tensor) -> Exchange:
        """The exchange of one gradient: its compressor's (dense during warm-up), scaled for `op`
        and `gradient_predivide_factor`; a sparse gradient's indices and values are allgathered."""
        if grad.is_sparse:
            return self._sparse_exchange(grad)
        compressor = self._compressor[p]
        if self._states[p].steps < self.policy.warmup_steps:
            compressor = DENSE
        if self._prescale != 1.0:
            grad = grad * self._prescale
        exchange = compressor.exchange(grad, self._states[p])
        if self._postscale == 1.0 and p not in self._sparse_dim:
            return exchange
        return self._finish_exchange(p, exchange)

    def _finish_exchange(self, p: torch.Tensor, exchange: Exchange) -> Exchange:
        averaged = yield from exchange
        if self._postscale != 1.0:
            averaged = averaged * self._postscale
        return self._resparsify(p, averaged)

    def _resparsify(self, p: torch.Tensor, averaged: torch.Tensor) -> torch.Tensor:
        """A gradient that came sparse and was sent dense goes back sparse (SparseAdam needs it)."""
        return averaged.to_sparse(self._sparse_dim[p]) if p in self._sparse_dim else averaged

    def _sparse_exchange(self, grad: torch.Tensor) -> Exchange:
        """As Horovod: allgather every rank's (index, value) rows, then the averaged (or summed)
        sparse gradient, coalesced (the same on every rank: the gather is in rank order)."""
        indices, values = yield Collective("allgather", [grad.indices().t().contiguous(), grad.values()])
        scale = 1.0 / self._n if self.op == "average" else 1.0
        return torch.sparse_coo_tensor(indices.t(), values * scale, grad.shape, check_invariants=True).coalesce()

    def _launch(self, item: _InFlight) -> None:
        name = self._names[item.param]
        launch = self._comm.allgather_async if item.request.kind == "allgather" else self._comm.allreduce_async
        payloads = [self._comm.sendable(t) for t in item.request.payloads]
        item.works = [launch(t, name=f"{name}.{item.round}.{i}", **self._group_kw) for i, t in enumerate(payloads)]
        self._count_wire(item.param, _nbytes(payloads))
        self._inflight[item.param] = item          # to the back of the queue

    def _count_wire(self, p: torch.Tensor, nbytes: int) -> None:
        self.stats.wire_bytes += nbytes
        wire, dense = self.stats.per_param.get(self._names[p], (0, p.numel() * 4))
        self.stats.per_param[self._names[p]] = (wire + nbytes, dense)

    def _receive(self, item: _InFlight) -> bool:
        """Hand a completed round's results to the exchange; True when it has finished (the
        averaged gradient stored), else its next round waits in `item.request` to be launched."""
        received = [work.wait().to(sent.dtype) for work, sent in zip(item.works, item.request.payloads)]
        item.works = []
        try:
            item.request = item.exchange.send(received)
        except StopIteration as finished:
            self._store(item.param, finished.value)
            return True
        item.round += 1
        return False

    def _progress(self, wait: bool) -> list[torch.Tensor]:
        """Take in the collectives that have completed; with `wait`, also advance the queue's head
        (waiting for it and launching its next round). Returns the parameters whose averaged
        gradients have just been stored.

        Next rounds are launched only from the head of the queue, in launch order, so every rank
        starts them in the same order whatever its timing.
        """
        done: list[torch.Tensor] = []
        for item in list(self._inflight.values()):
            if item.works and all(work.done() for work in item.works) and self._receive(item):
                del self._inflight[item.param]
                done.append(item.param)
        if self._bypass_work is not None and (self._bypass_work.done() or (wait and not self._inflight)):
            done += self._finish_bypass()
        if wait and self._inflight:
            head = self._inflight.pop(next(iter(self._inflight)))
            if head.works and self._receive(head):
                done.append(head.param)
            else:
                self._launch(head)
        return done

    def _drain(self) -> None:
        """Wait for every exchange in flight, applying fused updates as they land, so the wait
        overlaps them with the remaining communication (a forward-fused update applied before its
        module's forward is the same update: its hyper-parameters were taken at `step()`)."""
        while self._inflight or self._bypass_work is not None:
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
        step (a partial accumulation as it is), then one fused dense allreduce of the small
        tensors and of every rank's non-finite flag."""
        if not self._compressor:
            return
        for p in self._compressor:
            if p not in self._seen:
                if p.grad is None:
                    dense = self.sparse_as_dense or self._compressor[p] is None      # the bypass is dense
                    p.grad = _zeros_like(p, self._sparse_dim.get(p), dense)
                self._exchange(p)
        flags = torch.zeros(self._n, dtype=torch.float32, device=self._first_bad.device)
        flags[self._me] = self._first_bad
        scale = self._prescale
        sent = [self._comm.sendable(p.grad if scale == 1.0 else p.grad * scale) for p in self._bypass]
        for p, tensor in zip(self._bypass, sent):
            self._count_wire(p, _nbytes([tensor]))
        name = f"{self._names[next(iter(self._compressor))]}.bypass"      # unique as long as parameter names are
        self._bypass_work = self._comm.grouped_allreduce_async(sent + [flags], name=name, average=False,
                                                               **self._group_kw)
        self._seen.clear()               # from here on, a gradient belongs to the next step
        self._launched = 0
        self._first_bad = None

    def _finish_bypass(self) -> list[torch.Tensor]:
        """Store the small tensors' averages and learn who, if anyone, had a non-finite gradient:
        then every rank sees Inf in its gradients, as the GradScaler of mixed precision expects."""
        *summed, flags = self._bypass_work.wait()
        self._bypass_work = None
        scale = self.gradient_predivide_factor / self._n if self.op == "average" else 1.0   # of the sum
        for p, tensor in zip(self._bypass, summed):
            self._store(p, self._resparsify(p, tensor.mul_(scale).to(p.dtype)))
        self._exchanged += 1
        self._overflow = None
        offenders = [(self._members[i], round(index) - 1) for i, index in enumerate(flags.tolist()) if index > 0]
        if offenders:
            rank, index = offenders[0]
            self._overflow = (f"[rank {rank}] non-finite gradient (NaN/Inf) in parameter "
                              f"{self._names[self._trainable[index]]!r} at step {self._exchanged}")
            if self.fusion != "none":   # updates are applied as gradients land: nothing can skip them
                self._raise_overflow()
            while self._inflight:       # Horovod may finish the bypass first: let every gradient land, then fill
                self._progress(wait=True)
            for p in self._compressor:
                if p.grad.is_sparse:
                    grad = p.grad
                    p.grad = torch.sparse_coo_tensor(grad.indices(), torch.full_like(grad.values(), float("inf")),
                                                     grad.shape, check_invariants=False).coalesce()
                else:
                    p.grad.fill_(float("inf"))
        return list(self._bypass)

    def _raise_overflow(self) -> None:
        """A non-finite gradient reached an update (no GradScaler skipped it): stop, in one line
        printed by the rank it happened on."""
        message = self._overflow + "; it was not fed into the residual memory — lower train.lr or check the data"
        if message.startswith(f"[rank {self._comm.rank}] "):
            raise NonFiniteGradientError(message.split("] ", 1)[1])
        raise PeerFailure(message)

    def synchronize(self) -> None:
        """Wait until every gradient of this step is exchanged and stored (with backward fusion,
        also apply the updates still due: `comm_time_s` then includes them). Then the gradients
        are the averaged ones, for clipping or a GradScaler's `unscale_` before `step()` (inside
        `skip_synchronize()`); Inf everywhere if any rank's gradient was non-finite."""
        if self._synchronized:
            return
        start = time.perf_counter()
        self._exchange_rest()
        self._drain()
        self.stats.comm_time_s += time.perf_counter() - start
        if self.measure_grad_norms and self.fusion != "forward":
            self.stats.local_sqnorm = float(self._local_sq)
            self.stats.global_sqnorm = float(sum(squared_norm(p.grad).double() for p in self._compressor))
        self._local_sq = 0.0
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """`step()` inside this context does not synchronize: for the recipes that call
        `synchronize()` themselves (gradient clipping, `GradScaler.unscale_`), as in Horovod."""
        self._skip_synchronize = True
        try:
            yield
        finally:
            self._skip_synchronize = False

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Accumulate `passes` local backward passes per exchange from the next one on."""
        if passes < 1:
            raise InvalidArgument(f"backward_passes_per_step={passes}: must be >= 1")
        self.backward_passes_per_step = passes
        self._passes = dict.fromkeys(self._passes, 0)

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
            if not self._skip_synchronize:
                if self._synchronized:
                    warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                                  "optimizer.synchronize(); wrap step() in `with optimizer.skip_synchronize():`",
                                  stacklevel=2)
                self.synchronize()
            if self._overflow is not None:
                self._raise_overflow()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(list(self._compressor), self.max_grad_norm)
            if self.fusion == "none":
                self._base.step(self)
        self._synchronized = False
        return loss

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
                         op: Any = "average",
                         gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0,
                         groups: Any = None,
                         sparse_as_dense: bool = False,
                         process_set: Any = None,
                         *,
                         fusion: Fusion = "none",
                         max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    """Wrap a torch optimizer so gradients are averaged over all ranks, compressed on the way.

    A drop-in for `hvd.DistributedOptimizer`: the same positional arguments, on either engine
    (docs/horovod.md lists what each does here). Argument errors are `ValueError`s.

    Args:
        optimizer: a constructed torch optimizer (SGD, Adam, AdamW, SparseAdam, ...); its state is not kept.
        named_parameters: `model.named_parameters()`; names key the per-layer policy and logs, and
            the collectives (as in Horovod: two optimizers whose exchanges may be in flight at
            once, e.g. with forward fusion, need distinct names, say with a prefix).
        compression: a compressor (`hpctrain.compression.AdaComp()`, ...) or a `Policy`;
            None sends every gradient dense (fp32), exactly like `hvd.DistributedOptimizer`.
            Horovod's `hvd.Compression.none` / `hvd.Compression.fp16` are accepted too.
        backward_passes_per_step: local gradient accumulation steps before one exchange.
        op: `hvd.Average` / "average" (the default) or `hvd.Sum` / "sum". `hvd.Adasum` is refused.
        gradient_predivide_factor: with op=Average, gradients are scaled by 1/f before the sum and
            by f/size after (Horovod's semantics: the same average, less risk of fp16 overflow).
        num_groups, groups: Horovod's explicit grouping of allreduces (an int, or lists of
            parameters). Accepted and checked, but hpctrain does its own grouping: every tensor
            below the policy's `min_numel` rides one fused allreduce started in `step()`, and the
            larger ones leave one by one as backward produces them (fused further by Horovod's
            own tensor fusion on the Horovod engine), so a grouping adds nothing.
        sparse_as_dense: send sparse gradients (`nn.Embedding(sparse=True)`) dense, and make the
            averaged gradient sparse again for the update (as Horovod). Otherwise their rows are
            allgathered and averaged (also as Horovod); compression does not apply to them.
        process_set: reduce over these ranks only: a Horovod `ProcessSet` (registered with
            `hvd.init(process_sets=...)` or `hvd.add_process_set`) on the Horovod engine, a
            `torch.distributed.new_group(ranks)` on the torch engine; None: every rank.
        fusion: "none", "backward" (update each parameter as soon as its gradient is reduced)
            or "forward" (update just before its module's next forward; call `flush()` on
            every rank before reading or saving the parameters). Both are exact: the same
            updates as "none", with the hyper-parameters each had at `step()`.
        max_grad_norm: clip the averaged gradient's global norm (only with fusion="none").
    """
    if num_groups:
        warnings.warn("num_groups is deprecated (as in Horovod): use groups", DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    compression = _from_horovod_compression(compression)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, fusion,
                  max_grad_norm, op, gradient_predivide_factor, groups, sparse_as_dense, process_set)
    # hvd.broadcast_optimizer_state(opt) creates the state of an optimizer with none by calling
    # opt.step() — which would start collectives the root never joins (a hang) — unless
    # opt.__module__ is Horovod's optimizer module; then it calls the wrapped class's step() (a
    # local update from zero gradients), as for Horovod's own optimizer. The instance attribute
    # changes only what that check sees (the class, its repr and pickling keep hpctrain's module).
    wrapped.__module__ = "horovod.torch.optimizer"
    return wrapped


def _from_horovod_compression(compression: Any) -> Any:
    """Horovod's `hvd.Compression.none` / `.fp16` (classes) → hpctrain's equivalents."""
    if getattr(compression, "__module__", None) != "horovod.torch.compression":
        return compression
    name = getattr(compression, "__name__", type(compression).__name__)
    if name == "NoneCompressor":
        return None
    if name == "FP16Compressor":
        from hpctrain.compression import FP16
        return FP16()
    raise InvalidArgument(f"compression={compression!r}: of Horovod's compressors only Compression.none and "
                          "Compression.fp16 are understood; use an hpctrain.compression compressor")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Give every rank the root's optimizer state and hyper-parameters (after loading a checkpoint
    on the root only), on either engine: the root's `state_dict()` (on the CPU) is broadcast as one
    object and loaded by the others. Call it on every rank. Unlike `hvd.broadcast_optimizer_state`
    it runs no update to create missing state, and works for any optimizer, LBFGS included.
    Compression state (residuals) stays per rank: see `compression_state_dict`."""
    communicator = comm.get()
    flush = getattr(optimizer, "flush", None)
    if flush is not None:
        flush()                     # pending forward-fused updates first, on every rank
    state = _to_cpu(optimizer.state_dict()) if communicator.rank == root_rank else None
    state = communicator.broadcast_object(state, root=root_rank, name="hpctrain.broadcast_optimizer_state")
    if communicator.rank != root_rank:
        optimizer.load_state_dict(state)
