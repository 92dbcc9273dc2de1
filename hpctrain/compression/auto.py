"""`compression.name = "auto"`: measure after the dense warm-up, let the cost model pick per layer.

At a decision (the first step after the warm-up, and again whenever the global batch changes,
which changes the compute to communication ratio) every rank calls `AutoCompression.decide`;
rank 0 alone measures:

- compute seconds per step (the caller's timings: step time − exchange time);
- each candidate's wire ratio and codec seconds on this rank's *real* gradients of each layer
  (`measure_layers`: the compressor's own code through `simulate`, timed; on CPUs scaled by
  `cpu_share`, as the node's ranks run their codecs at once on its cores);
- the inter-node link (`compression.link`: a rate, or "auto": `probe_link`, two allreduces
  timed on every rank);
- at the first decision, what the last dense step waited on its exchange: the model is fitted
  to it (`fit_to_dense`: the link scaled, or the overlap with backward fitted) so that it
  predicts the dense step the run really took, and later decisions keep that fit;

and picks per layer (`choose`) by the model of `hpctrain.cost` for the current world size:
per layer the candidate that adds the least exchange + codec seconds (a collective the engine
fuses into a running round adds no α terms: `Fusion`), or BYPASS (dense fp32 in the allreduce
that carries the small tensors and the non-finite flags after backward anyway), the plan priced
as `hpctrain advise` prices a method (`exchange_cost`, `hidden_s`), flat or hierarchical on
several nodes — unless dense communication hides behind backward altogether, when dense
everywhere wins (codecs cost time, hidden bytes do not). The choice (layer name → candidate
name or BYPASS, and the layout) is broadcast, and every rank rebuilds its
per-parameter compressors (`DistributedOptimizer.set_compressors`: residuals of layers whose
compressor changes go into their next gradient, so nothing is lost). `decide` returns the event
row the trainer logs in the step log's `events` group, its reason naming the choice.

The model can be wrong (per-collective overheads it does not describe, a busy machine), so the
first decision is settled by measurement, as an autotuner would: the model's plan and up to
TRIAL_PLANS − 1 alternatives (each candidate placed as its fixed method would place it — on every
layer it applies to, the bypass elsewhere — if the model puts that within TRIAL_WINDOW of its
plan: `alternatives`) run `compression.check_steps` steps each, one after the other, and the
fastest measured stays — or dense, when even that is slower than the dense steps of the warm-up
at the same global batch by more than CHECK_TOLERANCE. When the fastest and those dense steps
are within TRIAL_WINDOW of each other, either way, dense runs `check_steps` steps again beside
the plans (the warm-up has few dense steps, and they come first in the run, when steps are
slowest, or on a busy machine happen to be quick) and the fastest of all stays, dense included.
When the two fastest measured are within CONFIRM_WINDOW of each other, both run `check_steps`
steps once more and each is judged by the median of all its steps: on a busy machine a few
steps' medians differ by more than the plans do, and the lowest of several noisy medians is
more often luck than speed. Each switch is an `events` row; the last names
every plan's measured step.

The trainer's part: `auto = auto_from_config(cfg.compression, comm.local_size())`, then
`auto.attach(optimizer)` once and, after each step, `row = auto.step_done(step, global_batch,
step_s, comm_s)`, appending `row` to `events` when it is not None.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import torch

from hpctrain import comm
from hpctrain.compression import registry
from hpctrain.compression.base import Compressor, ParamState, simulate
from hpctrain.compression.policy import DENSE
from hpctrain.cost.links import Link, Network
from hpctrain.cost.methods import HOROVOD_FUSION, Fusion, Op, exchange_cost
from hpctrain.cost.overlap import DEFAULT_OVERLAP
from hpctrain.cost.prediction import hidden_s

CANDIDATES = ("none", "fp16", "adacomp", "threshold", "lowrank")
BYPASS = "bypass"         # a layer's other placement: dense fp32 in the fused allreduce after backward
CHECK_TOLERANCE = 0.05    # the fastest plan measured slower than dense by more than this: back to dense
TRIAL_PLANS = 5           # plans measured at the first decision: the model's and up to one per other candidate
TRIAL_WINDOW = 1.5        # an alternative is measured when predicted within this factor of the model's plan
CONFIRM_WINDOW = 1.2      # the two fastest measured within this factor: both are measured once more
PROBE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class LayerCost:
    """One candidate on one layer, measured: bytes this rank sends, the collective of its first
    round, codec seconds, and the bytes of each later round (LowRank's Q: an allreduce that waits
    for the first); `applies` False: the compressor does not take this shape (the layer would ride
    the bypass); `round`: "bypass" for the placement BYPASS."""
    wire_bytes: float
    kind: str
    codec_s: float
    applies: bool = True
    later_rounds: tuple[float, ...] = ()
    round: str = "grad"

    def ops(self, dense_bytes: float) -> list[Op]:
        """Its collectives for the cost model: the first round rides the step's gradient round
        (launched as the layer's gradient is ready, fused with the other layers') or the bypass,
        each later round a round of its own."""
        first = Op(self.kind, self.wire_bytes - sum(self.later_rounds), dense_bytes, self.round)
        return [first] + [Op("allreduce", nbytes, 0.0, f"round{i}") for i, nbytes in enumerate(self.later_rounds, 1)]


@dataclass
class Measured:
    """What a decision needs: compute per step, every candidate's cost on every layer, (at the
    first decision) what the step waited on its dense exchange, how the engine fuses, and the
    bytes the bypass carries whatever the plan (the small tensors, every rank's non-finite flag)."""
    compute_s: float
    layers: dict[str, dict[str, LayerCost]] = field(default_factory=dict)   # layer → candidate → cost
    waited_s: float | None = None
    fusion: Fusion = HOROVOD_FUSION
    bypass_bytes: float = 0.0

    def __post_init__(self) -> None:
        # Where each layer can go (each candidate that takes its shape, and BYPASS): read by every
        # plan the model prices, so built once.
        self._options = {layer: {**{cand: cost for cand, cost in costs.items() if cost.applies},
                                 BYPASS: LayerCost(costs["none"].wire_bytes, "allreduce", 0.0, round="bypass")}
                         for layer, costs in self.layers.items()}

    def options(self, layer: str) -> dict[str, LayerCost]:
        """Where `layer` can go: each candidate that takes its shape, and BYPASS."""
        return self._options[layer]


@dataclass(frozen=True)
class Fit:
    """The model corrected by a measured dense step: exchange seconds × `scale` (the link is
    slower than probed or given), and the fraction `overlap` of compute that hides them."""
    scale: float = 1.0
    overlap: float = DEFAULT_OVERLAP

    def describe(self) -> str:
        return f"exchange ×{self.scale:.2g}, overlap {self.overlap:.2f}"


@dataclass(frozen=True)
class Choice:
    per_layer: dict[str, str]       # layer name → candidate name ("none": dense fp32)
    predicted_step_s: float
    dense_step_s: float
    reason: str
    hierarchical: bool = False      # allgather compressors run hierarchically (several nodes)
    fit: Fit = Fit()                # kept for the decisions after the first

    @classmethod
    def dense(cls, layers: Iterable[str], step_s: float, reason: str, fit: Fit) -> Choice:
        """Dense fp32 on every layer, its step `step_s` (predicted or measured)."""
        return cls({layer: "none" for layer in layers}, step_s, step_s, reason, fit=fit)


def build_candidates(names: tuple[str, ...] = CANDIDATES,
                     options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Compressor | None]:
    """The compressors `auto` chooses among, with the run's `[compression.NAME]` options."""
    return {name: registry.build(name, (options or {}).get(name)) for name in names}


def cpu_share(local_ranks: int, grads: Mapping[str, torch.Tensor]) -> float:
    """How much slower a codec runs in the job than when timed alone: on CPUs, the node's ranks
    run theirs at once on its cores (1 on GPUs: each rank has its own)."""
    if any(g.is_cuda for g in grads.values()):
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1.0, local_ranks * torch.get_num_threads() / cores)


