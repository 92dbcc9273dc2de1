"""The compressor interface: how one gradient becomes payloads and comes back averaged.

A compressor is a small, stateless object holding hyper-parameters. Per-parameter state
(residual memory, warm-start matrices, thresholds) lives in a `ParamState` the optimizer
owns, so one compressor instance can serve many parameters and the state is checkpointable.

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

from dataclasses import dataclass, field
from typing import Any, Generator, Literal, Sequence

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


Exchange = Generator[Collective, list[torch.Tensor], torch.Tensor]


@dataclass
class ParamState:
    """What a compressor remembers about one parameter between steps."""
    name: str
    residual: torch.Tensor | None = None      # error-feedback memory (fp32, on the parameter's device)
    extra: dict[str, Any] = field(default_factory=dict)   # compressor-specific (warm-start Q, threshold, ...)
    steps: int = 0                            # exchanges done so far

    def state_dict(self) -> dict[str, Any]:
        """On the CPU: checkpoints gather every rank's state on rank 0."""
        def cpu(value: Any) -> Any:
            return value.detach().cpu() if isinstance(value, torch.Tensor) else value
        return {"residual": cpu(self.residual), "extra": {k: cpu(v) for k, v in self.extra.items()},
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        res = state["residual"]
        self.residual = None if res is None else res.to(device)
        self.extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state["extra"].items()}
        self.steps = int(state["steps"])


class Compressor:
    """Base class. Subclasses set `name` and `kind`, and implement encode/decode (or exchange)."""

    name: str = "compressor"
    kind: CollectiveKind = "allreduce"
    error_feedback: bool = False

    def applies_to(self, shape: torch.Size) -> bool:
        """Whether this compressor can handle a tensor of this shape (else it goes dense)."""
        return True

    def encode(self, grad: torch.Tensor, state: ParamState) -> tuple[list[torch.Tensor], Any]:
        raise NotImplementedError

    def decode(self, received: list[torch.Tensor], ctx: Any, state: ParamState) -> torch.Tensor:
        raise NotImplementedError

    def exchange(self, grad: torch.Tensor, state: ParamState) -> Exchange:
        payloads, ctx = self.encode(grad, state)
        received = yield Collective(self.kind, payloads)
        return self.decode(received, ctx, state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


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
        results = []
        for gen in gens:
            try:
                results.append(gen.send(received))
            except StopIteration as stop:
                results.append(stop.value)
        if all(isinstance(r, torch.Tensor) for r in results):
            return results
        requests = results
