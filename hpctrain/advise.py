"""`hpctrain advise LOG.h5`: does compression pay for this model at P ranks on this network?

From a short run's step log: compute time per step (median of step − comm time, set-up steps
left out), the gradient sizes per layer (the `layers` group; shapes from rebuilding the model
on the meta device), and each compressor's ratio: as the log measured it when the run used that
compressor, else measured by the compressor's own code on synthetic gradients of the layer
shapes (`hpctrain.compression.simulate`, through benchmarks/codec.py, which also times the
codecs here). Then `hpctrain.cost` predicts, per link and world size, every method's step time
and names the winner and why:

    hpctrain advise runs/mnist1d/log.h5 --ranks 4,64,1024,8192 --link 1gbit,25gbit,200gbit
    hpctrain advise runs/mnist1d/log.h5 --site frontier --nodes 128
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpctrain.cost import CodecTime, Layer, Link, Method, Network, predict, site_network
from hpctrain.cost import codec as codec_model
from hpctrain.cost.links import DEFAULT_INTRA
from hpctrain.cost.overlap import DEFAULT_OVERLAP, compute_time
from hpctrain.errors import UserError
from hpctrain.h5log import read_log

from hpctrain.compression.registry import COMPRESSORS

METHODS = ("dense", *COMPRESSORS)
# Allgather compressors' wire ratios when nothing can be measured (benchmarks/results/2026-12-01.md,
# gradient-like rows; SignSGD's is 32 by construction).
FALLBACK_RATIOS = {"topk": 50.0, "threshold": 350.0, "adacomp": 250.0, "signsgd": 32.0}
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Profile:
    """What the log (and measurements here) say about the run."""
    path: Path
    world_size: int
    compute_s: float
    steps_used: str
    layers: list[Layer]
    shapes_from: str
    min_numel: int
    fusion_bytes: float
    methods: list[Method] = field(default_factory=list)
    codecs: dict[str, CodecTime] = field(default_factory=dict)


# -- reading the log ------------------------------------------------------------------------------
def _config(attrs: dict[str, Any]):
    from hpctrain.config import config_from_dict

    raw = attrs.get("config")
    try:
        return config_from_dict(json.loads(raw) if isinstance(raw, str) and raw else {})
    except (UserError, ValueError) as exc:
        raise UserError(f"the log's config cannot be read ({exc}); was it written by this hpctrain?") from None


def _layer_sizes(layers: dict[str, np.ndarray], where: str) -> tuple[dict[str, int], int]:
    """numel per parameter name at the last logged step, and that step."""
    if not len(layers.get("step", [])):
        raise UserError(f"{where} has no per-layer rows; rerun with log.layers_every > 0 (e.g. --set log.layers_every=10)")
    last = int(layers["step"].max())
    rows = layers["step"] == last
    return {str(n): int(b) // 4 for n, b in zip(layers["name"][rows], layers["dense_bytes"][rows])}, last


def _shapes(cfg, sizes: dict[str, int]) -> tuple[list[Layer], str]:
    """Rebuild the model on the meta device for the shapes; else treat each gradient as a matrix."""
    try:
        import torch

        from hpctrain.data import load_splits
        from hpctrain.models import build_model

        splits = load_splits(cfg.data, cfg.run.seed)
        with torch.device("meta"):
            model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        if set(shapes) >= set(sizes) and all(math.prod(shapes[n]) == sizes[n] for n in sizes):
            return [Layer(n, shapes[n]) for n in sizes], f"model {cfg.model.name!r} rebuilt from the log's config"
        why = "the rebuilt model's parameters differ from the log's"
    except Exception as exc:       # any failure: data not here, custom model not importable
        why = f"{type(exc).__name__}: {exc}"
    return [Layer(n, _as_matrix(numel)) for n, numel in sizes.items()], f"guessed as matrices ({why})"


def _as_matrix(numel: int) -> tuple[int, ...]:
    rows = max((d for d in range(1, math.isqrt(numel) + 1) if numel % d == 0), default=1)
    return (numel,) if rows == 1 else (rows, numel // rows)


def read_profile(path: Path, skip: int | None) -> tuple[Profile, Any, dict[str, Any]]:
    log = read_log(path)
    steps = log.get("steps", {})
    n = len(steps.get("step", []))
    if n == 0:
        raise UserError(f"log {str(path)!r} has no steps; let the run train a few steps first")
    cfg = _config(log["attrs"])
    skip = min(n - 1, max(1, n // 10) if skip is None else skip)
    compute_s = compute_time(list(steps["step_time_s"]), list(steps["comm_time_s"]), skip)
    sizes, _ = _layer_sizes(log.get("layers", {}), f"log {str(path)!r}")
    layers, shapes_from = _shapes(cfg, sizes)
    profile = Profile(path, int(log["attrs"].get("world_size", 1)), compute_s, f"steps {skip + 1}–{n}",
                      layers, shapes_from, cfg.compression.min_numel, cfg.horovod.fusion_threshold_mb * 2**20)
    return profile, cfg, log


def logged_ratios(log: dict[str, Any], name: str, warmup_steps: int) -> dict[str, float]:
    """Median dense/wire per layer over the log's rows sent with `name` after the dense warm-up."""
    layers = log.get("layers", {})
    if not len(layers.get("step", [])):
        return {}
    keep = (layers["compressor"] == name) & (layers["step"] > warmup_steps)
    out: dict[str, list[float]] = {}
    for layer, ratio in zip(layers["name"][keep], layers["ratio"][keep]):
        out.setdefault(str(layer), []).append(float(ratio))
    return {k: statistics.median(v) for k, v in out.items()}


