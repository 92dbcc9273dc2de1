"""A slow, real network on one machine: a Linux network namespace with a throttled loopback.

Compression only pays off when the network is the bottleneck, and on one machine loopback is
far faster than any cluster link. Inside a fresh network namespace, `tc` puts a token-bucket
filter on `lo`, so every byte the ranks exchange (Open MPI or Gloo over TCP on 127.0.0.1)
shares one link of the chosen rate:

    with throttled_namespace("1gbit") as ns, ns.entered():
        run_mpi(4, [...])          # processes started here live in the namespace

`entered()` moves the calling thread into the namespace (setns(2)) and back afterwards, so the
shared launcher (`hpctrain.local_launch.run_mpi`) is used unchanged. `two_nodes(rate)` stands
for two machines: two namespaces, each with its fast loopback, joined by a veth pair throttled
to `rate` each way (benchmarks/hierarchical.py). The namespace is deleted on exit,
on exceptions, on Ctrl-C and on SIGTERM; namespaces left behind by a killed run (its pid gone)
are removed the next time one is created. Needs root (CAP_SYS_ADMIN): elsewhere creating one
raises `NetnsUnavailable` with the reason, which tests turn into a skip.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterator

from hpctrain.errors import UserError
from hpctrain.rundir import pid_alive

PREFIX = "hpctrain-bench"
# A token bucket big enough for TCP bursts at these rates: a small burst/limit drops packets,
# and Open MPI's TCP transport then stalls into its timeouts instead of just running slower.
BURST, LIMIT = "256kb", "16mb"
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12, "bps": 8,
          "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()


class NetnsUnavailable(UserError):
    """This machine (or user) may not create network namespaces or shape traffic."""


def parse_rate(rate: str) -> float:
    """A tc rate ("1gbit", "100mbit", "500kbit", "10mbps") → bits per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", rate.lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"link rate {rate!r} is not a tc rate; write e.g. 1gbit, 100mbit or 500kbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def setup_commands(name: str, rate: str, burst: str = BURST, limit: str = LIMIT) -> list[list[str]]:
    """The ip/tc commands that create namespace `name` with its loopback throttled to `rate`."""
    parse_rate(rate)
    inside = ["ip", "netns", "exec", name]
    return [["ip", "netns", "add", name],
            inside + ["ip", "link", "set", "lo", "up"],
            inside + ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                      "burst", burst, "limit", limit]]


def teardown_command(name: str) -> list[str]:
    return ["ip", "netns", "delete", name]


def exists(name: str) -> bool:
    """Whether a namespace called `name` is registered (`ip netns list`)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return name in {line.split()[0] for line in listing.splitlines() if line.strip()}


def remove_stale() -> list[str]:
    """Delete namespaces this module created in processes that no longer exist (killed runs)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    removed = []
    for line in listing.splitlines():
        match = re.match(rf"({PREFIX}-(\d+)-\d+)\b", line)
        if match and not pid_alive(int(match.group(2))):
            subprocess.run(teardown_command(match.group(1)), capture_output=True, check=False)
            removed.append(match.group(1))
    return removed


@dataclass
class Namespace:
    name: str
    rate: str

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run this thread (and every process it starts) inside the namespace, then come back."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise NetnsUnavailable(f"cannot enter network namespace {self.name}: "
                                       f"{os.strerror(ctypes.get_errno())}; run as root")
            try:
                yield
            finally:
                if libc.setns(home, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
        finally:
            os.close(target)
            os.close(home)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_all(commands: list[list[str]]) -> None:
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise NetnsUnavailable(f"`{' '.join(command)}` failed ({reason}); throttled-link runs need root "
                                   "with network namespaces and tc (CAP_SYS_ADMIN, CAP_NET_ADMIN)")


@contextlib.contextmanager
def _namespaces(count: int) -> Iterator[list[str]]:
    """`count` fresh namespace names, deleted on the way out (also on SIGTERM/SIGHUP, turned into
    KeyboardInterrupt while they exist); stale ones of killed runs are removed first."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{' and '.join(missing)} not found; install iproute2 (apt-get install iproute2)")
    remove_stale()
    names = [f"{PREFIX}-{os.getpid()}-{next(_counter)}" for _ in range(count)]
    main = threading.current_thread() is threading.main_thread()    # only it may set handlers
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(teardown_command(name), capture_output=True, check=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def throttled_namespace(rate: str, burst: str = BURST, limit: str = LIMIT) -> Iterator[Namespace]:
    """Create a namespace whose loopback runs at `rate`; always delete it on the way out.

    Raises NetnsUnavailable (a UserError) where namespaces are not allowed.
    """
    with _namespaces(1) as (name,):
        _run_all(setup_commands(name, rate, burst, limit))
        yield Namespace(name, rate)


# -- several "nodes": fast inside (each namespace's own loopback), a throttled link between ---------
SUBNET = "10.77.0"


@dataclass
class Node:
    """One simulated node: a namespace, its address on the inter-node link and that interface."""
    namespace: Namespace
    address: str
    interface: str

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it on this node."""
        return ["ip", "netns", "exec", self.namespace.name]

    def sent_bytes(self) -> int:
        """Bytes this node has sent over the inter-node link (the kernel's counter)."""
        out = subprocess.run([*self.exec_prefix(), "cat", f"/sys/class/net/{self.interface}/statistics/tx_bytes"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip())


def two_nodes_commands(names: tuple[str, str], rate: str, burst: str = BURST, limit: str = LIMIT) -> list[list[str]]:
    """Two namespaces joined by a veth pair throttled to `rate` each way; loopback left fast."""
    parse_rate(rate)
    commands = [["ip", "netns", "add", name] for name in names]
    ends = [f"hv{i}-{name.removeprefix(PREFIX + '-')}"[:15] for i, name in enumerate(names)]   # 15 characters at most
    commands.append(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]])
    for i, (name, end) in enumerate(zip(names, ends)):
        inside = ["ip", "netns", "exec", name]
        commands += [["ip", "link", "set", end, "netns", name],
                     inside + ["ip", "link", "set", "lo", "up"],
                     inside + ["ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", end],
                     inside + ["ip", "link", "set", end, "up"],
                     inside + ["tc", "qdisc", "add", "dev", end, "root", "tbf", "rate", rate, "burst", burst,
                               "limit", limit]]
    return commands


@contextlib.contextmanager
def two_nodes(rate: str) -> Iterator[list[Node]]:
    """Two simulated nodes joined by a `rate` link; deleted (with the link) on the way out."""
    with _namespaces(2) as names:
        commands = two_nodes_commands((names[0], names[1]), rate)
        _run_all(commands)
        ends = [c[3] for c in commands if c[:3] == ["ip", "link", "set"] and c[4:5] == ["netns"]]
        yield [Node(Namespace(name, rate), f"{SUBNET}.{i + 1}", end) for i, (name, end) in enumerate(zip(names, ends))]
