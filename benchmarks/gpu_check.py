"""One command that validates hpctrain on a GPU node: six checks, a report, an exit code.

    python benchmarks/gpu_check.py --out gpu-check            # all six checks (make gpu-check)
    python benchmarks/gpu_check.py --out /tmp/gc --checks 2,5 # a subset, e.g. to rerun one
    CUDA_VISIBLE_DEVICES= python benchmarks/gpu_check.py --out /tmp/gc   # the CPU mode CI runs

Why one command: a GPU node may be lent for minutes, without network, so everything runs in one
prepared go from a bare checkout with the node's own Python (no Horovod: the torch.distributed
engine; no mnist1d: synthetic data of the same shapes). The checks (docs/gpu-check.md explains
each and how to read the output):

  1. correctness   every codec on device tensors (simulated ranks), fp16/bf16 gradients, the
                   DistributedOptimizer with each compressor and fusion mode, the CUDA tests
  2. codec-cost    codec time as a multiple of clone() (CUDA events), bandwidth vs a copy
  3. training      step time of two models, dense vs every compressor, the codec's share
  4. ranks         4 ranks sharing the GPU over Gloo (torchrun): identical parameters, accuracy
  5. fusion        optimizer fusion none / backward / forward: step time and exactness
  6. amp           bf16 and fp16 autocast (fp16 with GradScaler) with every compressor

It writes OUT/gpu_check.md and OUT/gpu_check.json (rewritten after every check, so a run cut
short keeps what it measured) and exits 1 if any check failed. Without CUDA it runs every
check on the CPU with small sizes (about a minute on 2 cores) and says so.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import faulthandler
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

_START = time.perf_counter()          # progress lines count from here, torch's import included

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import codec, fusion  # noqa: E402
from hpctrain import comm  # noqa: E402
from hpctrain.atomic import write_atomic  # noqa: E402
from hpctrain.cli import run_guarded  # noqa: E402
from hpctrain.compression import Policy, policy_from_config  # noqa: E402
from hpctrain.config import COMPRESSOR_NAMES, CompressionConfig  # noqa: E402
from hpctrain.models import CNN1D  # noqa: E402
from hpctrain.optimizer import DistributedOptimizer  # noqa: E402
from tests.mpi_workers import optimizer_checks  # noqa: E402
from tests.test_compression import CONV, FC, WORLD, fresh_states, grads_for, step  # noqa: E402

CHECKS = ("correctness", "codec-cost", "training", "ranks", "fusion", "amp")
STATUSES = ("pass", "fail", "skip")
AIM_X_CLONE = 3.0            # the aim for the memory-bound codecs (AdaComp, Threshold), on the GPU
AIM_ROWS = ("threshold 0.001", "adacomp fc (bins of 500)", "adacomp conv (bins of 50)")
RANKS = 4                    # check 4: ranks sharing the one GPU
RANK_ACCURACY_TOLERANCE = 0.04   # check 4: |cuda - cpu| val accuracy (359 samples: 0.04 is 14 of them)
CLASSES = 10


# -- results --------------------------------------------------------------------------------
@dataclass
class Table:
    """One table of the report: every cell a number, a string or a bool (JSON as is)."""
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class CheckResult:
    """What one check found. `failures` make it fail; `notes` are figures' context and aims."""
    key: str
    title: str
    status: str = "pass"
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    seconds: float = 0.0

    def expect(self, ok: bool, message: str) -> bool:
        """Record `message` as a failure unless `ok`; returns `ok`."""
        if not ok:
            self.failures.append(message)
        return bool(ok)


def run_check(key: str, title: str, body: Callable[[CheckResult], None]) -> CheckResult:
    """Run one check; an exception fails it (with its last line) instead of ending the run, so
    the other checks still report."""
    result = CheckResult(key, title)
    start = time.perf_counter()
    try:
        body(result)
    except Exception as exc:  # any error is a finding to report, not a reason to stop
        traceback.print_exc()
        result.failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
    result.seconds = time.perf_counter() - start
    if result.failures:
        result.status = "fail"
    return result


def verdict(results: list[CheckResult]) -> int:
    """The exit code: 1 if any check failed (a check that ran nothing is a skip, not a pass, but
    not a failure either: the CPU mode has no CUDA to check), else 0."""
    unknown = [r.key for r in results if r.status not in STATUSES]
    if unknown:
        raise ValueError(f"unknown status in check(s) {unknown}")
    return 1 if any(r.status == "fail" or r.failures for r in results) else 0


# -- the run's context ----------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """How big each check runs: the GPU's sizes, or the CPU mode's small ones."""
    big_shape: tuple[int, int]            # 1: the large codec tensor
    fusion_exact_steps: int               # 1: steps of fused vs unfused training per compressor
    fusion_optimizers: tuple[str, ...]    # 1: of optimizer_checks.OPTIMIZERS
    codec_sizes: tuple[int, ...]          # 2: entries, on the device
    cpu_codec_sizes: tuple[int, ...]      # 2: entries, on the CPU beside them (none in CPU mode)
    codec_time_s: float                   # 2: timing per row and statement
    cnn: dict[str, int]                   # 3, 6: CNN1D args
    cnn_batch: int
    resnet_widths: tuple[int, int, int]   # 3: the conv net that keeps the device busy
    image: int
    resnet_batch: int
    train_steps: int                      # 3: timed steps per round
    train_rounds: int
    rank_epochs: int                      # 4
    rank_compressors: tuple[str, ...]
    rank_timeout_s: float
    rank_floor: float                     # 4: val accuracy every run must reach (a sanity floor: digits' chance is 0.1)
    fusion_mlp: tuple[int, int, int]      # 5: width, depth, batch (per benchmarks/fusion.py)
    fusion_steps: int
    fusion_rounds: int
    fusion_compressors: tuple[str, ...]
    amp_steps: int                        # 6
    amp_noise: float
    amp_init_scale: float                 # high on purpose: the first fp16 steps overflow and are skipped
    amp_tolerance: float                  # |accuracy - fp32 accuracy| allowed
    amp_floor: float                      # fp32 accuracy needed for the comparison to mean something