# -- measuring here -------------------------------------------------------------------------------
def _codec_bench():
    """benchmarks/codec.py's functions (steady state, timing), from the repository checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import codec as bench
    from hpctrain.compression.synthetic import heavy_tailed_grads
    return bench, heavy_tailed_grads


def measure(method: Method, layers: list[Layer], min_numel: int, min_run_time: float) -> tuple[dict[str, float], CodecTime]:
    """Per compressed layer: wire ratio and codec seconds of the compressor on synthetic
    gradient-like data of the layer's shape (steady state, one rank); clone time for the scatter."""
    import torch

    bench, heavy_tailed_grads = _codec_bench()
    ratios, total, clone_per_byte = {}, 0.0, []
    threads = torch.get_num_threads()
    for layer in layers:
        chosen = method.policy(min_numel).resolve(layer.name, torch.empty(layer.shape, device="meta"))
        if chosen is None or chosen.name == "none":
            continue
        pool = heavy_tailed_grads(layer.shape, 4, torch.Generator().manual_seed(0))
        pool += [-g for g in pool]
        one_step, wire_ratio = bench.steady_state_step(chosen, pool)
        seconds, clone_s = bench.best_times([one_step, bench.random_clone(pool)], threads, min_run_time)
        ratios[layer.name] = wire_ratio()
        total += seconds
        clone_per_byte.append(clone_s / layer.dense_bytes)
    gathers = method.compressor is not None and method.compressor.kind == "allgather"
    scatter = codec_model.SCATTER_CLONES * max(clone_per_byte, default=0.0) if gathers else 0.0
    return ratios, CodecTime(total, scatter, f"measured here ({threads} threads)")


