"""Gradient buckets: collectives fused into one each, for engines that do not fuse them.

Horovod's background thread merges the collectives ready in one cycle; torch.distributed runs
each call on its own, paying its latency per tensor (DDP's buckets exist for this). Here the
exchange queue puts each allreduce or allgather it launches into the open bucket of its kind, in
launch order, and a bucket leaves as one grouped collective once it stands for `capacity` bytes
of gradient (as DDP's bucket_cap_mb: compressed payloads are smaller, the overlap with backward
the same), before a collective of another sort leaves, when the step's last gradient has
joined, or when the queue must wait on something inside it. Those points depend on the launch
order alone, the same on every rank, so every rank's buckets hold the same tensors.
"""
from __future__ import annotations

from typing import Any, Literal

import torch

from hpctrain.comm.base import Communicator, Work


class Part:
    """One tensor's share of a bucket's collective: its `Work` (not done until the bucket leaves)."""

    def __init__(self, index: int):
        self.index = index
        self.work: Work | None = None      # the bucket's grouped collective, once launched

    @property
    def launched(self) -> bool:
        return self.work is not None

    def done(self) -> bool:
        return self.work is not None and self.work.done()

    def wait(self) -> torch.Tensor:
        if self.work is None:
            raise RuntimeError("waited on a bucket that has not been launched")
        return self.work.wait()[self.index]


class Bucket:
    """The open bucket of one kind (allreduce or allgather): payloads waiting to leave together."""

    def __init__(self, communicator: Communicator, kind: Literal["allreduce", "allgather"], capacity: int,
                 name: str, group_kw: dict[str, Any]):
        self._send = communicator.grouped_allreduce_async if kind == "allreduce" \
            else communicator.grouped_allgather_async
        self.capacity = capacity
        self._name = f"{name}.{kind}"
        self._group_kw = group_kw
        self._tensors: list[torch.Tensor] = []
        self._parts: list[Part] = []
        self._bytes = 0
        self._launched = 0          # buckets sent so far: each collective's name

    def add(self, payloads: list[torch.Tensor], gradient_bytes: int) -> list[Part]:
        """Queue one gradient's `payloads` for the next fused collective (an allreduce averages)."""
        parts = [Part(len(self._tensors) + i) for i in range(len(payloads))]
        self._tensors += payloads
        self._parts += parts
        self._bytes += gradient_bytes
        return parts

    @property
    def full(self) -> bool:
        """Its gradients make `capacity` bytes: time to send it."""
        return self._bytes >= self.capacity

    def launch(self) -> bool:
        """Send what the bucket holds; False if it was empty."""
        if not self._tensors:
            return False
        work = self._send(self._tensors, name=f"{self._name}.{self._launched}", **self._group_kw)
        for part in self._parts:
            part.work = work
        self._launched += 1
        self._tensors, self._parts, self._bytes = [], [], 0
        return True
