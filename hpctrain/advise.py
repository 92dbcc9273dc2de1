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

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpctrain.compression.registry import build
from hpctrain.commands.advise import METHODS   # the options live in a light module, for --help
from hpctrain.cost import CodecTime, Fusion, Layer, Link, Method, Network, predict, site_network
from hpctrain.cost import codec as codec_model
from hpctrain.cost.links import DEFAULT_INTRA
from hpctrain.cost.overlap import DEFAULT_OVERLAP, compute_time
from hpctrain.config import config_from_dict
from hpctrain.data import load_splits
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.models import build_model

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
    engine: str              # "horovod" or "torch": how it fuses collectives (`Fusion`)
    fusion: Fusion
    methods: list[Method] = field(default_factory=list)
    codecs: dict[str, CodecTime] = field(default_factory=dict)


# -- reading the log ------------------------------------------------------------------------------
def _config(attrs: dict[str, Any]):
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
    engine = str(log["attrs"].get("engine") or (cfg.dist.backend if cfg.dist.backend != "auto" else "horovod"))
    buffer_mb = cfg.horovod.fusion_threshold_mb if engine == "horovod" else cfg.dist.bucket_mb
    profile = Profile(path, int(log["attrs"].get("world_size", 1)), compute_s, f"steps {skip + 1}–{n}",
                      layers, shapes_from, cfg.compression.min_numel, engine, Fusion.of(engine, buffer_mb * 2**20))
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


def logged_codec_s(log: dict[str, Any], warmup_steps: int) -> float | None:
    """Median seconds per step the run spent in compressor code after its dense warm-up (the
    steps' codec_time_s); None for logs written before that column."""
    steps = log.get("steps", {})
    codec = steps.get("codec_time_s")
    if codec is None:
        return None
    kept = [float(c) for s, c in zip(steps["step"], codec) if s > warmup_steps and math.isfinite(c)]
    return statistics.median(kept) if kept else None


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
        logged = logged_codec_s(log, cfg.compression.warmup_steps) if name == cfg.compression.name else None
        if logged is not None:      # the run itself used this compressor: its own time beats any other
            profile.codecs[name] = CodecTime(logged, profile.codecs[name].per_received_byte_s,
                                             f"measured in the log at P={profile.world_size}")
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


@dataclass(frozen=True)
class AdviseOptions:
    """What `hpctrain advise` is asked (its options, typed; see hpctrain/commands/advise.py)."""
    log: Path
    ranks: str | None = None             # comma-separated world sizes
    link: str | None = None              # comma-separated inter-node rates
    latency_us: float | None = None
    ranks_per_node: int = 1
    intra_link: str | None = None
    site: str | None = None
    nodes: int | None = None
    overlap: float = DEFAULT_OVERLAP
    methods: str = ",".join(METHODS)
    skip_steps: int | None = None
    measure: bool = True                 # time codecs and simulate ratios here (else model and assume)
    min_run_time: float = 0.15
    memory_gbs: float = 1500.0


def networks(opts: AdviseOptions) -> list[tuple[Network, list[int]]]:
    if opts.site:
        network = site_network(opts.site).with_latency(opts.latency_us)
        ranks = _int_list(opts.ranks) if opts.ranks else [opts.nodes * network.ranks_per_node]
        return [(network, ranks)]
    if opts.nodes:
        raise UserError("--nodes needs --site (its ranks per node); otherwise give --ranks")
    if opts.ranks_per_node < 1:
        raise UserError(f"--ranks-per-node {opts.ranks_per_node} must be at least 1")
    intra = Link.parse(opts.intra_link) if opts.intra_link else DEFAULT_INTRA
    ranks = _int_list(opts.ranks or "4,64,1024,8192")
    return [(Network(Link.parse(text.strip(), opts.latency_us), intra, opts.ranks_per_node, label=text.strip()), ranks)
            for text in (opts.link or "1gbit,25gbit,200gbit").split(",") if text.strip()]


# -- printing -----------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def table(profile: Profile, network: Network, ranks: int, overlap: float) -> list[str]:
    both = network.ranks_per_node > 1 and network.nodes(ranks) > 1
    verdicts = {h: predict(profile.methods, profile.layers, profile.compute_s, ranks, network, profile.codecs, h,
                           overlap, profile.min_numel, profile.fusion) for h in ((False, True) if both else (False,))}
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
             f"({params * 4 / 1e6:.3g} MB fp32); shapes {profile.shapes_from}; {profile.engine} engine: "
             f"allreduces fused into {profile.fusion.buffer_bytes / 2**20:g} MB buffers, allgathers "
             f"{'fused too' if profile.fusion.allgathers else 'one per layer'}",
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


def advise(opts: AdviseOptions) -> str:
    """The advice for `opts`, as `hpctrain advise` prints it."""
    names = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"--methods {opts.methods!r}: choose from {', '.join(METHODS)}")
    names = ["dense"] + [m for m in names if m != "dense"]       # dense is the baseline
    if not 0 <= opts.overlap <= 1:
        raise UserError(f"--overlap {opts.overlap} must be between 0 and 1")
    nets = networks(opts)
    profile, cfg, log = read_profile(opts.log, opts.skip_steps)
    build_methods(cfg, log, profile, names, opts.measure, opts.min_run_time, opts.memory_gbs)
    return "\n".join(report(profile, nets, opts.overlap))


def panel(log: Path, ranks: str = "4,64,1024,8192", link: str = "1gbit,25gbit,200gbit", ranks_per_node: int = 1,
          overlap: float = DEFAULT_OVERLAP, measure_here: bool = False) -> str:
    """The advice for `hpctrain report`: the CLI's tables as plain text. By default codec times are
    modelled and missing ratios assumed (`--no-measure`), so a report renders in well under a
    second; errors (no per-layer rows, ...) become its text."""
    try:
        return advise(AdviseOptions(Path(log), ranks, link, ranks_per_node=ranks_per_node, overlap=overlap,
                                    measure=measure_here))
    except UserError as exc:
        return f"no advice: {exc}"
