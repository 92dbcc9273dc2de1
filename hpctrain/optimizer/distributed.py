"""`DistributedOptimizer`: the thin layer between the model's hooks, the exchange and the update.

`DistributedOptimizer(...)` (the factory) mixes `_DistributedOptimizer` into the user's optimizer
class, as Horovod does; construction checks every argument (Horovod's in `reduction`), picks the
fusion mode once (`fusion`) and builds the `GradientSync` that carries the gradients. From then
on the class only routes: backward's post-accumulate-grad hook (`_on_grad`, on the last of
`backward_passes_per_step` passes) → `GradientSync.submit` → the fusion mode's `submitted` /
`landed` / `step` / `flush` → `_update`, the wrapped optimizer's update on a subset of parameters.
"""
from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hpctrain import comm
from hpctrain.compression.base import Compressor, ParamState
from hpctrain.compression.dense import FP16
from hpctrain.compression.policy import Policy, as_policy
from hpctrain.errors import InvalidArgument
from hpctrain.optimizer.fusion import Fusion, fusion_mode
from hpctrain.optimizer.reduction import Reduction, check_groups, check_predivide, reduce_op
from hpctrain.optimizer.sync import GradientObserver, GradientSync, StepStats


def _weak(method: Callable[..., None]) -> Callable[..., None]:
    """A hook calling `method` only while its object lives: hooks on the model must not keep a
    discarded optimizer alive (and exchanging gradients); its `__del__` then removes them."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)
    return hook


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
        # -- the arguments, checked before any communication
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._names = _check_names(named_parameters, all_params)
        self._fusion = fusion_mode(fusion, max_grad_norm)
        if backward_passes_per_step < 1:
            raise InvalidArgument(f"backward_passes_per_step={backward_passes_per_step}: must be >= 1")
        self.op = reduce_op(op)
        self.gradient_predivide_factor = check_predivide(gradient_predivide_factor, self.op)
        check_groups(groups, all_params)
        self.groups = groups                        # accepted for Horovod compatibility; see DistributedOptimizer
        self.sparse_as_dense = bool(sparse_as_dense)
        self.process_set = process_set              # a Horovod ProcessSet or a torch.distributed group (None: all)
        communicator = comm.get()
        reduction = Reduction.of(communicator, self.op, self.gradient_predivide_factor, process_set)
        self.policy = as_policy(compression)
        self.fusion = fusion
        self.max_grad_norm = max_grad_norm
        self.backward_passes_per_step = backward_passes_per_step
        # -- the gradients' way: hooks → sync (queue, bypass, flags) → the fusion mode → _update
        trainable = [p for p in all_params if p.requires_grad]
        self._sync = GradientSync(trainable, self._names, self.policy, reduction, communicator, self.sparse_as_dense,
                                  place=self._fusion.place, stop_on_overflow=self._fusion.updates_as_landed)
        self.compressor_names = self._compressor_names()
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._passes = {p: 0 for p in trainable}
        self._synchronized = False                    # this step's gradients are exchanged and stored
        self._skip_synchronize = False
        self._hooks = [p.register_post_accumulate_grad_hook(_weak(self._on_grad)) for p in trainable]
        if self._fusion.forward_pre_hook:
            self._hooks.append(nn.modules.module.register_module_forward_pre_hook(_weak(self._before_forward)))

    # -- what the rest of hpctrain reads ----------------------------------------------------
    @property
    def stats(self) -> StepStats:
        """This step's statistics so far (see `new_step_stats`)."""
        return self._sync.stats

    @property
    def _states(self) -> dict[torch.Tensor, ParamState]:
        """Each trainable parameter's compression state (residual, compressor memory, exchanges done)."""
        return self._sync.states

    @property
    def _compressor(self) -> dict[torch.Tensor, Compressor | None]:
        """Each trainable parameter's compressor (None: the bypass)."""
        return self._sync.compressors

    # -- the gradient path -------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        self._fusion.before_gradient(p, self._names[p])
        self._passes[p] += 1
        if self._passes[p] >= self.backward_passes_per_step:
            self._gradient_ready(p)

    def _gradient_ready(self, p: torch.Tensor) -> None:
        """`p.grad` is this rank's gradient for the step: hand it to the exchange."""
        self._passes[p] = 0
        self._synchronized = False
        if self._sync.submit(p):
            self._fusion.submitted(self)

    def _send_rest(self) -> None:
        """Send what backward did not: zeros for parameters with no gradient this step, then the bypass."""
        for p in self._sync.unsent():
            self._gradient_ready(p)
        self._sync.launch_bypass()

    def _drain(self) -> None:
        """Wait for every exchange in flight; the fusion mode applies updates as they land."""
        self._sync.drain(lambda params: self._fusion.landed(self, params))

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self._fusion.before_forward(self, module)

    def synchronize(self) -> None:
        """Wait until every gradient of this step is exchanged and stored (with backward fusion,
        also apply the updates still due: `comm_time_s` then includes them). Then the gradients
        are the averaged ones, for clipping or a GradScaler's `unscale_` before `step()` (inside
        `skip_synchronize()`); Inf everywhere if any rank's gradient was non-finite."""
        if self._synchronized:
            return
        start = time.perf_counter()
        self._send_rest()
        self._drain()
        self.stats.comm_time_s += time.perf_counter() - start
        if self._fusion.gradients_in_place:
            params = list(self._sync.compressors)
            for observer in list(self._sync.observers.values()):
                observer.after_exchange(params)
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

    def set_compressors(self, chosen: dict[str, Compressor | None]) -> None:
        """From the next step on, send each named parameter with its compressor; call between
        steps (`compression = "auto"` does, see hpctrain/compression/auto.py). None, or a
        compressor that does not take the shape, puts the parameter on the fused bypass (dense fp32
        in the one allreduce after backward, as the policy does); `NoCompression()` sends it dense
        fp32 as soon as its gradient is ready. Residuals of parameters whose compressor changes are
        not lost (`GradientSync.set_compressors`). Parameters below the policy's `min_numel` stay
        on the bypass (an error to change)."""
        self._sync.set_compressors(chosen)
        self.compressor_names = self._compressor_names()

    def _compressor_names(self) -> dict[str, str]:
        """Each trainable parameter's compressor by name ("dense": the bypass)."""
        return {self._names[p]: c.name if c is not None else "dense" for p, c in self._sync.compressors.items()}

    def set_hierarchical(self, on: bool) -> None:
        """From the next step on, run the one-round allgather compressors hierarchically on a
        multi-node layout (or flat again); a collective the first time it is turned on, so every
        rank calls it between the same steps (`compression = "auto"` does)."""
        self._sync.set_hierarchical(on)

    @property
    def hierarchical(self) -> bool:
        """Whether allgather compressors run hierarchically now (a multi-node layout and on)."""
        return self._sync.nodes is not None

    def register_gradient_observer(self, observer: GradientObserver) -> RemovableHandle:
        """Show `observer` every step's gradients before and after the exchange (see
        `GradientObserver`); `handle.remove()` stops it."""
        handle = RemovableHandle(self._sync.observers)
        self._sync.observers[handle.id] = observer
        return handle

    # -- the update ------------------------------------------------------------------------
    def _synchronized_gradients(self) -> None:
        """Before a non-deferred update: the averaged gradients in place, checked and clipped."""
        if not self._skip_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                              "optimizer.synchronize(); wrap step() in `with optimizer.skip_synchronize():`",
                              stacklevel=4)
            self.synchronize()
        if self._sync.flags.overflow is not None:
            self._sync.flags.raise_overflow()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(list(self._sync.compressors), self.max_grad_norm)

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

    def flush(self) -> None:
        """Apply every pending (forward-fused) update now: on every rank, before evaluation or a checkpoint."""
        self._fusion.flush(self)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fusion.step(self)
        self._synchronized = False
        return loss

    def new_step_stats(self) -> StepStats:
        """Hand out the finished step's statistics and start counting the next one."""
        stats, self._sync.stats = self._sync.stats, StepStats()
        return stats

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self._base.state_dict(self)

    def compression_state_dict(self) -> dict[str, Any]:
        """Residual memories and compressor state, keyed by parameter name (for checkpoints)."""
        self.flush()
        return {state.name: state.state_dict() for state in self._sync.states.values()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base.load_state_dict(self, state_dict)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}   # the groups are new dicts

    def load_compression_state_dict(self, state: dict[str, Any]) -> None:
        for p, param_state in self._sync.states.items():
            if param_state.name in state:
                param_state.load_state_dict(state[param_state.name], p.device)

    def remove_hooks(self) -> None:
        """Detach from the model (also done when the optimizer is garbage-collected)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __del__(self) -> None:
        self.remove_hooks()


class CompressionState:
    """One rank's compression state of a `DistributedOptimizer` (residuals, compressor memories)
    as a torch `Stateful`, for checkpoints that keep every rank's."""

    def __init__(self, optimizer: _DistributedOptimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.compression_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_compression_state_dict(state)

    @staticmethod
    def resumable_at(saved_ranks: int, first: Mapping[str, Any], world_size: int) -> str | None:
        """Why the states saved by `saved_ranks` ranks (`first`: rank 0's) cannot be loaded by
        `world_size` ranks, or None: a residual is what its rank has not sent yet, so it needs the
        same ranks; compressor memories alone any rank may take over."""
        if saved_ranks == world_size or all(s["residual"] is None for s in first.values()):
            return None
        return f"the checkpoint holds per-rank residual memories; resume with -np {saved_ranks}"


def _check_names(named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
           params: list[torch.Tensor]) -> dict[torch.Tensor, str]:
    """Each parameter's name (`param.{i}` without named_parameters), checked: unique, complete."""
    named = [(f"param.{i}", p) for i, p in enumerate(params)] if named_parameters is None else list(named_parameters)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"named_parameters has duplicate names {dupes}; pass model.named_parameters()")
    by_param = {p: n for n, p in named}
    unnamed = [p for p in params if p not in by_param]
    if unnamed:
        raise InvalidArgument(f"{len(unnamed)} optimizer parameter(s) are missing from named_parameters; "
                              "pass model.named_parameters() for the same model")
    return by_param


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