def measure_layers(grads: Mapping[str, torch.Tensor], candidates: Mapping[str, Compressor | None],
                   repeats: int = 2, share: float = 1.0) -> dict[str, dict[str, LayerCost]]:
    """Each candidate on each real gradient: bytes of its payloads and the best of `repeats`
    timed encode + decode (one rank, `simulate`, fresh state: error feedback starting empty),
    times `share` (`cpu_share`)."""
    out: dict[str, dict[str, LayerCost]] = {}
    for name, grad in grads.items():
        costs = {}
        for cand, compressor in candidates.items():
            if compressor is None or not compressor.applies_to(grad.shape):
                costs[cand] = LayerCost(grad.numel() * 4, "allreduce", 0.0, applies=compressor is None)
                continue
            best, rounds = float("inf"), []
            for _ in range(repeats):
                rounds = []
                start = time.perf_counter()
                simulate(compressor, [grad], [ParamState(name)], rounds)
                best = min(best, time.perf_counter() - start)
            costs[cand] = LayerCost(sum(r[0].nbytes for r in rounds), rounds[0][0].kind, best * share,
                                    later_rounds=tuple(float(r[0].nbytes) for r in rounds[1:]))
        out[name] = costs
    return out


def _plan_ops(measured: Measured, per_layer: Mapping[str, str]) -> list[Op]:
    """The step's collectives when each layer sends with its candidate in `per_layer` (and the
    bypass, which always runs)."""
    always = [Op("allreduce", measured.bypass_bytes, measured.bypass_bytes, "bypass")] if measured.bypass_bytes else []
    return [op for layer, cand in per_layer.items()
            for op in measured.options(layer)[cand].ops(measured.layers[layer]["none"].wire_bytes)] + always


