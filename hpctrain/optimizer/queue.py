"""The exchange queue: compressed gradients leave in one fixed order, round by round, on every rank.

torch.distributed matches collectives by the order ranks start them, and backward's hooks may
fire in a different order on different ranks. So exchanges start in a fixed launch order
(backward's usual one: construction order reversed), whatever order gradients become ready in: a
ready gradient waits until every one before it has started. A started exchange sits in the queue
(in launch order) with its round's collectives in flight. `collect` takes in the rounds that have
completed without waiting; only `advance` — from the queue's head — waits, and launches the next
round of a multi-round exchange (to the back of the queue), so every rank launches next rounds in
the same order whatever its timing.

Where the engine does not fuse collectives (torch.distributed), allreduces and allgathers over
the optimizer's ranks join a `Bucket` of their kind instead of leaving one by one; the queue
sends the open buckets before any other collective, once the step's last gradient has started,
and before waiting on a round in one.

A round may run over a subset of the ranks (a `hierarchical.GroupCollective`: the node, the
leaders): it names its group, and a rank that is not a member launches nothing and receives
nothing, but still passes through the round, so launch orders stay the same everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hpctrain.comm.base import Communicator, Work
from hpctrain.compression.base import Collective
from hpctrain.optimizer.buckets import Bucket, Part
from hpctrain.optimizer.reduction import Reduction
from hpctrain.optimizer.rounds import Rounds


class _Skipped:
    """The `Work` of a round this rank is not a member of: done, with nothing to receive."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


SKIPPED = _Skipped()


@dataclass
class _InFlight:
    """One gradient's exchange in the queue: its rounds, the current round's request and handles."""
    param: torch.Tensor
    rounds: Rounds
    request: Collective
    works: list[Work]          # empty while the next round waits for its turn to launch
    round: int = 0


