"""hpctrain's compressors inside torch DistributedDataParallel, as a DDP communication hook.

    import hpctrain
    from hpctrain.compression import AdaComp, Policy
    torch.distributed.init_process_group("gloo")            # or torchrun's env:// rendezvous
    ddp = DistributedDataParallel(model)
    state, hook = hpctrain.ddp_comm_hook(Policy(default=AdaComp(), warmup_steps=100), model=ddp)
    ddp.register_comm_hook(state, hook)
    ...                                                      # train as usual
    torch.save({"model": ddp.state_dict(), "hook": state.state_dict()}, f"ckpt.rank{rank}.pt")

DDP hands the hook one bucket (a flat buffer holding several parameters' local gradients) at a
time, in the same bucket order on every rank. The hook queues the bucket's exchange on hpctrain's
communication thread (`hpctrain.comm`, torch engine: it adopts the process group DDP uses), so
backward goes on computing the next buckets meanwhile, and returns a future DDP waits on at the end
of backward. On that thread each parameter of the bucket runs its compressor's exchange (error
feedback inside, as in `DistributedOptimizer`), round by round: every round's allreduce payloads of
the whole bucket, the dense and small ones included, go out as one fused allreduce, then each
allgather payload in parameter order. The averaged gradients are written back into the bucket.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpctrain import comm
from hpctrain.compression.base import Compressor, ParamState
from hpctrain.compression.policy import Policy, as_policy
from hpctrain.errors import UserError
from hpctrain.optimizer.nonfinite import squared_norm


class HookState:
    """What the hook keeps between steps, grouped by role (as torch's `PowerSGDState`).

    Tuning, in the order it matters:

    * The compressor (`policy.default`) trades bytes for accuracy: `AdaComp` (about 40-300x fewer
      bytes on conv/fc layers, adapts to each layer) or `TopK(ratio)` / `Threshold(density)` for a
      fixed fraction, `LowRank(rank)` for matrices (P and Q: two rounds per step), `FP16` for a
      plain 2x. All but FP16 keep what they did not send in a residual (error feedback), one fp32
      copy of each compressed parameter per rank: state_dict() carries it into checkpoints.
    * `policy.warmup_steps`: the first steps move the weights most; send them dense (as PowerSGD's
      `start_powerSGD_iter`; an epoch is a good start), so compression begins on calmer gradients.
    * `policy.min_numel`: tensors smaller than this (biases, norms, small heads) are not worth
      encoding; they ride the bucket's fused dense allreduce. `policy.rules` (glob on the
      parameter's name, first match wins; None: dense) keep sensitive layers (say "head.*") exact.
      Rules need names: pass `model=` to `ddp_comm_hook`.
    * DDP's `bucket_cap_mb`: a larger bucket fuses more small tensors into one allreduce and gives
      fewer, larger messages; a smaller one starts communication earlier in backward.
    """

    def __init__(self, policy: Policy, named_parameters: list[tuple[str, torch.Tensor]] | None):
        # -- what each parameter is sent with
        self.policy = policy
        self.names: dict[torch.Tensor, str] = {p: n for n, p in named_parameters or []}
        self.compressors: dict[torch.Tensor, Compressor | None] = {}   # None: the fused dense bypass
        # -- error feedback: per-parameter residuals and compressor memory (checkpointed)
        self.params: dict[torch.Tensor, ParamState] = {}
        self.pending: dict[str, dict[str, Any]] = {}     # loaded before the parameter was first seen
        # -- communication: hpctrain's torch engine on DDP's process group
        self.comm = comm.init(backend="torch")
        if self.comm.engine != "torch":
            raise UserError(f"ddp_comm_hook needs hpctrain's torch engine, but {self.comm.describe()} is running; "
                            "call hpctrain.init(backend='torch') (or nothing) before creating the hook")
        # -- measurement: this rank's totals since creation (take differences per step)
        self.wire_bytes = 0           # payload bytes handed to the network
        self.dense_bytes = 0          # what plain fp32 DDP would have sent
        self.buckets = 0              # buckets exchanged

    def param_state(self, p: torch.Tensor, name: str) -> ParamState:
        """The parameter's state, created (and filled from a loaded checkpoint) on first use."""
        if p not in self.params:
            self.params[p] = ParamState(name)
            self.compressors[p] = self.policy.resolve(name, p)
            if name in self.pending:
                self.params[p].load_state_dict(self.pending.pop(name), p.device)
        return self.params[p]

    def state_dict(self) -> dict[str, Any]:
        """Residuals and compressor memory keyed by parameter name (this rank's own: save one per
        rank); the same layout as `DistributedOptimizer.compression_state_dict()`."""
        self.comm.submit(lambda: None).wait()           # no bucket exchange still running
        return {**{s.name: s.state_dict() for s in self.params.values()},
                **self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        by_name = {s.name: (p, s) for p, s in self.params.items()}
        self.pending = {}
        for name, saved in state.items():
            if name in by_name:
                p, param_state = by_name[name]
                param_state.load_state_dict(saved, p.device)
            else:
                self.pending[name] = saved


def _exchange_bucket(state: HookState, buffer: torch.Tensor, params: list[torch.Tensor],
                     grads: list[torch.Tensor]) -> torch.Tensor:
    """On the comm thread: drive every parameter's exchange to completion, round by round, and
    write the averaged gradients into the bucket's buffer.

    A non-finite gradient never enters a residual (its compressor gets zeros); a flag riding the
    first round tells every rank, which then fills the bucket with Inf, so a GradScaler skips the
    step on every rank as it would with plain DDP."""
    c = state.comm
    averaged: list[torch.Tensor | None] = [None] * len(params)
    active = []                        # [index, rounds, request] for the compressed parameters
    bypass = []                        # indices riding the first round's fused allreduce
    finite = [bool(torch.isfinite(squared_norm(g))) for g in grads]     # host syncs, on this thread only
    for i, p in enumerate(params):
        compressor = state.compressors[p]
        if compressor is None:
            bypass.append(i)
            continue
        compressor = state.policy.compressor_now(compressor, state.params[p])
        grad = grads[i] if finite[i] or not compressor.error_feedback else torch.zeros_like(grads[i])
        rounds = compressor.exchange(grad, state.params[p])
        active.append([i, rounds, next(rounds)])
    overflow = torch.tensor([0.0 if all(finite) else 1.0], device=buffer.device)
    first = True
    while active or first:
        fused = [t for _, _, request in active if request.kind == "allreduce" for t in request.payloads]
        fused += [grads[i] for i in bypass] if first else []
        state.wire_bytes += sum(t.numel() * t.element_size() for t in fused)   # gradients (the flag is control)
        fused += [overflow] if first else []
        reduced = iter(c.reduce(fused, average=True)) if fused else iter(())
        gathering = [t for _, _, request in active if request.kind == "allgather" for t in request.payloads]
        gathered = iter(c.allgather(gathering)) if gathering else iter(())
        still = []
        for item in active:
            i, rounds, request = item
            if request.kind == "allreduce":
                received = [next(reduced) for _ in request.payloads]
            else:
                received = [next(gathered) for _ in request.payloads]
                state.wire_bytes += request.nbytes
            try:
                item[2] = rounds.send(received)
                still.append(item)
            except StopIteration as finished:
                averaged[i] = finished.value
        if first:
            for i in bypass:
                averaged[i] = next(reduced)
            overflow = next(reduced)
        active, first = still, False
    for p, grad, result in zip(params, grads, averaged):
        grad.copy_(result.view_as(grad))
        state.params[p].steps += 1
    if float(overflow) > 0:
        buffer.fill_(float("inf"))
    state.dense_bytes += sum(g.numel() * 4 for g in grads)
    state.buckets += 1
    return buffer


def _hook(state, bucket):  # no hints: DDP's signature check rejects string annotations
    """DDP's comm hook: queue the bucket's exchange on the comm thread; its future gives the buffer."""
    buffer = bucket.buffer()
    params, grads = bucket.parameters(), bucket.gradients()
    for i, p in enumerate(params):
        state.param_state(p, state.names.get(p) or f"bucket{bucket.index()}.{i}")
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future(
        devices=[buffer.device] if buffer.is_cuda else None)

    def job() -> None:
        try:
            future.set_result(_exchange_bucket(state, buffer, params, grads))
        except BaseException as exc:       # DDP re-raises it from backward
            future.set_exception(exc)
    work = state.comm.submit(job)
    if bucket.is_last():
        # DDP's own collectives (find_unused_parameters' used-map allreduce) follow on this thread:
        # let ours finish first, so ranks cannot interleave the two streams of collectives differently.
        work.wait()
    return future


def ddp_comm_hook(compression: Compressor | Policy | None,
                  model: nn.Module | None = None) -> tuple[HookState, Any]:
    """`(state, hook)` for `ddp_model.register_comm_hook(state, hook)`: hpctrain's compressors in DDP.

    Args:
        compression: a compressor (`hpctrain.compression.AdaComp()`, ...) or a `Policy` (per-layer
            rules, small-tensor bypass, dense warm-up steps); None averages plain fp32, as DDP does.
        model: the model (DDP-wrapped or not: names are the plain module's, as DistributedOptimizer
            sees them). Its parameter names key the policy's rules and the checkpointed residuals;
            without it parameters are named `bucket{index}.{position}` after DDP's first buckets
            and only the policy's default applies.
    See `HookState` for tuning. Call after `torch.distributed.init_process_group` (or torchrun).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    named = list(model.named_parameters()) if model is not None else None
    state = HookState(as_policy(compression), named)
    for name, p in named or []:
        if p.requires_grad:
            state.param_state(p, name)
    return state, _hook