def _dense_exchange_s(measured: Measured, ranks: int, network: Network) -> float:
    """The modelled seconds of sending every measured layer dense (fp32, flat, fused)."""
    dense = _plan_ops(measured, {layer: "none" for layer in measured.layers})
    return exchange_cost(dense, ranks, network, fusion=measured.fusion)[0].seconds


def _without_latency(network: Network) -> Network:
    """`network` with its α terms at zero: what a collective costs that joins a running round."""
    return replace(network, inter=replace(network.inter, latency_s=0.0), intra=replace(network.intra, latency_s=0.0))


def _added_s(cost: LayerCost, dense_bytes: float, ranks: int, network: Network, free: Network, hierarchical: bool,
             fusion: Fusion) -> float:
    """What one more layer sending `cost` adds to the step's exchange: the bandwidth of each of its
    collectives, and the α terms of those that go alone (a fused one joins a running round, priced
    on `free`: `_without_latency(network)`)."""
    seconds = 0.0
    for op in cost.ops(dense_bytes):
        alone = op.kind == "allgather" and (hierarchical or not fusion.allgathers)
        seconds += exchange_cost([op], ranks, network if alone else free, hierarchical, fusion)[0].seconds
    return seconds


def fit_to_dense(measured: Measured, ranks: int, network: Network, overlap: float = DEFAULT_OVERLAP) -> Fit:
    """Make the model reproduce the dense step the run waited on: a longer wait than the modelled
    exchange means a slower link (scale it, nothing hidden), a shorter one that compute hid the
    difference (fit the overlap). Without a measured wait: the model as it is."""
    modelled = _dense_exchange_s(measured, ranks, network)
    if measured.waited_s is None or modelled <= 0.0:
        return Fit(1.0, overlap)
    if measured.waited_s >= modelled:
        return Fit(measured.waited_s / modelled, 0.0)
    return Fit(1.0, min(1.0, (modelled - measured.waited_s) / max(measured.compute_s, 1e-9)))