def build_methods(cfg, log: dict[str, Any], profile: Profile, names: list[str], measure_here: bool,
                  min_run_time: float, memory_gbs: float) -> None:
    from hpctrain.compression.registry import build

    for name in names:
        compressor = None if name == "dense" else build(name, cfg.compression.options.get(name))
        method = Method(name, compressor)
        gathers = compressor is not None and compressor.kind == "allgather"
        if gathers:
            method.ratios = logged_ratios(log, name, cfg.compression.warmup_steps)
            method.source = "ratio measured in the log" if method.ratios else ""
        if compressor is not None and measure_here:
            ratios, codec = measure(method, profile.layers, profile.min_numel, min_run_time)
            profile.codecs[name] = codec
            if gathers and not method.ratios:
                method.ratios, method.source = ratios, "ratio simulated on synthetic gradients of the layer shapes"
        elif compressor is not None:
            profile.codecs[name] = codec_model.modelled(method, profile.layers, memory_gbs * 1e9, profile.min_numel)
        if gathers:
            method.default_ratio = FALLBACK_RATIOS.get(name, 32.0)
            method.source = method.source or f"ratio assumed {method.default_ratio:g}× (benchmarks/results)"
        elif name == "lowrank":
            method.source = f"exact from the shapes (rank {compressor.rank}, {compressor.power_iterations} power iteration(s))"
        profile.methods.append(method)


# -- the networks to predict for ---------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--ranks {text!r}: give positive integers separated by commas, e.g. 4,64,1024")
    return values


def networks(args: argparse.Namespace) -> list[tuple[Network, list[int]]]:
    if args.site:
        network = site_network(args.site).with_latency(args.latency_us)
        ranks = _int_list(args.ranks) if args.ranks else [args.nodes * network.ranks_per_node]
        return [(network, ranks)]
    if args.nodes:
        raise UserError("--nodes needs --site (its ranks per node); otherwise give --ranks")
    if args.ranks_per_node < 1:
        raise UserError(f"--ranks-per-node {args.ranks_per_node} must be at least 1")
    intra = Link.parse(args.intra_link) if args.intra_link else DEFAULT_INTRA
    ranks = _int_list(args.ranks or "4,64,1024,8192")
    return [(Network(Link.parse(text.strip(), args.latency_us), intra, args.ranks_per_node, label=text.strip()), ranks)
            for text in (args.link or "1gbit,25gbit,200gbit").split(",") if text.strip()]


# -- printing -----------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def table(profile: Profile, network: Network, ranks: int, overlap: float) -> list[str]:
    both = network.ranks_per_node > 1 and network.nodes(ranks) > 1
    verdicts = {h: predict(profile.methods, profile.layers, profile.compute_s, ranks, network, profile.codecs, h,
                           overlap, profile.min_numel, profile.fusion_bytes) for h in ((False, True) if both else (False,))}
    flat = verdicts[False]
    head = f"{'method':<10} {'step ms':>9} {'× dense':>8}"
    head += f" {'hier ms':>9} {'× dense':>8}" if both else ""
    head += f" {'MB/rank':>9} {'latency':>9} {'bandwidth':>9} {'codec':>8} {'hidden':>8}  collectives"
    lines = [f"P = {ranks} ({network.nodes(ranks)} node(s))", head]
    base = flat.predictions[0].step_s
    for i, p in enumerate(flat.predictions):
        row = f"{p.method:<10} {_ms(p.step_s):>9} {base / p.step_s:>7.2f}×"
        if both:
            h = verdicts[True].predictions[i]
            row += f" {_ms(h.step_s):>9} {base / h.step_s:>7.2f}×"
        row += (f" {p.payload_bytes / 1e6:>9.3g} {_ms(p.latency_s):>9} {_ms(p.bandwidth_s):>9} {_ms(p.codec_s):>8} "
                f"{_ms(p.hidden_s):>8}  {p.collectives} ({p.algorithm or '-'})")
        lines.append(row)
    lines.append(f"winner{' (flat)' if both else ''}: {flat.reason}")
    if both:
        lines.append(f"winner (hierarchical): {verdicts[True].reason}")
    return lines