GPU = Profile(big_shape=(1000, 1000), fusion_exact_steps=30, fusion_optimizers=tuple(optimizer_checks.OPTIMIZERS),
              codec_sizes=(10**6, 4 * 10**6, 25 * 10**6, 100 * 10**6), cpu_codec_sizes=(10**6,), codec_time_s=0.3,
              cnn={}, cnn_batch=128, resnet_widths=(128, 256, 512), image=32, resnet_batch=512,
              train_steps=20, train_rounds=3,
              rank_epochs=6, rank_compressors=tuple(COMPRESSOR_NAMES), rank_timeout_s=200, rank_floor=0.85,
              fusion_mlp=(2048, 6, 8), fusion_steps=5, fusion_rounds=6, fusion_compressors=("none", "adacomp"),
              amp_steps=400, amp_noise=2.0, amp_init_scale=2.0**24, amp_tolerance=0.03, amp_floor=0.8)
CPU = Profile(big_shape=(100, 300), fusion_exact_steps=10, fusion_optimizers=("adam",),
              codec_sizes=(10**5, 10**6), cpu_codec_sizes=(), codec_time_s=0.1,
              cnn={"channels": 8, "hidden": 32}, cnn_batch=32, resnet_widths=(8, 16, 32), image=16, resnet_batch=16,
              train_steps=3, train_rounds=2,
              rank_epochs=2, rank_compressors=("adacomp",), rank_timeout_s=150, rank_floor=0.5,
              fusion_mlp=(256, 3, 8), fusion_steps=2, fusion_rounds=3, fusion_compressors=("none",),
              amp_steps=60, amp_noise=1.5, amp_init_scale=2.0**20, amp_tolerance=0.1, amp_floor=0.5)


@dataclass
class Context:
    device: torch.device
    profile: Profile
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        fusion.sync(self.device)