def _plan(measured: Measured, ranks: int, network: Network, hierarchical: bool, fit: Fit,
          only: str | None = None) -> tuple[dict[str, str], float]:
    """Per layer the candidate (or BYPASS) that adds the least exchange + codec seconds, then, one
    layer at a time, whichever makes the whole plan's predicted step shortest (a round's α terms
    are paid once, by whichever layers are in it), until no change helps; the plan and its
    predicted step. With `only`: that candidate wherever it applies and the bypass elsewhere, as
    the fixed method's policy places them."""
    per_layer, free = {}, _without_latency(network)
    for layer, costs in measured.layers.items():
        if only is not None:
            per_layer[layer] = only if costs[only].applies else BYPASS
            continue
        dense_bytes = costs["none"].wire_bytes
        seconds = {cand: fit.scale * _added_s(c, dense_bytes, ranks, network, free, hierarchical, measured.fusion)
                   + c.codec_s for cand, c in measured.options(layer).items()}
        per_layer[layer] = min(seconds, key=seconds.get)
    step = predict_step(measured, per_layer, ranks, network, hierarchical, fit)
    improved = only is None
    while improved:
        improved = False
        for layer in measured.layers:
            for cand in measured.options(layer):
                trial = {**per_layer, layer: cand}
                trial_step = predict_step(measured, trial, ranks, network, hierarchical, fit)
                if trial_step < step * (1 - 1e-9):
                    per_layer, step, improved = trial, trial_step, True
    return per_layer, step


def predict_step(measured: Measured, per_layer: Mapping[str, str], ranks: int, network: Network,
                 hierarchical: bool, fit: Fit) -> float:
    """The model's step for a plan (`hpctrain.cost.prediction`'s terms), its exchange × fit.scale."""
    ops, fusion = _plan_ops(measured, per_layer), measured.fusion
    comm_s = fit.scale * exchange_cost(ops, ranks, network, hierarchical, fusion)[0].seconds
    codec_s = sum(measured.options(layer)[cand].codec_s for layer, cand in per_layer.items())
    hidden = hidden_s(ops, measured.compute_s, ranks, network, hierarchical, fit.overlap, fusion, fit.scale)
    return measured.compute_s + codec_s + (comm_s - hidden)      # exactly compute + codec when all hides


def choose(measured: Measured, ranks: int, network: Network, overlap: float = DEFAULT_OVERLAP,
           fit: Fit | None = None) -> Choice:
    """Per layer the candidate of least exchange + codec seconds at `ranks` on `network`, flat or
    hierarchical (on several nodes of several ranks, whichever plan is faster), or dense
    everywhere when dense communication hides behind backward (see the module docstring). The
    model is first fitted to the measured dense wait (`fit_to_dense`) unless `fit` is given."""
    fit = fit or fit_to_dense(measured, ranks, network, overlap)
    dense_comm = fit.scale * _dense_exchange_s(measured, ranks, network)
    dense_step = predict_step(measured, {layer: "none" for layer in measured.layers}, ranks, network, False, fit)
    if dense_step <= measured.compute_s:
        return Choice.dense(measured.layers, dense_step,
                            f"dense everywhere: predicted {dense_step * 1e3:.3g} ms/step; its {dense_comm * 1e3:.3g} ms "
                            f"of communication hides behind {measured.compute_s * 1e3:.3g} ms of compute "
                            f"{_where(ranks, network, fit)}", fit)
    return _laid_out(measured, ranks, network, fit, dense_step)


def _laid_out(measured: Measured, ranks: int, network: Network, fit: Fit, dense_step: float,
              only: str | None = None) -> Choice:
    """The plan (`_plan`) flat or hierarchical, whichever the model finds faster, as a Choice."""
    layouts = [False]
    if network.nodes(ranks) > 1 and min(network.ranks_per_node, ranks) > 1 and not network.shared:
        layouts.append(True)
    plans = {h: _plan(measured, ranks, network, h, fit, only) for h in layouts}
    hierarchical = min(plans, key=lambda h: plans[h][1])
    per_layer, step = plans[hierarchical]
    hierarchical = hierarchical and any(measured.options(n)[c].kind == "allgather" for n, c in per_layer.items())
    counts = _counts(per_layer)
    layout = f", hierarchical over {network.nodes(ranks)} nodes (flat {plans[False][1] * 1e3:.3g} ms)" \
        if hierarchical else ""
    return Choice(per_layer, step, dense_step,
                  f"per layer {counts}{layout}: predicted {step * 1e3:.3g} ms/step vs dense {dense_step * 1e3:.3g} ms "
                  f"{_where(ranks, network, fit)}", hierarchical, fit)


