"""The compressor interface: how one gradient becomes payloads and comes back averaged.

A compressor is a small, frozen dataclass whose fields are its hyper-parameters (and so the
schema of its `[compression.NAME]` table). Per-parameter state (residual memory, and the
compressor's own typed `memory`: warm-start matrices, thresholds) lives in a `ParamState` the
optimizer owns, so one compressor instance can serve many parameters and the state is
checkpointable.

The exchange of one gradient is written as a generator, so a compressor that needs several
rounds of communication (low-rank: P, then Q) reads top to bottom:

    def exchange(self, grad, state):
        payloads, ctx = self.encode(grad, state)
        received = yield Collective("allgather", payloads)   # the communicator runs it
        return self.decode(received, ctx, state)              # the averaged gradient

The driver (`hpctrain.optimizer`, or `simulate` below on one process) launches each yielded
collective asynchronously, so many parameters are in flight at once, and sends back what
all ranks contributed: for "allreduce" the element-wise mean of each payload, for
"allgather" each payload concatenated along dim 0 over ranks (ranks may send different
lengths). Single-round compressors implement `encode`/`decode` and inherit `exchange`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Literal, Sequence

import torch

CollectiveKind = Literal["allreduce", "allgather"]


@dataclass
class Collective:
    """A request to the communicator: run `kind` over these payload tensors."""
    kind: CollectiveKind
    payloads: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes this rank hands to the network for this request (indices included)."""
        return sum(t.numel() * t.element_size() for t in self.payloads)


# The rounds of one gradient's exchange: yields Collectives, receives their results, returns the average.
Rounds = Generator[Collective, list[torch.Tensor], torch.Tensor]


@dataclass
class ParamState:
    """What a compressor remembers about one parameter between steps."""
    name: str
    residual: torch.Tensor | None = None      # error-feedback memory (fp32, on the parameter's device)
    memory: Any = None                        # the compressor's own state (its `memory_type`), or None
    steps: int = 0                            # exchanges done so far

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers, on the CPU (checkpoints gather every rank's state on rank 0,
        and load with torch.load's `weights_only`)."""
        return {"residual": _moved(self.residual, "cpu"), "steps": self.steps,
                "memory": None if self.memory is None else {k: _moved(v, "cpu") for k, v in _fields(self.memory).items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """The memory comes back as a dict of its fields; the compressor types it on first use."""
        self.residual = _moved(state["residual"], device)
        memory = state.get("memory")
        self.memory = None if memory is None else {k: _moved(v, device) for k, v in memory.items()}
        self.steps = int(state["steps"])


def _fields(memory: Any) -> dict[str, Any]:
    return memory if isinstance(memory, dict) else {f.name: getattr(memory, f.name) for f in dataclasses.fields(memory)}


def _moved(value: Any, device: torch.device | str) -> Any:
    return value.detach().to(device) if isinstance(value, torch.Tensor) else value


class Compressor:
    """Base class. Subclasses are frozen dataclasses of their hyper-parameters (validated in
    `__post_init__`); they set `name` and `kind`, and implement encode/decode (or exchange)."""

    name: ClassVar[str] = "compressor"
    kind: ClassVar[CollectiveKind] = "allreduce"
    error_feedback: ClassVar[bool] = False
    memory_type: ClassVar[type | None] = None     # a dataclass of per-parameter state, if any

    def memory(self, state: ParamState) -> Any:
        """This parameter's `memory_type` instance: created on first use, or typed from the
        dict of fields a checkpoint restored."""
        if not isinstance(state.memory, self.memory_type):
            state.memory = self.memory_type(**(state.memory or {}))
        return state.memory

    def applies_to(self, shape: torch.Size) -> bool:
        """Whether this compressor can handle a tensor of this shape (else it goes dense)."""
        return True

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        raise NotImplementedError

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        raise NotImplementedError

    def exchange(self, grad: torch.Tensor, state: ParamState) -> Rounds:
        payloads, ctx = self.encode(grad, state)
        received = yield Collective(self.kind, payloads)
        return self.decode(received, ctx, state)



def compensate(grad: torch.Tensor, state: ParamState) -> torch.Tensor:
    """Error feedback: add the gradient into the residual memory and return it (fp32).

    Works in place on `state.residual` (created on the first step), so a codec allocates no
    gradient-sized buffer: it subtracts what it sends from the returned tensor, and what is
    left is already the next residual. Never aliases `grad` itself.
    """
    g = grad.detach()
    if state.residual is None:
        state.residual = g.to(torch.float32, copy=True)
    else:
        state.residual.add_(g)
    return state.residual


def like_grad(dense: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A flat result in the gradient's own shape and dtype (what `decode` must return)."""
    return dense.view(grad.shape).to(grad.dtype)


def simulate(compressor: Compressor, grads: Sequence[torch.Tensor], states: Sequence[ParamState],
             rounds: list[list[Collective]] | None = None) -> list[torch.Tensor]:
    """Run one exchange for len(grads) simulated ranks on one process.

    The in-process stand-in for the communicator: allreduce is the mean over ranks,
    allgather the concatenation in rank order. Used by unit tests and benchmarks/codec.py.
    `rounds`, when given, receives each round's requests (one per rank), for byte counts.
    """
    gens = [compressor.exchange(g, s) for g, s in zip(grads, states)]
    requests = [next(gen) for gen in gens]
    while True:
        if rounds is not None:
            rounds.append(requests)
        kind = requests[0].kind
        columns = list(zip(*(r.payloads for r in requests)))
        if len(requests) == 1:                 # a world of one gets its own payloads back
            received = list(requests[0].payloads)
        elif kind == "allreduce":
            received = [torch.stack(col).mean(dim=0) for col in columns]
        else:
            received = [torch.cat(col, dim=0) for col in columns]
        results = advance(gens, [received] * len(gens))
        if all(isinstance(r, torch.Tensor) for r in results):
            return results
        requests = results


def advance(gens: Sequence[Rounds], received: Sequence[list[torch.Tensor]]) -> list[Collective | torch.Tensor]:
    """Send each simulated rank's results into its exchange: its next request, or its average."""
    results: list[Collective | torch.Tensor] = []
    for gen, got in zip(gens, received):
        try:
            results.append(gen.send(got))
        except StopIteration as stop:
            results.append(stop.value)
    return results
