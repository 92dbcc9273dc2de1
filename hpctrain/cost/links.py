"""Links: α (latency per message step) and β (seconds per byte) of each level of the network.

Two levels: `intra` between the ranks of one node (NVLink, Infinity Fabric, shared memory) and
`inter` between nodes (all of a node's NICs together: a ring crosses each node's boundary once,
and NCCL spreads its rings over the NICs). `shared` is the throttled-loopback benchmark
(benchmarks/link.py): every rank's traffic crosses one link, so P messages queue on it.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from hpctrain.errors import UserError

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12, "bps": 8,
          "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def parse_rate(text: str) -> float:
    """"1gbit", "25gbit", "200gbit", "100mbit" (tc's units; "gbps" is bytes) → bits per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", text.lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"link rate {text!r} is not a rate; write e.g. 1gbit, 25gbit, 200gbit or 100mbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def default_latency_s(bits_per_s: float) -> float:
    """Per-step latency when none is given: TCP over Ethernet below 10 Gbit/s (~50 µs through MPI),
    RoCE-class 10–100 Gbit/s (~10 µs), HPC fabrics (InfiniBand, Slingshot) above (~5 µs per NCCL step)."""
    return 50e-6 if bits_per_s < 10e9 else 10e-6 if bits_per_s < 100e9 else 5e-6


def format_rate(bits_per_s: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


@dataclass(frozen=True)
class Link:
    """One level of the network: bandwidth (bits/s) and latency α (s) per message step."""
    bits_per_s: float
    latency_s: float

    @property
    def beta(self) -> float:
        """Seconds per byte."""
        return 8.0 / self.bits_per_s

    @classmethod
    def parse(cls, text: str, latency_us: float | None = None) -> "Link":
        rate = parse_rate(text)
        return cls(rate, default_latency_s(rate) if latency_us is None else latency_us * 1e-6)

    def __str__(self) -> str:
        return f"{format_rate(self.bits_per_s)}, α {self.latency_s * 1e6:g} µs"


# An NVLink/Infinity-Fabric-class link when --ranks-per-node > 1 and no --intra-link is given.
DEFAULT_INTRA = Link(parse_rate("800gbit"), 2e-6)


@dataclass(frozen=True)
class Network:
    """Where P ranks run: `ranks_per_node` ranks share a node's `intra` link and its `inter` NICs."""
    inter: Link
    intra: Link = DEFAULT_INTRA
    ranks_per_node: int = 1
    shared: bool = False
    label: str = ""

    def nodes(self, ranks: int) -> int:
        return math.ceil(ranks / self.ranks_per_node)

    def with_latency(self, latency_us: float | None) -> "Network":
        return self if latency_us is None else replace(self, inter=replace(self.inter, latency_s=latency_us * 1e-6))

    def describe(self) -> str:
        if self.shared:
            return f"one shared link of {self.inter} (all ranks' traffic crosses it)"
        if self.ranks_per_node == 1:
            return f"inter-node {self.inter}, one rank per node"
        return f"inter-node {self.inter} per node; {self.ranks_per_node} ranks per node on intra-node {self.intra}"


def site_network(name: str, sites_dir: Path | None = None) -> Network:
    """The `[links]` table of jobs/sites/NAME.toml: inter_gbit, intra_gbit, latency_us,
    intra_latency_us; ranks per node from gpus_per_node (or ranks_per_node)."""
    from hpctrain.jobs import SITES_DIR, available_sites   # lazily: jobs pulls in its templates

    path = (sites_dir or SITES_DIR) / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown site {name!r}; choose one of {', '.join(available_sites())}")
    table = tomllib.loads(path.read_text())
    links = table.get("links")
    if not isinstance(links, dict) or "inter_gbit" not in links:
        raise UserError(f"site {name!r} has no [links] table with inter_gbit; add one to {path} "
                        "or pass --link and --ranks-per-node")
    try:
        inter = Link(float(links["inter_gbit"]) * 1e9, float(links.get("latency_us", 5.0)) * 1e-6)
        intra = Link(float(links.get("intra_gbit", DEFAULT_INTRA.bits_per_s / 1e9)) * 1e9,
                     float(links.get("intra_latency_us", DEFAULT_INTRA.latency_s * 1e6)) * 1e-6)
    except (TypeError, ValueError):
        raise UserError(f"site {name!r}: [links] values must be numbers, got {links}") from None
    per_node = int(table.get("gpus_per_node") or table.get("ranks_per_node") or 1)
    return Network(inter=inter, intra=intra, ranks_per_node=per_node, label=name)