def _where(ranks: int, network: Network, fit: Fit) -> str:
    return f"at P={ranks} on {network.inter} ({fit.describe()})"


def _all_dense(choice: Choice) -> bool:
    return set(choice.per_layer.values()) == {"none"}


def _counts(per_layer: Mapping[str, str]) -> str:
    return ", ".join(f"{cand} ×{n}" for cand, n in Counter(per_layer.values()).most_common())


def alternatives(measured: Measured, ranks: int, network: Network, best: Choice, limit: int = TRIAL_PLANS - 1,
                 window: float = TRIAL_WINDOW) -> list[Choice]:
    """Plans worth measuring beside the model's `best`: each candidate on every layer it applies
    to (the bypass on the others) that the model predicts within `window` × best's step,
    nearest first, at most `limit`; none that repeats a plan already listed."""
    seen, found = [best.per_layer, {layer: "none" for layer in measured.layers}], []     # dense: the warm-up measured it
    for cand in next(iter(measured.layers.values()), {}):
        if cand == "none":
            continue
        plan = _laid_out(measured, ranks, network, best.fit, best.dense_step_s, only=cand)
        if plan.per_layer not in seen and plan.predicted_step_s <= window * best.predicted_step_s:
            seen.append(plan.per_layer)
            found.append(plan)
    return sorted(found, key=lambda c: c.predicted_step_s)[:max(0, limit)]