def report(profile: Profile, nets: list[tuple[Network, list[int]]], overlap: float) -> list[str]:
    params = sum(layer.numel for layer in profile.layers)
    lines = [f"hpctrain advise {profile.path}",
             f"run: world size {profile.world_size}; compute {profile.compute_s * 1e3:.3g} ms/step (median of step − comm "
             f"time over {profile.steps_used}); {len(profile.layers)} gradients, {params:,} parameters "
             f"({params * 4 / 1e6:.3g} MB fp32); shapes {profile.shapes_from}",
             f"model: step = compute + codec + max(0, latency + bandwidth − {overlap:g} × compute); "
             f"times in ms; MB/rank = payload one rank hands to the network per step"]
    for m in profile.methods:
        codec = profile.codecs.get(m.name)
        parts = [m.source] if m.source else []
        if codec is not None:
            parts.append(f"codec {codec.fixed_s * 1e3:.3g} ms/step {codec.source}")
        if parts:
            lines.append(f"  {m.name}: {'; '.join(parts)}")
    for network, ranks_list in nets:
        lines += ["", f"## {network.label or 'network'}: {network.describe()}"]
        for ranks in ranks_list:
            lines += [""] + table(profile, network, ranks, overlap)
    return lines


def _advise(args: argparse.Namespace) -> int:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    names = ["dense"] + [m for m in names if m != "dense"]       # dense is the baseline
    if not 0 <= args.overlap <= 1:
        raise UserError(f"--overlap {args.overlap} must be between 0 and 1")
    nets = networks(args)
    profile, cfg, log = read_profile(args.log, args.skip_steps)
    build_methods(cfg, log, profile, names, not args.no_measure, args.min_run_time, args.memory_gbs)
    print("\n".join(report(profile, nets, args.overlap)))
    return 0


def panel(log: Path, ranks: str = "4,64,1024,8192", link: str = "1gbit,25gbit,200gbit", ranks_per_node: int = 1,
          overlap: float = DEFAULT_OVERLAP, measure_here: bool = False) -> str:
    """The advice for `hpctrain report`: the CLI's tables as plain text. By default codec times are
    modelled and missing ratios assumed (`--no-measure`), so a report renders in well under a
    second; errors (no per-layer rows, ...) become its text."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(log), "--ranks", ranks, "--link", link, "--ranks-per-node", str(ranks_per_node),
                              "--overlap", str(overlap), *([] if measure_here else ["--no-measure"])])
    try:
        profile, cfg, log_data = read_profile(args.log, args.skip_steps)
        build_methods(cfg, log_data, profile, list(METHODS), measure_here, args.min_run_time, args.memory_gbs)
        body = "\n".join(report(profile, networks(args), overlap))
    except UserError as exc:
        body = f"no advice: {exc}"
    return body


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="log.h5 of a short run (`hpctrain train`)")
    parser.add_argument("--ranks", help="comma-separated world sizes (default 4,64,1024,8192; with --site: nodes × ranks per node)")
    parser.add_argument("--link", help="comma-separated inter-node rates (default 1gbit,25gbit,200gbit)")
    parser.add_argument("--latency-us", type=float, help="inter-node latency per step in µs (default by rate: 50, 10 or 5)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing a node's NICs (default 1)")
    parser.add_argument("--intra-link", help=f"rate between ranks of a node (default {DEFAULT_INTRA})")
    parser.add_argument("--site", help="a site of jobs/sites/ with a [links] table (frontier, perlmutter, summit)")
    parser.add_argument("--nodes", type=int, help="with --site: how many nodes")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help=f"fraction of compute that can hide communication (default {DEFAULT_OVERLAP})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--skip-steps", type=int, help="set-up steps left out of the compute time (default 10%%, at least 1)")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not time codecs or simulate ratios here: use modelled codec times and assumed ratios")
    parser.add_argument("--min-run-time", type=float, default=0.15, help="seconds of timing per codec and layer (default 0.15)")
    parser.add_argument("--memory-gbs", type=float, default=1500.0,
                        help="device memory bandwidth in GB/s for modelled codec times (default 1500, an A100)")
    parser.set_defaults(func=_advise)