def log(message: str) -> None:
    """A progress line (the main process is rank 0 of a world of one)."""
    print(f"[gpu_check {time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def git_commit() -> str:
    """The checkout's short commit, '+dirty' when it has local changes; 'unknown' without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(ctx: Context, communicator: comm.Communicator) -> dict[str, Any]:
    device = torch.cuda.get_device_name(ctx.device) if ctx.cuda else f"CPU ({os.cpu_count()} cores)"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "git_commit": git_commit(), "device": device,
            "mode": "cuda" if ctx.cuda else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "engine": communicator.describe() + (f" ({communicator.note})" if getattr(communicator, "note", None) else "")}


# -- data and models ------------------------------------------------------------------------
def templates(n: int, shape: tuple[int, ...], noise: float, seed: int, classes: int = CLASSES
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic labelled data of any shape (no downloads on a GPU node): each class a fixed random
    template, each sample its class's template plus Gaussian noise. The templates depend only on
    the shape; `seed` draws the samples."""
    base = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return base[y] + noise * torch.randn(n, *shape, generator=g), y


class _Block(nn.Module):
    """A ResNet basic block (two 3x3 convs, batch norm, identity or 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet-style conv net for 3x32x32 images: enough compute per step to keep a GPU busy,
    and conv kernels for the codecs' conv paths (none of hpctrain's built-in models is 2-D)."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int = CLASSES):
        super().__init__()
        a, b, c = widths
        self.net = nn.Sequential(nn.Conv2d(3, a, 3, 1, 1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
                                 _Block(a, a, 1), _Block(a, b, 2), _Block(b, c, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def wrap(model: nn.Module, name: str, make_base: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
         **kwargs: Any) -> torch.optim.Optimizer:
    """The DistributedOptimizer a run config with `[compression] name = NAME` builds (its defaults)."""
    return DistributedOptimizer(make_base(list(model.parameters())), model.named_parameters(),
                                compression=policy_from_config(CompressionConfig(name=name)), **kwargs)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- 1. correctness -------------------------------------------------------------------------
def check_correctness(ctx: Context, r: CheckResult) -> None:
    """Codecs through `simulate` on device tensors; the optimizer on the device vs the simulated
    exchange (tests/mpi_workers/optimizer_checks.py's check, run here on one rank); fused == unfused;
    the CUDA-marked unit tests."""
    dev, p = ctx.device, ctx.profile
    codecs_table = Table(f"Codecs on {dev.type}: {WORLD} simulated ranks, 3 steps each",
                         ["codec", "shape", "ranks identical", "fp32: max rel. error vs mean of sent",
                          "fp16: same", "bf16: same", "max rel. diff vs CPU", "error feedback: sum in - (sum out + residual)"])
    tolerance = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    for name, make in optimizer_checks.COMPRESSORS.items():
        compressor = make()
        for shape in (CONV, FC, p.big_shape):
            row: list[Any] = [name, "x".join(map(str, shape)), True]
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                states, cpu_states = fresh_states(WORLD), fresh_states(WORLD)
                worst = cpu_diff = 0.0
                for t in range(3):
                    grads = grads_for(shape, WORLD, seed=t, dtype=dtype, device=dev)
                    out, sent = step(compressor, grads, states)
                    row[2] &= all(torch.equal(o, out[0]) for o in out)
                    r.expect(all(o.device == grads[0].device and o.dtype == dtype and o.shape == shape for o in out),
                             f"{name} {shape} {dtype}: decode is not on the gradient's device/dtype/shape")
                    expected = torch.stack(sent).mean(0)
                    worst = max(worst, float((out[0].float() - expected).abs().max()) / max(float(expected.abs().max()), 1e-3))
                    if compressor.error_feedback:
                        r.expect(all(s.residual.device == grads[0].device and s.residual.dtype == torch.float32
                                     and bool(torch.isfinite(s.residual).all()) for s in states),
                                 f"{name} {shape} {dtype}: residual not fp32, finite, on the device")
                    if ctx.cuda and dtype == torch.float32:
                        cpu_out, _ = step(compressor, [g.cpu() for g in grads], cpu_states)
                        scale = max(float(cpu_out[0].abs().max()), 1e-3)
                        cpu_diff = max(cpu_diff, float((out[0].cpu() - cpu_out[0]).abs().max()) / scale)
                tol = max(tolerance[dtype], 1e-3 if name == "fp16" else 0.0)
                r.expect(worst <= tol, f"{name} {shape} {dtype}: average is {worst:.3g} (relative) off the mean of "
                                       f"what the ranks sent (tolerance {tol:g})")
                row.append(worst)
                if dtype == torch.float32:
                    fp32_cpu_diff = cpu_diff
            r.expect(row[2], f"{name} {shape}: simulated ranks decoded different averages")
            row.append(fp32_cpu_diff if ctx.cuda else None)
            if ctx.cuda and shape != p.big_shape:      # selection at the threshold may flip on big tensors: reported only
                r.expect(fp32_cpu_diff <= 1e-4, f"{name} {shape}: CUDA result {fp32_cpu_diff:.3g} (relative) off the CPU's")
            row.append(conservation(compressor, shape, dev) if compressor.error_feedback else None)
            if row[-1] is not None:
                r.expect(row[-1] <= 1e-4, f"{name} {shape}: error feedback lost {row[-1]:.3g} (relative) over 12 steps")
            codecs_table.rows.append(row)
    r.tables.append(codecs_table)
    log("1. codecs done; the optimizer against the simulated exchange")

    exchange = Table("DistributedOptimizer on one rank vs simulate (2 steps fp32, 1 step fp16/bf16): "
                     "stored averages, residuals, wire bytes", ["compressor", "dtype", "ok"])
    for name, make in optimizer_checks.COMPRESSORS.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = optimizer_checks.make_model(dtype).to(dev)
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                       compression=Policy(default=make(), min_numel=optimizer_checks.MIN_NUMEL))
            tol = max(tolerance[dtype], 1e-3 if name == "fp16" else 1e-5)
            ok = True
            try:
                with warnings.catch_warnings():      # check_one_step calls step() after synchronize(), on purpose
                    warnings.filterwarnings("ignore", "optimizer.step.. called without optimizer.skip_synchronize")
                    for s in range(2 if dtype == torch.float32 else 1):
                        x, y = optimizer_checks.batch(s, dtype)
                        optimizer_checks.check_one_step(f"{name}/{dtype}/step{s}", model, opt,
                                                        [(x.to(dev), y.to(dev))], tol)
            except AssertionError as exc:
                ok = r.expect(False, str(exc))
            opt.remove_hooks()
            exchange.rows.append([name, str(dtype).removeprefix("torch."), ok])
    r.tables.append(exchange)
    log("1. exchange done; fused vs unfused")

    fused = Table(f"Fused == unfused: {p.fusion_exact_steps} steps with a step LR schedule, max |param - unfused param|",
                  ["compressor", "optimizer", "backward", "forward"])
    for name in optimizer_checks.COMPRESSORS:
        for optimizer in p.fusion_optimizers:
            final = fused_vs_unfused(name, optimizer, dev, p.fusion_exact_steps)
            row = [name, optimizer] + [max_diff(final[f], final["none"]) for f in ("backward", "forward")]
            r.expect(max(row[2:]) <= 1e-6, f"fusion {name} {optimizer}: fused updates {max(row[2:]):.3g} away from unfused")
            fused.rows.append(row)
    r.tables.append(fused)
    if ctx.cuda:
        log("1. fused done; the CUDA unit tests (pytest)")
        r.tables.append(cuda_unit_tests(r))
    else:
        r.notes.append("The CUDA-marked unit tests (tests/test_compression.py -k cuda) skip without CUDA: not run.")


def conservation(compressor: Any, shape: tuple[int, ...], device: torch.device) -> float:
    """World of one, 12 steps: |sum of gradients - (sum of decoded + final residual)|, relative."""
    states = fresh_states(1)
    total_in = torch.zeros(shape, device=device)
    total_out = torch.zeros(shape, device=device)
    for t in range(12):
        (g,) = grads_for(shape, 1, seed=100 + t, device=device)
        (out,), _ = step(compressor, [g], states)
        total_in += g
        total_out += out
    return float((total_out + states[0].residual - total_in).abs().max()) / float(total_in.abs().max())


def fused_vs_unfused(name: str, optimizer: str, device: torch.device, steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """optimizer_checks.train on `device`: one model per fusion mode in lockstep, final parameters.
    The modes' parameters share names (LowRank seeds its first Q by name): the torch engine
    matches collectives by order, not name, so optimizers in flight together need no prefix."""
    runs = []
    for mode in optimizer_checks.FUSIONS:
        model = optimizer_checks.make_model().to(device)
        opt = DistributedOptimizer(optimizer_checks.OPTIMIZERS[optimizer](list(model.parameters())),
                                   model.named_parameters(),      # same names: LowRank seeds its start by name
                                   compression=Policy(default=optimizer_checks.COMPRESSORS[name](),
                                                      min_numel=optimizer_checks.MIN_NUMEL), fusion=mode)
        runs.append((mode, model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)))
    for s in range(steps):
        x, y = (t.to(device) for t in optimizer_checks.batch(s))
        for _, model, opt, schedule in runs:
            optimizer_checks.loss_of(model, x, y).backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
    final = {}
    for mode, model, opt, _ in runs:
        opt.flush()
        opt.remove_hooks()
        final[mode] = params_of(model)
    return final


def cuda_unit_tests(r: CheckResult) -> Table:
    """tests/test_compression.py -k cuda with this Python (they skip everywhere else)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_compression.py", "-k", "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    r.expect(proc.returncode == 0 and counts.get("passed", 0) > 0,
             f"pytest tests/test_compression.py -k cuda: {summary}" + (f"\n{proc.stdout[-2000:]}" if proc.returncode else ""))
    return Table("CUDA unit tests: pytest tests/test_compression.py -k cuda", ["passed", "failed", "skipped", "exit code", "summary"],
                 [[counts.get("passed", 0), counts.get("failed", 0), counts.get("skipped", 0), proc.returncode, summary]])


# -- 2. codec cost --------------------------------------------------------------------------
def event_times(statements: list[Callable[[], Any]], budget_s: float) -> list[float]:
    """Fastest seconds per call of each statement on the GPU, by CUDA events around a run of calls,
    in alternation (as codec.best_times does on the CPU): host syncs inside a codec count, as
    they stall the stream in training too."""
    counts = []
    for run in statements:
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        counts.append(max(1, min(500, int(budget_s / codec.ROUNDS / max(time.perf_counter() - start, 1e-6)))))
    best = [math.inf] * len(statements)
    for _ in range(codec.ROUNDS):
        for i, (run, n) in enumerate(zip(statements, counts)):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            for _ in range(n):
                run()
            end.record()
            end.synchronize()
            best[i] = min(best[i], begin.elapsed_time(end) / 1e3 / n)
    return best


def codec_table(device: torch.device, sizes: tuple[int, ...], budget_s: float) -> Table:
    """benchmarks/codec.py's rows (gradient-like data) timed on `device`: CUDA events on a GPU,
    codec.best_times on the CPU."""
    how = "CUDA events" if device.type == "cuda" else f"torch.utils.benchmark, {torch.get_num_threads()} threads"
    table = Table(f"Codec time on {device.type} ({how}): compensate + encode + decode of one rank's gradient, "
                  "gradient-like data, steady state",
                  ["size (M entries)", "codec", "time (us)", "x clone", "wire ratio (x)", "clone-equivalent GB/s",
                   "% of copy bandwidth"])
    for numel in sizes:
        pool = codec.gradient_pool(numel, "gradient-like", torch.Generator().manual_seed(0), device)
        rows, clone_best = [], math.inf
        for label, compressor, layout in codec.codecs():
            one_step, wire_ratio = codec.steady_state_step(compressor, pool if layout == "fc" else
                                                           [g.view(-1, 100, 10) for g in pool])
            statements = [one_step, codec.random_clone(pool)]
            seconds, clone_s = (event_times(statements, budget_s) if device.type == "cuda" else
                                codec.best_times(statements, torch.get_num_threads(), budget_s))
            rows.append((label, seconds, wire_ratio()))
            clone_best = min(clone_best, clone_s)
        copy_bytes = 2 * 4 * numel            # a clone reads and writes every fp32 entry once
        table.rows.append([numel / 1e6, "clone()", clone_best * 1e6, 1.0, None, copy_bytes / clone_best / 1e9, 100.0])
        for label, seconds, ratio in rows:
            table.rows.append([numel / 1e6, label, seconds * 1e6, seconds / clone_best, ratio,
                               copy_bytes / seconds / 1e9, 100 * clone_best / seconds])
        del pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"2. codecs timed at {numel / 1e6:g}M entries on {device.type}")
    return table


def check_codec_cost(ctx: Context, r: CheckResult) -> None:
    """Device figures (with the CPU's beside them on a GPU node) and the aim for the memory-bound codecs."""
    p = ctx.profile
    table = codec_table(ctx.device, p.codec_sizes, p.codec_time_s)
    r.tables.append(table)
    if p.cpu_codec_sizes:
        r.tables.append(codec_table(torch.device("cpu"), p.cpu_codec_sizes, p.codec_time_s))
    for size, label, us, ratio, *_ in table.rows:
        r.expect(math.isfinite(us) and us > 0, f"{label} at {size:g}M: no valid time")
    if not ctx.cuda:
        r.notes.append(f"The aim (AdaComp and Threshold <= {AIM_X_CLONE:g}x clone) is for the GPU; "
                       "benchmarks/codec.py gives the CPU figures at full size.")
        return
    for size, label, us, ratio, wire, gbs, pct in table.rows:
        if label in AIM_ROWS and size >= 4:       # below 4M a GPU ratio measures launch latency (report us too)
            met = "met" if ratio <= AIM_X_CLONE else "NOT met"
            r.notes.append(f"aim {met}: {label} at {size:g}M entries is {ratio:.2f}x clone ({us:.0f} us; "
                           f"{gbs:.0f} GB/s clone-equivalent = {pct:.0f}% of the copy bandwidth)")


# -- 3. training step time ------------------------------------------------------------------
def step_time(model: nn.Module, name: str, batches: list[tuple[torch.Tensor, torch.Tensor]], ctx: Context,
              steps: int, rounds: int) -> tuple[float, float, float, float]:
    """(seconds per step, seconds per step in synchronize(), wire ratio, last loss) of SGD with
    compressor `name` (the run config's defaults), the fastest of `rounds` rounds after warm-up."""
    opt = wrap(model, name, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    k = 0

    def one() -> torch.Tensor:
        nonlocal k
        x, y = batches[k % len(batches)]
        k += 1
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for _ in range(3):
        one()
    best = (math.inf, 0.0, 0.0)
    for _ in range(rounds):
        ctx.sync()
        opt.new_step_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loss = one()
        ctx.sync()
        seconds = (time.perf_counter() - start) / steps
        stats = opt.new_step_stats()
        if seconds < best[0]:
            best = (seconds, stats.comm_time_s / steps, stats.dense_bytes / max(stats.wire_bytes, 1))
    opt.remove_hooks()
    return (*best, float(loss.detach()))


def check_training(ctx: Context, r: CheckResult) -> None:
    """The MNIST-1D CNN and a ResNet-style conv net on one device: dense vs every compressor."""
    p, dev = ctx.profile, ctx.device
    models: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], int]] = [
        (f"cnn1d {p.cnn or 'default'}", lambda: CNN1D((40,), CLASSES, **p.cnn), (40,), p.cnn_batch),
        (f"resnet {p.resnet_widths} on 3x{p.image}x{p.image}", lambda: SmallResNet(p.resnet_widths),
         (3, p.image, p.image), p.resnet_batch)]
    table = Table(f"Training step on one {dev.type} (forward + backward + step, SGD momentum, the config's "
                  "compressor defaults); fastest of the rounds",
                  ["model", "params (M)", "batch", "compressor", "step (ms)", "x dense", "codec share of step (%)",
                   "in synchronize() (ms)", "wire ratio (x)"])
    for label, make, shape, batch in models:
        torch.manual_seed(0)
        initial = make().to(dev)
        params = sum(q.numel() for q in initial.parameters()) / 1e6
        batches = [tuple(t.to(dev) for t in templates(batch, shape, 1.0, seed=s)) for s in range(4)]
        dense = None
        for name in COMPRESSOR_NAMES:
            seconds, sync_s, wire, loss = step_time(copy.deepcopy(initial), name, batches, ctx, p.train_steps, p.train_rounds)
            r.expect(math.isfinite(loss), f"{label} {name}: loss {loss}")
            dense = seconds if name == "none" else dense
            table.rows.append([label, params, batch, name, seconds * 1e3, seconds / dense,
                               max(0.0, 100 * (seconds - dense) / seconds), sync_s * 1e3, wire])
        log(f"3. {label} timed")
    r.tables.append(table)
    r.notes.append("codec share = (step - dense step) / step: on one rank the exchange is the codec's own work "
                   "(and its host syncs), the network adds nothing.")


