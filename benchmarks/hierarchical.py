"""Hierarchical vs flat sparse exchange on two simulated nodes joined by a slow link.

Two network namespaces stand for two machines (benchmarks/netns.py `two_nodes`): inside each,
`--per-node` ranks talk over its own fast loopback; between them one veth pair is throttled to
`--rate` each way. One torchrun per node (torch.distributed over Gloo, the interface pinned to
the veth) trains the same model from the same seed with each method, flat and with
`compression.hierarchical = true` (dense mean inside the node, the sparse allgather among the
two leaders, broadcast back), and `auto`, which may choose either:

    python benchmarks/hierarchical.py --rate 1gbit --per-node 4 --model mlp --steps 12

Both hosts share one host name, so `HPCTRAIN_RANKS_PER_NODE` tells hpctrain the layout (as
torchrun numbers them: node 0 holds ranks 0..n−1). Step and comm times are medians over the
steps after the set-up ones. Bytes over the slow link are measured by the kernel (the veth
counters of both nodes) and counted per step as the difference between a run of `--steps` and
one of `SHORT_STEPS` (which leaves out set-up and end-of-run traffic: rendezvous, the first
broadcast of the parameters, auto's link probe, evaluation, the final checkpoint). Needs root (network namespaces, tc).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import link, netns  # noqa: E402
from benchmarks.script import command_line, one_line_errors  # noqa: E402
from hpctrain.errors import UserError  # noqa: E402
from hpctrain.h5log import read_log  # noqa: E402
from hpctrain.local_launch import local_env  # noqa: E402

# The short run of the byte difference: past every method's switch to its compressors (the dense
# start, auto's decision after step 3) and one step with them, so that both runs end with residuals
# and their final checkpoints (which gather every rank's residuals) cancel out.
SHORT_STEPS = 4
SPARSE = ("adacomp", "threshold", "topk")
PORT = 29611


@dataclass
class Run:
    label: str
    step_s: float
    comm_s: float
    wire_bytes: float            # handed to collectives per step by rank 0 (the step log)
    slow_link_bytes: float       # over the inter-node link per step, both directions (kernel counters)
    chose: str = ""


def train(nodes: list[netns.Node], per_node: int, settings: dict, timeout: float) -> int:
    """One torchrun per node; the bytes both nodes sent over the slow link during the run."""
    before = sum(node.sent_bytes() for node in nodes)
    procs = []
    for index, node in enumerate(nodes):
        command = [*node.exec_prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)),
                   "--nproc-per-node", str(per_node), "--node-rank", str(index), "--master-addr", nodes[0].address,
                   "--master-port", str(PORT), "-m", "hpctrain", "train", "--config", str(link.CONFIG),
                   *link.set_args(settings)]
        env = local_env({"GLOO_SOCKET_IFNAME": node.interface, "HPCTRAIN_RANKS_PER_NODE": str(per_node),
                         "HPCTRAIN_BACKEND": "torch"})
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    failed = [(p.returncode, out) for p, out in zip(procs, outputs) if p.returncode != 0]
    if failed:
        raise UserError(f"{settings['run.name']} failed (exit {failed[0][0]}): {link.failure_reason(failed[0][1])}")
    return sum(node.sent_bytes() for node in nodes) - before


def measure(nodes: list[netns.Node], args: argparse.Namespace, method: str, hierarchical: bool) -> Run:
    label = f"{method} ({'hierarchical' if hierarchical else 'flat'})" if method in SPARSE else method
    sent = {}
    for steps in (SHORT_STEPS, args.steps):
        settings = link.run_settings(args.model, method, steps, 1, args.out, engine="torch")
        settings.update({"run.name": f"{method}-{'hier' if hierarchical else 'flat'}-{steps}",
                         "compression.hierarchical": hierarchical})
        sent[steps] = train(nodes, args.per_node, settings, args.timeout)
    log = read_log(args.out / settings["run.name"] / "log.h5")
    steps = log["steps"]
    keep = steps["step"] > link.WARMUP_STEPS
    chose = ""
    reasons = [str(r) for r in log.get("events", {}).get("reason", [])]
    if reasons:
        chose = "hierarchical" if "hierarchical over" in reasons[-1] else "flat"
    return Run(label, float(np.median(steps["step_time_s"][keep])), float(np.median(steps["comm_time_s"][keep])),
               float(steps["wire_bytes"][keep].mean()), (sent[args.steps] - sent[SHORT_STEPS]) / (args.steps - SHORT_STEPS),
               chose)


def table(runs: list[Run]) -> list[str]:
    dense = next(r for r in runs if r.label == "dense")
    lines = ["| method | step (ms) | comm (ms) | over the slow link (MB/step) | handed to collectives by rank 0 (MB/step) "
             "| speedup vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        name = f"{r.label}, chose {r.chose}" if r.chose else r.label
        lines.append(f"| {name} | {r.step_s * 1e3:.0f} | {r.comm_s * 1e3:.0f} | {r.slow_link_bytes / 1e6:.2f} "
                     f"| {r.wire_bytes / 1e6:.2f} | {dense.step_s / r.step_s:.2f}× |")
    return lines


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="1gbit", help="the link between the two nodes (tc rate)")
    parser.add_argument("--per-node", type=int, default=4, help="ranks per node")
    parser.add_argument("--model", choices=sorted(link.MODELS), default="mlp")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--methods", default="dense,adacomp,threshold,topk,auto")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "hierarchical")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.steps <= SHORT_STEPS or "dense" not in methods:
        raise UserError(f"--steps must exceed {SHORT_STEPS} and --methods must include dense")
    print(f"command: {command_line(argv)}")
    print(f"\n### {args.model}, 2 nodes × {args.per_node} ranks, {args.rate} between them, fast inside\n", flush=True)
    runs = []
    with netns.two_nodes(args.rate) as nodes:
        for method in methods:
            for hierarchical in ((False, True) if method in SPARSE else (False,)):
                runs.append(measure(nodes, args, method, hierarchical))
                print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