class ExchangeQueue:
    def __init__(self, order: list[torch.Tensor], names: dict[torch.Tensor, str], bucket_name: str,
                 communicator: Communicator, reduction: Reduction,
                 start: Callable[[torch.Tensor, torch.Tensor], Rounds],
                 finish: Callable[[torch.Tensor, torch.Tensor], None],
                 count_wire: Callable[[torch.Tensor, int, bool], None], count_codec: Callable[[float], None],
                 count_collectives: Callable[[int], None],
                 spans_nodes: bool = False):
        self.order = order            # the launch order, the same on every rank
        self._names = names
        self._comm = communicator
        self._group_kw = reduction.group_kw
        self._start = start           # (param, gradient) → its rounds
        self._finish = finish         # (param, averaged gradient): store it
        self._count_wire = count_wire           # (param, bytes, whether they cross the inter-node link)
        self._count_codec = count_codec         # (seconds spent in the compressors' code)
        self._count_collectives = count_collectives      # (collectives started: a bucket is one)
        self.spans_nodes = spans_nodes         # the optimizer's own collectives reach other nodes
        self._launched = 0                                       # how many of `order` have started this step
        self._ready: dict[torch.Tensor, torch.Tensor] = {}       # checked gradients awaiting their turn
        self._inflight: dict[torch.Tensor, _InFlight] = {}       # in launch order: the queue rounds advance in
        self._buckets = {kind: Bucket(communicator, kind, communicator.bucket_bytes, bucket_name, self._group_kw)
                         for kind in ("allreduce", "allgather") if communicator.bucket_bytes}

    @property
    def busy(self) -> bool:
        """Some exchange is still in flight."""
        return bool(self._inflight)

    def add(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """`grad` is ready to go: start the exchanges whose turn has come (a prefix of the launch order)."""
        self._ready[p] = grad
        while self._launched < len(self.order) and self.order[self._launched] in self._ready:
            turn = self.order[self._launched]
            self._launched += 1
            start = time.perf_counter()
            rounds = self._start(turn, self._ready.pop(turn))
            request = next(rounds)                              # encodes the first round
            self._count_codec(time.perf_counter() - start)
            self._launch(_InFlight(turn, rounds, request, []))
        if self._launched == len(self.order):
            self._launch_buckets()

    def set_order(self, order: list[torch.Tensor]) -> None:
        """Exchange these parameters, in this launch order, from the next step on (between steps)."""
        if self._inflight or self._launched or self._ready:
            raise RuntimeError("the exchange queue changed with exchanges in flight")
        self.order = order

    def new_step(self) -> None:
        """Every gradient of the step has been added: the next ones start the order again."""
        self._launched = 0

    def collect(self) -> list[torch.Tensor]:
        """Take in the rounds that have completed, without waiting; returns the parameters whose
        exchanges have just finished (their averaged gradients stored)."""
        done = []
        for item in list(self._inflight.values()):
            if item.works and all(work.done() for work in item.works) and self._receive(item):
                del self._inflight[item.param]
                done.append(item.param)
        return done

    def advance(self) -> torch.Tensor | None:
        """Wait for the head's round and take it in; returns its parameter if its exchange has
        finished, else its next round is launched (to the back of the queue)."""
        head = self._inflight.pop(next(iter(self._inflight)))
        if any(isinstance(work, Part) and not work.launched for work in head.works):
            self._launch_buckets()
        if head.works and self._receive(head):
            return head.param
        self._launch(head)
        return None

    def _launch(self, item: _InFlight) -> None:
        name, request = self._names[item.param], item.request
        group = getattr(request, "group", None)          # a GroupCollective's own group, else the optimizer's
        kw = self._group_kw if group is None else {"group": group}
        bucket = self._buckets.get(request.kind) if group is None else None
        if bucket is None:
            self._launch_buckets()       # what joined them leaves first, on every rank alike (members or not)
        if not getattr(request, "member", True):
            item.works = [SKIPPED]
        else:
            payloads = [self._comm.sendable(t) for t in request.payloads]
            if bucket is not None:
                item.works = bucket.add(payloads, item.param.numel() * item.param.element_size())
                if bucket.full:
                    self._launch_buckets([bucket])
            else:
                names = [f"{name}.{item.round}.{i}" for i in range(len(payloads))]
                item.works = self._send(request, payloads, names, kw)
                self._count_collectives(len(item.works))
            if request.kind != "broadcast" or request.root == self._comm.rank:      # receivers send nothing
                crosses = getattr(request, "crosses_nodes", self.spans_nodes if group is None else False)
                self._count_wire(item.param, sum(t.numel() * t.element_size() for t in payloads), crosses)
        self._inflight[item.param] = item          # to the back of the queue

    def _send(self, request: Collective, payloads: list[torch.Tensor], names: list[str],
              kw: dict[str, Any]) -> list[Work]:
        if request.kind == "broadcast":
            return [self._comm.broadcast_async(t, request.root, n, **kw) for t, n in zip(payloads, names)]
        launch = self._comm.allgather_async if request.kind == "allgather" else self._comm.allreduce_async
        return [launch(t, name=n, **kw) for t, n in zip(payloads, names)]

    def _launch_buckets(self, buckets: list[Bucket] | None = None) -> None:
        """Send these open buckets (default: all, in a fixed order: the same on every rank)."""
        for bucket in buckets or self._buckets.values():
            if bucket.launch():
                self._count_collectives(1)

    def _receive(self, item: _InFlight) -> bool:
        """Send a completed round's results into the rounds; True when they have finished (the
        averaged gradient stored), else the next round waits in `item.request` to be launched."""
        received = [work.wait().to(sent.dtype) for work, sent in zip(item.works, item.request.payloads)]
        item.works = []
        start = time.perf_counter()
        try:
            item.request = item.rounds.send(received)          # decodes, and encodes the next round
        except StopIteration as finished:
            self._count_codec(time.perf_counter() - start)
            self._finish(item.param, finished.value)
            return True
        self._count_codec(time.perf_counter() - start)
        item.round += 1
        return False