# -- 4. four ranks on one GPU ---------------------------------------------------------------
def rank_data(ctx: Context) -> tuple[str, str]:
    """data.name for the 4-rank run: sklearn's digits, or the same shape written as an HDF5 x/y file."""
    try:
        import sklearn.datasets  # noqa: F401
        return "digits", "sklearn digits (1797 samples, 8x8)"
    except ImportError:
        import h5py
        path = ctx.out / "synthetic-digits.h5"
        x, y = templates(1800, (64,), 1.0, seed=7)
        with h5py.File(path, "w") as f:
            f["x"], f["y"] = x.numpy(), y.numpy()
        return str(path), "synthetic 64-feature data in an HDF5 file (no scikit-learn here)"


def check_ranks(ctx: Context, r: CheckResult) -> None:
    """torchrun 4 ranks (Gloo: NCCL refuses two ranks on one GPU) training configs/digits.toml with
    every compressor, on the GPU and, for the reference, on the CPU; parameters compared across ranks."""
    p = ctx.profile
    data, what = rank_data(ctx)
    devices = ["cuda", "cpu"] if ctx.cuda else ["cpu"]
    result_path = ctx.out / "ranks.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
           str(Path(__file__).resolve()), "--rank-worker", str(result_path), "--data", data,
           "--devices", ",".join(devices), "--compressors", ",".join(p.rank_compressors),
           "--epochs", str(p.rank_epochs), "--out", str(ctx.out / "runs")]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // RANKS)))
    env = dict(os.environ, HPCTRAIN_BACKEND="torch", OMP_NUM_THREADS=threads, TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    if ctx.cuda:
        torch.cuda.empty_cache()              # the ranks share the device with this process
    log(f"4. {' '.join(cmd[1:7])} ... ({len(devices) * len(p.rank_compressors)} training runs)")
    # Its own session, so a timeout takes down torchrun's ranks too (they would hold the GPU).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=p.rank_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        (ctx.out / "ranks.log").write_text(stdout + stderr)
        r.expect(False, f"torchrun did not finish in {p.rank_timeout_s:g} s (output in {ctx.out / 'ranks.log'})")
        return
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    (ctx.out / "ranks.log").write_text(proc.stdout + proc.stderr)
    engine = next((line for line in proc.stdout.splitlines() if line.startswith("hpctrain: engine")), "")
    if not r.expect(proc.returncode == 0 and result_path.is_file(),
                    f"torchrun exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]} "
                    f"(full output in {ctx.out / 'ranks.log'})"):
        return
    runs = json.loads(result_path.read_text())
    table = Table(f"{RANKS} ranks, configs/digits.toml for {p.rank_epochs} epochs on {what}; {engine.removeprefix('hpctrain: ')}",
                  ["compressor", "device", "val accuracy", "vs cpu", "params identical on every rank",
                   "max |param - rank 0's|", "train time (s)"])
    accuracy = {(run["compressor"], run["device"]): run["val_accuracy"] for run in runs}
    for run in runs:
        ref = accuracy.get((run["compressor"], "cpu"))
        delta = run["val_accuracy"] - ref if ref is not None and run["device"] != "cpu" else None
        table.rows.append([run["compressor"], run["device"], run["val_accuracy"], delta, run["identical"],
                           run["max_diff"], run["seconds"]])
        r.expect(run["identical"], f"{run['compressor']} on {run['device']}: ranks' parameters differ by up to {run['max_diff']:.3g}")
        r.expect(run["val_accuracy"] >= p.rank_floor,
                 f"{run['compressor']} on {run['device']}: val accuracy {run['val_accuracy']:.3f} < {p.rank_floor}")
        if delta is not None:
            r.expect(abs(delta) <= RANK_ACCURACY_TOLERANCE, f"{run['compressor']}: accuracy on cuda {run['val_accuracy']:.3f} "
                                                           f"vs cpu {ref:.3f} (tolerance {RANK_ACCURACY_TOLERANCE})")
    r.tables.append(table)
    if ctx.cuda and "Gloo" not in engine:
        r.notes.append(f"expected the engine to fall back to Gloo for {RANKS} ranks on one GPU; it said: {engine!r}")


def rank_worker(args: argparse.Namespace) -> int:
    """One of the torchrun'd ranks: the `hpctrain train` path (load_config, init_comm, Trainer) per
    compressor and device, then every rank's parameters gathered and compared on rank 0."""
    from hpctrain.config import check_world_size, load_config
    from hpctrain.h5log import read_log
    from hpctrain.train import Trainer, init_comm

    runs = []
    for device in args.devices.split(","):
        for name in args.compressors.split(","):
            cfg = load_config(REPO / "configs" / "digits.toml", [
                f"data.name={json.dumps(args.data)}", f"train.epochs={args.epochs}", f'train.device="{device}"',
                f'compression.name="{name}"', f'run.name="{name}-{device}"', f"run.out_dir={json.dumps(args.out)}",
                "train.progress=false", "dist.backend=\"torch\""])
            init_comm(cfg)
            check_world_size(cfg, comm.size())
            start = time.perf_counter()
            trainer = Trainer(cfg)
            trainer.fit(overwrite=True)           # a rerun into the same --out moves the last one aside
            seconds = time.perf_counter() - start
            mine = {n: q.detach().cpu() for n, q in trainer.model.named_parameters()}
            everyone = comm.get().allgather_object(mine, name=f"gpu_check.{name}.{device}")
            if comm.is_root():
                evals = read_log(cfg.run_dir / "log.h5")["evals"]
                runs.append({"compressor": name, "device": device, "val_accuracy": float(evals["val_accuracy"][-1]),
                             "identical": all(torch.equal(theirs[n], mine[n]) for theirs in everyone for n in mine),
                             "max_diff": max(max_diff(theirs, mine) for theirs in everyone), "seconds": seconds})
                print(f"gpu_check worker: {name} on {device}: accuracy {runs[-1]['val_accuracy']:.3f}, "
                      f"identical {runs[-1]['identical']}", flush=True)
            del trainer
    if comm.is_root():
        Path(args.rank_worker).write_text(json.dumps(runs, indent=1))
    return 0


# -- 5. fusion ------------------------------------------------------------------------------
def check_fusion(ctx: Context, r: CheckResult) -> None:
    """benchmarks/fusion.py's wide MLP and timing on one rank: none / backward / forward, modes timed
    in rotating rounds; then every mode has taken the same steps, so the parameters must agree."""
    p, dev = ctx.profile, ctx.device
    width, depth, batch = p.fusion_mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, fusion.INPUTS, generator=g).to(dev)
    y = torch.randint(0, fusion.CLASSES, (batch,), generator=g).to(dev)
    table = Table(f"Optimizer fusion on one {dev.type}: MLP {fusion.INPUTS}-{width}x{depth}-{fusion.CLASSES}, batch {batch}, "
                  f"Adam; median over {p.fusion_rounds} rounds of {p.fusion_steps} steps",
                  ["compressor", "fusion", "step (ms)", "vs none (paired)", "max |param - none's|"])
    for name in p.fusion_compressors:
        models, opts, steps = {}, {}, {}
        for mode in fusion.MODES:
            model = models[mode] = fusion.wide_mlp(width, depth, dev)
            opt = opts[mode] = DistributedOptimizer(
                torch.optim.Adam(model.parameters(), lr=1e-4), model.named_parameters(),   # the torch engine matches by order
                compression=policy_from_config(CompressionConfig(name=name)), fusion=mode)

            def one(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            steps[mode] = one
        for mode in fusion.MODES:
            fusion.timed(steps[mode], 2, dev, opts[mode].flush)
        times: dict[str, list[float]] = {mode: [] for mode in fusion.MODES}
        for k in range(p.fusion_rounds):
            for mode in fusion.MODES[k % 3:] + fusion.MODES[:k % 3]:
                times[mode].append(fusion.timed(steps[mode], p.fusion_steps, dev, opts[mode].flush)[0])
        final = {mode: params_of(model) for mode, model in models.items()}
        for mode in fusion.MODES:
            opts[mode].remove_hooks()
            ratios = sorted(t / base for t, base in zip(times[mode], times["none"]))
            diff = max_diff(final[mode], final["none"])
            table.rows.append([name, mode, 1e3 * sorted(times[mode])[len(times[mode]) // 2],
                               ratios[len(ratios) // 2], diff])
            r.expect(diff <= 1e-6, f"fusion {mode} with {name}: parameters {diff:.3g} away from fusion none")
        log(f"5. fusion with {name} timed")
    r.tables.append(table)
    r.notes.append("One rank: the exchange has no network wait for fusion to fill, so this measures fusion's "
                   "overhead and exactness on the device; its gain needs several nodes (benchmarks/fusion.py --rate).")


# -- 6. mixed precision ---------------------------------------------------------------------
def amp_run(name: str, precision: str, ctx: Context, train: list[tuple[torch.Tensor, torch.Tensor]],
            val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Train the CNN1D with compressor `name` under `precision` ("fp32", "bf16", "fp16"; fp16 with
    GradScaler, Horovod's recipe); report accuracy, skipped steps and whether anything went non-finite."""
    p, dev = ctx.profile, ctx.device
    torch.manual_seed(0)
    model = CNN1D((40,), CLASSES, **p.cnn).to(dev)
    opt = wrap(model, name, lambda ps: torch.optim.Adam(ps, lr=1e-2 if not ctx.cuda else 3e-3))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, init_scale=p.amp_init_scale) if precision == "fp16" else None
    skipped = bad_losses = 0
    for s in range(p.amp_steps):
        x, y = train[s % len(train)]
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            opt.synchronize()
            scaler.unscale_(opt)
            scale = scaler.get_scale()
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < scale
        opt.zero_grad()
        bad_losses += not bool(torch.isfinite(loss.detach()))
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        accuracy = float((model(val[0]).argmax(1) == val[1]).float().mean())
    residuals = [s.residual for s in opt._states.values() if s.residual is not None]
    opt.remove_hooks()
    return {"accuracy": accuracy, "skipped": skipped, "non-finite losses": bad_losses,
            "params finite": all(bool(torch.isfinite(q).all()) for q in model.parameters()),
            "residuals finite": all(bool(torch.isfinite(t).all()) for t in residuals)}


def check_amp(ctx: Context, r: CheckResult) -> None:
    """bf16 and fp16 autocast (fp16 with GradScaler: the exchange lets Inf through so the scaler
    skips) with every compressor, against fp32 with the same compressor."""
    p, dev = ctx.profile, ctx.device
    train = [tuple(t.to(dev) for t in templates(p.cnn_batch, (40,), p.amp_noise, seed=s)) for s in range(32)]
    val = tuple(t.to(dev) for t in templates(2000, (40,), p.amp_noise, seed=10**6))
    table = Table(f"Mixed precision: CNN1D {p.cnn or 'default'}, {p.amp_steps} steps of {p.cnn_batch}, Adam; fp16 with "
                  f"GradScaler(init_scale=2^{math.log2(p.amp_init_scale):g}) via synchronize/unscale_/skip_synchronize",
                  ["compressor", "precision", "val accuracy", "vs fp32", "steps skipped by the scaler",
                   "non-finite losses", "params finite", "residuals finite"])
    for name in COMPRESSOR_NAMES:
        base = None
        for precision in ("fp32", "bf16", "fp16"):
            run = amp_run(name, precision, ctx, train, val)
            base = run["accuracy"] if precision == "fp32" else base
            table.rows.append([name, precision, run["accuracy"], run["accuracy"] - base, run["skipped"],
                               run["non-finite losses"], run["params finite"], run["residuals finite"]])
            what = f"{name} {precision}"
            r.expect(run["params finite"] and run["residuals finite"], f"{what}: NaN/Inf in parameters or residuals")
            if precision == "fp32":
                r.expect(base >= p.amp_floor, f"{what}: accuracy {base:.3f} below {p.amp_floor} (nothing to compare with)")
                r.expect(run["non-finite losses"] == 0, f"{what}: non-finite loss")
            else:
                r.expect(abs(run["accuracy"] - base) <= p.amp_tolerance,
                         f"{what}: accuracy {run['accuracy']:.3f} vs fp32 {base:.3f} (tolerance {p.amp_tolerance})")
            if precision == "fp16" and run["skipped"] == 0:
                r.notes.append(f"{what}: no step overflowed, so the skip path was not exercised")
        log(f"6. {name} done")
    r.tables.append(table)


# -- the report -----------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """A table cell: 3 significant figures for small floats, whole numbers for large ones."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def render_markdown(meta: dict[str, Any], results: list[CheckResult], planned: list[str]) -> str:
    """The report: what ran where, the verdict, then per check its failures, notes and tables."""
    done = {r.key for r in results}
    failed = [r.key for r in results if r.status == "fail"]
    state = "running" if len(done) < len(planned) else ("FAIL: " + ", ".join(failed) if failed else "PASS")
    lines = [f"# hpctrain GPU check: {state}", "",
             f"{meta['date']} · {meta['device']} · torch {meta['torch']} ({'CUDA ' + meta['cuda'] if meta['cuda'] else 'no CUDA'}) · "
             f"Python {meta['python']} · commit {meta['git_commit']} · host {meta['host']}", "",
             f"Engine: {meta['engine']}.", ""]
    if meta["mode"] == "cpu":
        lines += ["**CPU mode: no CUDA device is visible, so every check ran on the CPU with small sizes.**", ""]
    lines += ["| check | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r.title} | {r.status} | {r.seconds:.1f} |" for r in results]
    lines += [f"| {CHECK_TITLES[k]} | not run yet |  |" for k in planned if k not in done]
    for r in results:
        lines += ["", f"## {r.title}: {r.status}", ""]
        lines += [f"- FAILED: {f}" for f in r.failures]
        lines += [f"- {n}" for n in r.notes]
        for t in r.tables:
            lines += ["", f"**{t.title}**", "", "| " + " | ".join(fmt(c) for c in t.columns) + " |",
                      "|" + "|".join("---" if i < 1 else "---:" for i in range(len(t.columns))) + "|"]
            lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict[str, Any], results: list[CheckResult], planned: list[str]) -> None:
    """gpu_check.md and gpu_check.json, replaced atomically (a reader never sees half a file)."""
    doc = {"meta": meta, "planned": planned, "exit_code": verdict(results), "checks": [asdict(r) for r in results]}
    for name, text in (("gpu_check.json", json.dumps(doc, indent=1, default=str)),
                       ("gpu_check.md", render_markdown(meta, results, planned))):
        write_atomic(out / name, text)


CHECK_BODIES: dict[str, Callable[[Context, CheckResult], None]] = {
    "correctness": check_correctness, "codec-cost": check_codec_cost, "training": check_training,
    "ranks": check_ranks, "fusion": check_fusion, "amp": check_amp}
CHECK_TITLES = {
    "correctness": "1. Correctness on the device", "codec-cost": "2. Codec cost vs clone()",
    "training": "3. Training step on one device", "ranks": f"4. {RANKS} ranks on one device",
    "fusion": "5. Optimizer fusion", "amp": "6. Mixed precision"}


def parse_checks(text: str) -> list[str]:
    """'all', or numbers/names separated by commas ('2,5', 'fusion') → check keys in run order."""
    if text == "all":
        return list(CHECKS)
    chosen = set()
    for item in text.split(","):
        item = item.strip()
        key = CHECKS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(CHECKS) else item
        if key not in CHECKS:
            raise argparse.ArgumentTypeError(f"unknown check {item!r}: use 1-{len(CHECKS)} or {', '.join(CHECKS)}")
        chosen.add(key)
    return [k for k in CHECKS if k in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.md, gpu_check.json and run files")
    parser.add_argument("--checks", type=parse_checks, default=list(CHECKS), help="e.g. 2,5 or fusion (default: all)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda when visible (auto), or the CPU mode with small sizes")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds after which the run stops (exit 1), keeping the report so far "
                             "(default: 470 on a GPU, 600 on the CPU)")
    # The torchrun'd ranks of check 4 run this file again with these.
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--devices", help=argparse.SUPPRESS)
    parser.add_argument("--compressors", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["HPCTRAIN_BACKEND"] = "torch"    # no Horovod on GPU nodes; the torchrun'd ranks inherit it
    if args.rank_worker:
        return run_guarded(lambda: rank_worker(args))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    faulthandler.dump_traceback_later(args.time_limit or (470 if cuda else 600), exit=True)
    if cuda:
        log(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    else:
        log("CPU mode: no CUDA device visible (or --device cpu); every check runs on the CPU with small sizes")
    # One rank: NCCL on a GPU (the one-GPU training path), Gloo on the CPU.
    communicator = comm.init(backend="torch", torch_backend="auto" if cuda else "gloo")
    ctx = Context(comm.pick_device("cuda" if cuda else "cpu"), GPU if cuda else CPU, out)
    meta = metadata(ctx, communicator)
    log(f"engine {meta['engine']}; commit {meta['git_commit']}; writing {out / 'gpu_check.md'}")
    results: list[CheckResult] = []
    for key in args.checks:
        log(f"{CHECK_TITLES[key]} ...")
        results.append(run_check(key, CHECK_TITLES[key], lambda r, key=key: CHECK_BODIES[key](ctx, r)))
        last = results[-1]
        log(f"{last.title}: {last.status} in {last.seconds:.1f} s" + "".join(f"\n    FAILED: {f}" for f in last.failures))
        write_report(out, meta, results, args.checks)
    code = verdict(results)
    faulthandler.cancel_dump_traceback_later()
    log(f"{'PASS' if code == 0 else 'FAIL'}: report in {out / 'gpu_check.md'} and gpu_check.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
