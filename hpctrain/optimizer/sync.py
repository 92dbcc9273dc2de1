"""One step's gradients from backward to their averages: checks, the queue, the bypass, byte counts.

`GradientSync.submit(p)` takes `p.grad` (this rank's gradient for the step) when backward's hook
says it is final: a sparse gradient is coalesced (and made dense where it is sent dense), its
squared norm notes whether it is finite (`NonFiniteFlags`) and is shown to the observers (batch
growth's noise scale), then a compressed gradient joins the `ExchangeQueue` (a non-finite one
as zeros where error feedback would remember it) and a small one waits for the `Bypass`.
`launch_bypass` ends the step's sending; `progress` / `drain` take in what lands, and `place`
(the fusion mode's) puts each averaged gradient where the update reads it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from hpctrain.comm.base import Communicator
from hpctrain.comm.nodes import NodeGroups
from hpctrain.compression.base import Compressor, ParamState
from hpctrain.compression.policy import Policy
from hpctrain.errors import UserError
from hpctrain.optimizer.bypass import Bypass
from hpctrain.optimizer.nonfinite import NonFiniteFlags, squared_norm
from hpctrain.optimizer.queue import ExchangeQueue
from hpctrain.optimizer.reduction import Reduction
from hpctrain.optimizer.rounds import Rounds, gradient_rounds, resparsify


@dataclass
class StepStats:
    """What the last optimizer step sent, for the step log (bytes are this rank's)."""
    wire_bytes: int = 0
    dense_bytes: int = 0
    inter_bytes: int = 0      # of wire_bytes, those handed to collectives over the inter-node link
    comm_time_s: float = 0.0
    # Host seconds inside compressor code (encode, decode, between rounds), in backward or in the
    # wait; on CUDA that is kernel launches, the device's own work shows in the wait.
    codec_time_s: float = 0.0
    collectives: int = 0      # gradient collectives this rank started (a fused bucket, the bypass: one each)
    per_param: dict[str, tuple[int, int]] = field(default_factory=dict)   # name → (wire, dense)


class GradientObserver(Protocol):
    """Sees each step's gradients on both sides of the exchange (batch growth's noise scale:
    `hpctrain.batch.grad_norms.GradNormObserver`). Register with
    `optimizer.register_gradient_observer(observer)`."""

    def before_exchange(self, param: torch.Tensor, grad: torch.Tensor, sqnorm: torch.Tensor) -> None:
        """This rank's gradient of `param` as it leaves, with its |grad|² (an fp32 scalar on the
        gradient's device, computed anyway for the finiteness check)."""

    def after_exchange(self, params: list[torch.Tensor]) -> None:
        """Every gradient of the step is exchanged: `p.grad` holds the averaged ones (not called
        with fusion='forward', which keeps them aside for the pending updates)."""


def _zeros_like(p: torch.Tensor, sparse_dim: int | None, dense: bool) -> torch.Tensor:
    """The gradient of a parameter this rank did not use: zeros, sparse (no rows) if its gradients are."""
    if sparse_dim is None or dense:
        return torch.zeros_like(p)
    return torch.sparse_coo_tensor(torch.empty((sparse_dim, 0), dtype=torch.int64, device=p.device),
                                   p.new_empty((0, *p.shape[sparse_dim:])), p.shape, check_invariants=False)


class GradientSync:
    def __init__(self, params: list[torch.Tensor], names: dict[torch.Tensor, str], policy: Policy,
                 reduction: Reduction, communicator: Communicator, sparse_as_dense: bool,
                 place: Callable[[torch.Tensor, torch.Tensor], None], stop_on_overflow: bool):
        # -- what each parameter is sent with, and its compression state (checkpointed)
        self.policy = policy
        self.names = names
        self.compressors: dict[torch.Tensor, Compressor | None] = {p: policy.resolve(names[p], p) for p in params}
        self.states = {p: ParamState(names[p]) for p in params}
        self.sparse_as_dense = sparse_as_dense
        self._sparse_dim: dict[torch.Tensor, int] = {}     # parameters whose gradients come sparse
        self._reduction = reduction
        # node groups for the hierarchical exchange (a collective: every rank builds the optimizer)
        self._communicator = communicator
        self.nodes: NodeGroups | None = None
        self.set_hierarchical(policy.hierarchical)
        # -- where gradients go: the queue (compressed), the bypass (small), and back via `place`
        first = names[params[0]] if params else "gradients"    # names the collectives (unique as parameter names are)
        self.queue = ExchangeQueue(self._launch_order(), names, f"{first}.bucket", communicator, reduction,
                                   self._rounds, self._store, self._count_wire, self._count_codec,
                                   self._count_collectives, spans_nodes=communicator.local_size < reduction.size)
        self.bypass = Bypass(self._bypassed(), f"{first}.bypass", communicator, reduction)
        self._place = place                    # the fusion mode's: into p.grad, or aside
        self._seen: set[torch.Tensor] = set()  # submitted this step
        # -- checks and measurement
        self._index = {p: i for i, p in enumerate(params)}
        self.flags = NonFiniteFlags([names[p] for p in params], reduction.members, reduction.index, reduction.rank)
        self._stop_on_overflow = stop_on_overflow   # updates are applied as gradients land: nothing can skip them
        self.observers: OrderedDict[int, GradientObserver] = OrderedDict()   # RemovableHandle's dict
        self.stats = StepStats()

    # -- sending ---------------------------------------------------------------------------
    def submit(self, p: torch.Tensor) -> bool:
        """`p.grad` is this rank's gradient for the step: note whether it is finite, then start its
        exchange when its turn comes. False if it waits for the bypass instead."""
        if p in self._seen:
            raise UserError(f"gradient of {self.names[p]} computed twice before step(); call "
                            "optimizer.step() between backward passes, or raise backward_passes_per_step")
        self._seen.add(p)
        grad = p.grad
        if grad.is_sparse:                 # nn.Embedding(sparse=True): coalesced, as SparseAdam reads it
            grad = grad.coalesce()
            self._sparse_dim[p] = grad.sparse_dim()
            if self.sparse_as_dense or self.compressors[p] is None:    # sent dense, made sparse again after
                grad = grad.to_dense()
            p.grad = grad
        sqnorm = squared_norm(grad)        # one pass; any NaN/Inf in grad makes it non-finite
        finite = self.flags.note(self._index[p], sqnorm)
        for observer in list(self.observers.values()):
            observer.before_exchange(p, grad, sqnorm)
        self.stats.dense_bytes += grad.numel() * 4
        compressor, state = self.compressors[p], self.states[p]
        if state.residual is not None and (compressor is None or not compressor.error_feedback):
            grad = grad + state.residual.to(grad.dtype)      # left by a changed compressor: sent now
            state.residual = None
        if compressor is None:
            p.grad = grad                  # the bypass reads p.grad
            return False
        if compressor.error_feedback and not grad.is_sparse:   # a non-finite gradient must not enter the residual
            grad = torch.where(finite, grad, 0) if grad.is_cuda else grad if bool(finite) else torch.zeros_like(grad)
        self.queue.add(p, grad)
        return True

    def set_hierarchical(self, on: bool) -> None:
        """Run allgather compressors hierarchically (or flat again) from the next step on. Turning
        it on builds the node groups on first use: a collective, so every rank calls it at the
        same step boundary. Stays flat where the ranks do not form several nodes."""
        self.nodes = self._communicator.node_groups() if on and self._reduction.process_set is None else None

    def set_compressors(self, chosen: dict[str, Compressor | None]) -> None:
        """Send these parameters (by name) with these compressors from the next step on (between
        steps only: nothing in flight); None, or a compressor that does not take the parameter's
        shape, puts it on the fused bypass, as the policy does. A changed compressor starts with
        empty memory; its old residual stays the residual when the new one has error feedback,
        else it is added to the parameter's next gradient (until then it is the state a
        checkpoint keeps): nothing the old compressor held back is lost. Parameters below the
        policy's `min_numel` stay on the bypass."""
        by_name = {self.names[p]: p for p in self.compressors}
        crossed = False       # some parameter moved between the queue and the bypass
        for name, new in chosen.items():
            p = by_name[name]
            if new is not None and not new.applies_to(p.shape):
                new = None
            if new == self.compressors[p]:
                continue
            if p.numel() < self.policy.min_numel:
                raise UserError(f"{name} rides the fused bypass (numel {p.numel()} < min_numel "
                                f"{self.policy.min_numel}): its compressor cannot change")
            self.states[p].memory = None      # a residual stays: the new compressor's, or added to the next gradient
            crossed |= (new is None) != (self.compressors[p] is None)
            self.compressors[p] = new
        if crossed:
            self.queue.set_order(self._launch_order())
            self.bypass.set_params(self._bypassed())

    def _launch_order(self) -> list[torch.Tensor]:
        """The compressed parameters in the order their exchanges start: backward's usual one."""
        return [p for p in reversed(self.compressors) if self.compressors[p] is not None]

    def _bypassed(self) -> list[torch.Tensor]:
        """The parameters on the bypass, in construction order (the same on every rank)."""
        return [p for p in self.compressors if self.compressors[p] is None]

    def unsent(self) -> Iterator[torch.Tensor]:
        """The parameters not submitted this step, each with zeros in `p.grad` if it has no gradient
        (a partial accumulation is sent as it is): submit each, so no rank waits on a collective
        another rank never starts (as in Horovod)."""
        for p in self.compressors:
            if p not in self._seen:
                if p.grad is None:
                    dense = self.sparse_as_dense or self.compressors[p] is None      # the bypass is dense
                    p.grad = _zeros_like(p, self._sparse_dim.get(p), dense)
                yield p

    def launch_bypass(self) -> None:
        """Every gradient is submitted: start the fused allreduce of the small tensors and of every
        rank's non-finite flag. From here on, a gradient belongs to the next step."""
        if not self.compressors:
            return
        for p, nbytes in self.bypass.launch(self.flags.to_send()):
            self._count_wire(p, nbytes, self.queue.spans_nodes)
        self._count_collectives(1)
        self._seen.clear()
        self.queue.new_step()

    def _rounds(self, p: torch.Tensor, grad: torch.Tensor) -> Rounds:
        return gradient_rounds(grad, self.compressors[p], self.states[p], self.policy, self._reduction,
                               self._sparse_dim.get(p), self.nodes)

    def _count_collectives(self, count: int) -> None:
        self.stats.collectives += count

    def _count_codec(self, seconds: float) -> None:
        self.stats.codec_time_s += seconds

    def _count_wire(self, p: torch.Tensor, nbytes: int, crosses_nodes: bool = False) -> None:
        self.stats.wire_bytes += nbytes
        self.stats.inter_bytes += nbytes if crosses_nodes else 0
        wire, dense = self.stats.per_param.get(self.names[p], (0, p.numel() * 4))
        self.stats.per_param[self.names[p]] = (wire + nbytes, dense)

    # -- receiving -------------------------------------------------------------------------
    def progress(self, wait: bool) -> list[torch.Tensor]:
        """Take in the collectives that have completed; with `wait`, also advance the queue's head
        (waiting for it). Returns the parameters whose averaged gradients have just been stored."""
        done = self.queue.collect()
        if self.bypass.in_flight and (self.bypass.done() or (wait and not self.queue.busy)):
            done += self._finish_bypass()
        if wait and self.queue.busy:
            finished = self.queue.advance()
            if finished is not None:
                done.append(finished)
        return done

    def drain(self, landed: Callable[[list[torch.Tensor]], Any]) -> None:
        """Wait for every exchange in flight, handing each batch of finished parameters to `landed`
        as it lands (fused updates then overlap the remaining communication)."""
        while self.queue.busy or self.bypass.in_flight:
            landed(self.progress(wait=True))

    def _store(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        self.states[p].steps += 1
        self._place(p, averaged)

    def _finish_bypass(self) -> list[torch.Tensor]:
        """Store the small tensors' averages and learn who, if anyone, had a non-finite gradient:
        then every rank sees Inf in its gradients, as the GradScaler of mixed precision expects."""
        averaged, flags = self.bypass.finish()
        for p, tensor in zip(self.bypass.params, averaged):
            self._store(p, resparsify(tensor, self._sparse_dim.get(p)))
        if self.flags.receive(flags):
            if self._stop_on_overflow:
                self.flags.raise_overflow()
            while self.queue.busy:      # Horovod may finish the bypass first: let every gradient land, then fill
                self.progress(wait=True)
            for p in self.compressors:
                if p.grad.is_sparse:
                    grad = p.grad
                    p.grad = torch.sparse_coo_tensor(grad.indices(), torch.full_like(grad.values(), float("inf")),
                                                     grad.shape, check_invariants=False).coalesce()
                else:
                    p.grad.fill_(float("inf"))
        return list(self.bypass.params)