def probe_link(communicator: Any, nbytes: int = PROBE_BYTES) -> Link:
    """α from a one-float allreduce, bandwidth from a `nbytes` ring allreduce (2(P−1)/P·n bytes
    per rank), best of three each; every rank must call it."""
    ranks = communicator.size

    def best(tensor: torch.Tensor) -> float:
        times = []
        for i in range(3):
            start = time.perf_counter()
            communicator.allreduce_async(tensor, name=f"hpctrain.auto.probe.{tensor.numel()}.{i}").wait()
            times.append(time.perf_counter() - start)
        return min(times)

    small = best(torch.zeros(1))
    large = best(torch.zeros(nbytes // 4))
    steps = max(1, 2 * (ranks - 1))
    latency = small / steps
    moved = 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else nbytes
    return Link(8 * moved / max(large - steps * latency, 1e-9), latency)


class AutoCompression:
    """Decides per layer when due (see the module docstring); one per optimizer."""

    def __init__(self, candidates: Mapping[str, Compressor | None], warmup_steps: int, link: str = "auto",
                 overlap: float = DEFAULT_OVERLAP, ranks_per_node: int = 1, check_steps: int = 4,
                 trial_plans: int = TRIAL_PLANS, trial_window: float = TRIAL_WINDOW):
        self.candidates = dict(candidates)
        self.check_steps = check_steps                # 0: trust the model (see `_trial_done`)
        self.trial_plans, self.trial_window = trial_plans, trial_window
        self.warmup_steps = max(warmup_steps, 3)     # dense steps first: a few, to measure after
        self.link = link
        self.overlap = overlap
        self.ranks_per_node = ranks_per_node
        self.global_batch: int | None = None          # at the last decision
        self.choice: Choice | None = None
        # The first decision settled by measurement (see `step_done`): plans tried one by one.
        self.dense_steps: list[float] = []            # seconds per dense step in the warm-up
        self.trial: list[float] | None = None         # seconds per step with the plan in force, while measuring
        self.trial_from = 0
        self.plans: list[Choice] = []                 # still to measure after the one in force
        self.tried: list[tuple[Choice, list[float]]] = []   # measured: plan, its seconds per step

    def due(self, step: int, global_batch: int) -> bool:
        """Whether to decide at this step boundary (`step`: optimizer steps done)."""
        return step >= self.warmup_steps and (self.choice is None or global_batch != self.global_batch)

    def network(self, communicator: Any) -> Network:
        """The inter-node link (probed or given) and the node layout. On one node the link joins
        the ranks themselves (a probe measures what each rank gets), so it is modelled per rank."""
        inter = probe_link(communicator) if self.link == "auto" else Link.parse(self.link)
        if self.ranks_per_node >= communicator.size:
            return Network(inter, intra=inter, ranks_per_node=1, label=self.link)
        return Network(inter, ranks_per_node=self.ranks_per_node, label=self.link)

    def decide(self, optimizer: Any, grads: Mapping[str, torch.Tensor], compute_s: float, global_batch: int,
               step: int, waited_s: float | None = None) -> dict[str, Any]:
        """Every rank: rank 0 measures `grads` (its own) and chooses, the choice is broadcast,
        every rank sets its compressors. `waited_s`: what the step waited on its dense exchange
        (the first decision fits the model to it; later ones keep that fit). Returns the step
        log's `events` row (its columns as batch growth writes them; `statistic` = predicted
        speedup over dense)."""
        communicator = comm.get()
        network = self.network(communicator)          # collective when probing: every rank
        first = self.choice is None
        measuring = first and self.check_steps > 0 and bool(self.dense_steps)
        plans = None
        if communicator.rank == 0:
            layers = {n: g for n, g in grads.items() if n not in self._small}
            measured = Measured(compute_s, measure_layers(layers, self.candidates,
                                                          share=cpu_share(communicator.local_size, layers)), waited_s,
                                Fusion.of(communicator.engine, communicator.fusion_bytes or None),
                                bypass_bytes=4 * (sum(self._small.values()) + communicator.size))
            choice = choose(measured, communicator.size, network, self.overlap,
                            self.choice.fit if self.choice is not None else None)
            plans = [choice]
            if measuring and not _all_dense(choice):
                plans += alternatives(measured, communicator.size, network, choice, self.trial_plans - 1,
                                      self.trial_window)
        choice, *others = communicator.broadcast_object(plans, root=0, name=f"hpctrain.auto.{step}")
        self._apply(optimizer, choice)
        self.global_batch = global_batch
        if measuring and not _all_dense(choice):
            self.plans, self.tried = others, []
            self._start_trial(step)
        return self._event(step, global_batch, choice.reason, choice.dense_step_s / choice.predicted_step_s)

    def _start_trial(self, step: int) -> None:
        self.trial, self.trial_from = [], step + 2         # the first step after a change pays one-time costs

    def _event(self, step: int, global_batch: int, reason: str, statistic: float) -> dict[str, Any]:
        lr = self._optimizer.param_groups[0]["lr"]
        return {"step": step, "old_batch": global_batch, "new_batch": global_batch, "old_lr": lr, "new_lr": lr,
                "reason": f"compression auto (global batch {global_batch}): {reason}", "statistic": statistic}

    def _trial_done(self, step: int, global_batch: int) -> dict[str, Any] | None:
        """The plan in force has run its `check_steps`: measure the next plan (dense again, or the
        two fastest again, queued here when the verdict is close), or settle on the fastest measured
        (rank 0's step times, broadcast, so every rank settles alike) — dense when that is slower
        than the dense steps of the warm-up (same global batch) by more than CHECK_TOLERANCE, or
        than dense measured again. The model is a model: this is what makes auto never slower than
        dense, nor than the alternatives it measured, for long. An `events` row when the plan changes."""
        communicator = comm.get()
        samples, dense = communicator.broadcast_object(
            (list(self.trial), statistics.median(self.dense_steps)), root=0, name=f"hpctrain.auto.trial.{step}")
        seconds = self._record(self.choice, samples)
        self.trial = None
        medians = self._medians()
        ranked = sorted(medians, key=lambda tried: tried[1])
        fastest = ranked[0][1]
        if not self.plans and not any(_all_dense(c) for c, _ in medians) and \
                max(fastest, dense) <= self.trial_window * min(fastest, dense):
            self.plans.append(Choice.dense(self.choice.per_layer, dense,
                                           f"dense everywhere again (the warm-up's dense steps took {dense * 1e3:.3g} "
                                           f"ms, within {self.trial_window:g}× of the fastest plan's "
                                           f"{fastest * 1e3:.3g} ms)", self.choice.fit))
        if not self.plans and len(ranked) > 1 and ranked[1][1] <= CONFIRM_WINDOW * ranked[0][1] and \
                all(len(times) <= self.check_steps for _, times in self.tried):
            self.plans = [ranked[1][0], ranked[0][0]]       # close: a few noisy steps must not decide it
            return self._next_plan(step, global_batch, f"measuring again {_counts(ranked[1][0].per_layer)} and "
                                   f"{_counts(ranked[0][0].per_layer)}, the two fastest ({ranked[1][1] * 1e3:.3g} and "
                                   f"{ranked[0][1] * 1e3:.3g} ms/step, within {CONFIRM_WINDOW:g}×)")
        if self.plans:
            plan = self.plans[0]
            what = f"again {_counts(plan.per_layer)}" if any(plan == c for c, _ in self.tried) else \
                f"the alternative {plan.reason}"
            return self._next_plan(step, global_batch, f"measuring {what} (the plan before it measured "
                                   f"{seconds * 1e3:.3g} ms/step)")
        remeasured = [s for c, s in medians if _all_dense(c)]
        compressed = [(c, s) for c, s in medians if not _all_dense(c)]
        best, best_s = min(compressed, key=lambda tried: tried[1])
        summary = "; ".join(f"{_counts(c.per_layer)} {s * 1e3:.3g} ms" for c, s in compressed)
        if remeasured:      # side by side with the plans: no tolerance for dense's early steps
            dense, tolerance, which = remeasured[0], 0.0, "measured again"
        else:
            tolerance, which = CHECK_TOLERANCE, "in the warm-up"
        tried, self.tried = len(self.tried), []
        if best_s > (1 + tolerance) * dense:
            keep = Choice.dense(best.per_layer, dense, f"measured {summary} per step vs dense {dense * 1e3:.3g} ms "
                                f"({which}): back to dense everywhere", best.fit)
        elif tried == 1:
            return None                   # the one plan measured no slower than dense: it stays
        else:
            keep = Choice(best.per_layer, best.predicted_step_s, best.dense_step_s,
                          f"keeps {best.reason}; measured {summary} per step vs dense {dense * 1e3:.3g} ms ({which})",
                          best.hierarchical, best.fit)
        if (keep.per_layer, keep.hierarchical) != (self.choice.per_layer, self.choice.hierarchical):
            self._apply(self._optimizer, keep)
        self.choice = keep
        return self._event(step, global_batch, keep.reason, dense / min(best_s, dense))

    def _record(self, plan: Choice, samples: list[float]) -> float:
        """Add a measured plan's step times (to those it already has); the median of `samples`."""
        for tried, times in self.tried:
            if tried == plan:
                times += samples
                return statistics.median(samples)
        self.tried.append((plan, list(samples)))
        return statistics.median(samples)

    def _medians(self) -> list[tuple[Choice, float]]:
        """Every measured plan with the median of all its steps."""
        return [(plan, statistics.median(times)) for plan, times in self.tried]

    def _next_plan(self, step: int, global_batch: int, reason: str) -> dict[str, Any]:
        """Put the next plan to measure in force; its `events` row."""
        plan = self.plans.pop(0)
        self._apply(self._optimizer, plan)
        self._start_trial(step)
        return self._event(step, global_batch, reason, plan.dense_step_s / plan.predicted_step_s)

    # -- the trainer's interface: attach once, then step_done at every step boundary -------------
    def attach(self, optimizer: Any) -> None:
        """Watch `optimizer`'s gradients (a `GradientObserver`): rank 0 keeps a copy of the gradients
        of the step before a decision, its real gradients to measure the codecs on."""
        self._optimizer, self._root, self._armed, self._grads = optimizer, comm.get().rank == 0, False, {}
        self._names = {p: n for g in optimizer.param_groups for p in g["params"]
                       for n in [optimizer._names.get(p)] if n is not None}
        min_numel = optimizer.policy.min_numel       # smaller ones always ride the bypass: numel by name
        self._small = {n: p.numel() for p, n in self._names.items() if p.numel() < min_numel and p.requires_grad}
        self._handle = optimizer.register_gradient_observer(self)

    def before_exchange(self, param: torch.Tensor, grad: torch.Tensor, sqnorm: torch.Tensor) -> None:
        if self._armed and self._root and not grad.is_sparse:
            self._grads[self._names[param]] = grad.detach().clone()

    def after_exchange(self, params: list[torch.Tensor]) -> None:
        pass

    def step_done(self, step: int, global_batch: int, step_s: float, comm_s: float) -> dict[str, Any] | None:
        """After every optimizer step, on every rank (`step`: steps done, `global_batch`: that
        step's). Decides when due and this step's gradients were kept; returns the `events` row
        then, else None. Arms the capture for the next step the same way on every rank."""
        row = None
        dense = self.choice is None               # the steps before the first decision are dense
        if dense and step >= 2:                   # the first step pays the set-up
            self.dense_steps.append(step_s)
        if self.trial is not None and step >= self.trial_from and global_batch == self.global_batch:
            self.trial.append(step_s)
            if len(self.trial) == self.check_steps:
                row = self._trial_done(step, global_batch)
        elif self.trial is not None and global_batch != self.global_batch:
            self.trial, self.plans, self.tried = None, [], []   # a new batch: no dense step to compare with
        if self._armed and self.due(step, global_batch):
            row = self.decide(self._optimizer, self._grads, max(step_s - comm_s, 0.0), global_batch, step,
                              comm_s if dense else None)
        self._grads = {}
        self._armed = self.due(step + 1, global_batch)
        return row

    # -- checkpoints (a torch `Stateful`): a resumed run keeps the choice instead of measuring anew -----
    def state_dict(self) -> dict[str, Any]:
        """The choice in force, the global batch it was made at, and whether the next step's
        gradients are to be kept for a decision (after `attach`)."""
        return {"choice": None if self.choice is None else dict(vars(self.choice)),
                "global_batch": self.global_batch, "armed": self._armed, "dense_steps": list(self.dense_steps),
                "trial": None if self.trial is None else list(self.trial), "trial_from": self.trial_from,
                "plans": [dict(vars(c)) for c in self.plans], "tried": [(dict(vars(c)), list(s)) for c, s in self.tried]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On every rank, after `attach`: the saved choice's compressors from the next step on, so
        load the optimizer's compression state (their residuals and memories) after this."""
        self.global_batch, self._armed = state["global_batch"], bool(state["armed"])
        self.dense_steps, self.trial = list(state.get("dense_steps", [])), state.get("trial")
        self.trial_from = state.get("trial_from", 0)
        self.plans = [Choice(**c) for c in state.get("plans", [])]
        self.tried = [(Choice(**c), list(s) if isinstance(s, list) else [s])    # a median: older checkpoints
                      for c, s in state.get("tried", [])]
        self.choice = None
        if state["choice"] is not None:
            self._apply(self._optimizer, Choice(**state["choice"]))

    def _apply(self, optimizer: Any, choice: Choice) -> None:
        """Every rank: `choice`'s compressors and layout from the next step on."""
        optimizer.set_compressors({n: None if c == BYPASS else DENSE if c == "none" else self.candidates[c]
                                   for n, c in choice.per_layer.items()})
        optimizer.set_hierarchical(choice.hierarchical)
        self.choice = choice


def auto_from_config(cfg: Any, ranks_per_node: int = 1) -> AutoCompression | None:
    """The `[compression]` table's AutoCompression when `name = "auto"`, else None."""
    if cfg.name != "auto":
        return None
    names = tuple(n for n in CANDIDATES if n != "none")
    return AutoCompression({"none": None, **build_candidates(names, cfg.options)}, cfg.warmup_steps, cfg.link,
                           ranks_per_node=ranks_per_node, check_steps=cfg.check_steps, trial_plans=cfg.trial_plans)
