"""DistributedOptimizer checks on real ranks, launched by tests/test_optimizer_mpi.py under mpirun.

    python optimizer_checks.py exchange   every compressor: what each rank gets, bytes, bypass,
                                          unused parameters, accumulation, fp16/bf16
    python optimizer_checks.py fusion     fused == unfused after 50 steps (SGD, Adam, AdamW; dense, topk)
    python optimizer_checks.py nan        rank 1 makes one gradient NaN at step 3 (the job must abort)
    python optimizer_checks.py buckets    the torch engine's buckets: fewer collectives, the same result
    python optimizer_checks.py grouped    a grouped allgather equals one allgather per tensor
    python optimizer_checks.py placement  layers moved onto the bypass and off it between steps

Every check runs on every rank; rank 0 prints one `ok ...` line per passed check. A failed check
raises, and `run_guarded` takes the whole job down (no rank is left waiting in a collective).
The reference for an exchange is `simulate` on the gradients and compressor states gathered from
all ranks: what the mean of the per-rank decoded payloads should be.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import nn

from hpctrain import comm
from hpctrain.cli import run_guarded
from hpctrain.compression import FP16, AdaComp, LowRank, NoCompression, Policy, SignSGD, Threshold, TopK, simulate
from hpctrain.compression.base import Compressor
from hpctrain.errors import UserError
from hpctrain.optimizer import DistributedOptimizer
from hpctrain.optimizer.sync import StepStats

COMPRESSORS: dict[str, Callable[[], Compressor]] = {
    "none": NoCompression, "fp16": FP16, "topk": lambda: TopK(0.05), "threshold": lambda: Threshold(density=0.05),
    "adacomp": lambda: AdaComp(conv_bin=5, fc_bin=50), "lowrank": lambda: LowRank(rank=2), "signsgd": SignSGD}
FUSIONS = ("none", "backward", "forward")
MIN_NUMEL = 300              # conv (48) and head (192) weights and every bias ride the bypass
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=2e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.05)}


class Net(nn.Module):
    """Compressed and bypassed layers, a layer no rank uses, and one only rank 0 uses."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8, 48)
        self.fc2 = nn.Linear(48, 48)
        self.rank0_only = nn.Linear(48, 48)
        self.unused = nn.Linear(48, 48)
        self.head = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        h = torch.relu(self.fc2(h))
        if self.rank == 0:
            h = h + torch.tanh(self.rank0_only(h))
        return self.head(h)


def make_model(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)                   # the same weights on every rank
    return Net(comm.rank()).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data for `step` (different on every rank, so averaging matters)."""
    g = torch.Generator().manual_seed(1000 * comm.rank() + step)
    return torch.randn(size, 2, 8, generator=g).to(dtype), torch.randint(0, 4, (size,), generator=g)


def loss_of(model: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float(), y)


def ok(message: str) -> None:
    if comm.rank() == 0:
        print("ok", message, flush=True)


# -- exchange: what every rank gets ---------------------------------------------------------
def local_grads(model: Net, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This rank's summed gradient over the micro-batches, zeros where a parameter got none
    (computed with autograd.grad, which leaves .grad and the optimizer's hooks alone)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in micro_batches:
        grads = torch.autograd.grad(loss_of(model, x, y), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                total[n] += g
    return total


def wire_bytes(payload: torch.Tensor) -> int:
    """What a payload costs on the wire: its size in the dtype the engine carries it in (Horovod
    has no bf16: fp32 there)."""
    sent = comm.get().sendable(payload)
    return sent.numel() * sent.element_size()


def check_one_step(label: str, model: Net, opt, micro_batches, tolerance: float) -> StepStats:
    """One step of `opt` against the simulated exchange of all ranks' gradients and states; its
    statistics."""
    params = dict(model.named_parameters())
    name_of = {p: n for n, p in params.items()}
    compressor = {name_of[p]: c for p, c in opt._compressor.items()}
    states_before = {name_of[p]: copy.deepcopy(s) for p, s in opt._states.items()}
    all_grads = comm.get().allgather_object(local_grads(model, micro_batches), name=f"{label}.grads")
    all_states = comm.get().allgather_object(states_before, name=f"{label}.states")
    for x, y in micro_batches:
        loss_of(model, x, y).backward()
    opt.synchronize()
    stats = opt.new_step_stats()
    got = {n: p.grad.detach().clone() for n, p in params.items()}
    everyone = comm.get().allgather_object(got, name=f"{label}.got")
    me = comm.rank()
    wire_total = 0
    for name, mine in got.items():
        for r, theirs in enumerate(everyone):
            assert torch.equal(theirs[name], mine), f"{label}: {name} differs between rank {me} and rank {r}"
        grads, states = [g[name] for g in all_grads], [s[name] for s in all_states]
        if compressor[name] is None or not compressor[name].error_feedback:    # a residual left by a changed
            grads = [g if s.residual is None else g + s.residual.to(g.dtype) for g, s in zip(grads, states)]
            for state in states:                                                # compressor leaves with this one
                state.residual = None
        if compressor[name] is None:
            expected, wire = torch.stack([g.float() for g in grads]).mean(0).to(mine.dtype), wire_bytes(mine)
        else:
            rounds: list = []
            expected = simulate(compressor[name], grads, states, rounds)[me]
            wire = sum(wire_bytes(t) for requests in rounds for t in requests[me].payloads)
            residual = opt._states[params[name]].residual
            if states[me].residual is not None:
                assert residual is not None and torch.allclose(residual, states[me].residual, rtol=0, atol=tolerance), \
                    f"{label}: {name} residual differs from the simulated one"
        scale = max(float(expected.abs().max()), 1e-3)
        error = float((mine.float() - expected.float()).abs().max()) / scale
        assert error <= tolerance, f"{label}: {name} is {error:.3g} (relative) off the mean of the decoded payloads"
        sent = stats.per_param[name][0]
        assert sent == wire, f"{label}: {name} wire bytes {sent} != payload bytes {wire}"
        wire_total += wire
    assert stats.wire_bytes == wire_total, f"{label}: wire_bytes {stats.wire_bytes} != {wire_total}"
    assert stats.dense_bytes == sum(p.numel() * 4 for p in model.parameters())
    opt.step()              # nothing left to exchange: the wrapped optimizer's update only
    opt.zero_grad()
    return stats


def exchange_checks() -> None:
    for name, make in COMPRESSORS.items():
        fp32_tolerance = 1e-3 if name == "fp16" else 1e-5    # Gloo and NCCL round fp16 sums at every addition
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = make_model(dtype)
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                       compression=Policy(default=make(), min_numel=MIN_NUMEL))
            if dtype == torch.float32:
                small = {n for n, p in model.named_parameters() if p.numel() < MIN_NUMEL}
                assert small and {n for n, c in opt.compressor_names.items() if c == "dense"} >= small
                assert opt.compressor_names["fc2.weight"] == make().name
            tolerance = max({torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype], fp32_tolerance)
            steps = 2 if dtype == torch.float32 else 1
            for step in range(steps):       # later steps start from residuals and warm starts
                check_one_step(f"{name}/{dtype}/step{step}", model, opt, [batch(step, dtype)], tolerance)
            opt.remove_hooks()
            ok(f"exchange {name} {str(dtype).split('.')[1]}: identical on every rank, = mean of decoded payloads, "
               f"wire bytes = payload bytes, bypass below min_numel, unused parameters exchanged as zeros")
        model = make_model()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   compression=Policy(default=make(), min_numel=MIN_NUMEL), backward_passes_per_step=2)
        for step in range(2):
            check_one_step(f"{name}/accumulate/step{step}", model, opt, [batch(2 * step), batch(2 * step + 1)],
                           fp32_tolerance)
        opt.remove_hooks()
        ok(f"exchange {name}: backward_passes_per_step=2 exchanges the sum of both passes")


# -- fusion: fused == unfused ----------------------------------------------------------------
def train(optimizer: str, compression: str | None, fusions: tuple[str, ...] = FUSIONS,
          steps: int = 50) -> dict[str, dict[str, torch.Tensor]]:
    """`steps` steps with an LR schedule, one model per fusion mode in lockstep (their collectives
    share Horovod's cycles); returns each mode's final parameters, all pending updates applied."""
    policy = Policy(default=COMPRESSORS[compression]() if compression else None, min_numel=MIN_NUMEL)
    runs = []
    for fusion in fusions:
        model = make_model()
        opt = DistributedOptimizer(OPTIMIZERS[optimizer](list(model.parameters())),   # names unique in flight
                                   [(f"{fusion}.{n}", p) for n, p in model.named_parameters()],
                                   compression=policy, fusion=fusion)
        runs.append((fusion, model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)))
    for step in range(steps):
        x, y = batch(step)
        for _, model, opt, schedule in runs:
            loss_of(model, x, y).backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
    final = {}
    for fusion, model, opt, _ in runs:
        opt.flush()
        opt.remove_hooks()
        final[fusion] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return final


def fusion_checks() -> None:
    for compression in (None, "topk"):
        for optimizer in OPTIMIZERS:
            final = train(optimizer, compression)
            for fusion in ("backward", "forward"):
                worst = max(float((final[fusion][n] - final["none"][n]).abs().max()) for n in final["none"])
                assert worst <= 1e-6, f"fusion={fusion} {optimizer} {compression}: {worst:.3g} away from unfused"
            everyone = comm.get().allgather_object(final["none"], name="fusion.params")
            assert all(torch.equal(theirs[n], final["none"][n]) for theirs in everyone for n in final["none"])
            ok(f"fusion {optimizer} compression={compression}: backward and forward == none after 50 steps")


# -- nan: one rank's NaN gradient takes the job down -----------------------------------------
def nan_check() -> None:
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               compression=Policy(default=TopK(0.05), min_numel=MIN_NUMEL))
    for step in range(5):
        if step == 2 and comm.rank() == 1:
            model.fc1.weight.register_hook(lambda g: g * float("nan"))
        x, y = batch(step)
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    raise AssertionError("the NaN gradient was not reported")


# -- buckets: the torch engine fuses collectives, results unchanged --------------------------------
MIXED = Policy(rules={"fc1.*": TopK(0.05), "fc2.*": LowRank(rank=2), "rank0_only.*": FP16(), "unused.*": NoCompression()},
               min_numel=MIN_NUMEL)
BUCKET_SIZES = {"off": 0, "10 KiB": 10 * 2**10, "25 MiB": 25 * 2**20}
# Collectives per step with 25 MiB buckets: every first round's allreduces (the dense and fp16
# layers, LowRank's P), the allgathers (TopK), the bypass, LowRank's second round (Q).
ONE_BUCKET_PER_ROUND = 4


def bucket_checks() -> None:
    """The same steps with buckets off, small and large: identical parameters on every setting
    (two ranks: a sum of two is exact whatever the fusion), fewer collectives the larger they are."""
    final, collectives = {}, {}
    for label, size in BUCKET_SIZES.items():
        comm.get().bucket_bytes = size          # read when an optimizer is built
        model = make_model()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   model.named_parameters(), compression=MIXED)
        counts = set()
        for step in range(5):
            loss_of(model, *batch(step)).backward()
            opt.step()
            counts.add(opt.new_step_stats().collectives)
            opt.zero_grad()
        opt.remove_hooks()
        final[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert len(counts) == 1, f"buckets {label}: collectives per step vary: {counts}"
        collectives[label] = counts.pop()
    for label in BUCKET_SIZES:
        for name, tensor in final["off"].items():
            assert torch.equal(final[label][name], tensor), f"buckets {label}: {name} differs from unbucketed"
    assert collectives["25 MiB"] == ONE_BUCKET_PER_ROUND, collectives
    assert collectives["off"] > collectives["10 KiB"] > collectives["25 MiB"], collectives
    ok(f"buckets: collectives per step {collectives}, parameters identical after 5 steps")


def grouped_allgather_check() -> None:
    """Tensors of different dtypes, trailing shapes and per-rank lengths (one empty), gathered in
    one grouped collective: each result equals that tensor's own allgather."""
    me = comm.rank()
    tensors = [torch.arange(3 + me, dtype=torch.float32), torch.full((me, 5), me, dtype=torch.int64),
               torch.ones(2 * me + 1, 3, dtype=torch.float16), torch.tensor([me], dtype=torch.uint8)]   # no bool: Horovod refuses it
    grouped = comm.get().grouped_allgather_async(tensors, name="grouped.all").wait()
    for i, tensor in enumerate(tensors):
        alone = comm.get().allgather_async(tensor, name=f"grouped.{i}").wait()
        assert grouped[i].dtype == tensor.dtype and torch.equal(grouped[i], alone), (i, grouped[i], alone)
    ok("grouped allgather: every tensor as its own allgather gives it")


def placement_checks() -> None:
    """Layers moved onto the fused bypass and off it between steps, as `compression = "auto"` does:
    every step is the mean of what each rank sends (a residual left behind leaves with the next
    gradient); the bypass carries the moved layers in its one collective; a compressor that does
    not take a shape puts the layer there too; a tensor below min_numel cannot leave it."""
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               compression=Policy(default=TopK(0.05), min_numel=MIN_NUMEL))
    fc, name_of = ["fc1.weight", "fc2.weight"], {p: n for n, p in model.named_parameters()}
    moves = [({}, set()), (dict.fromkeys(fc), set(fc)), ({"fc1.weight": FP16()}, {"fc2.weight"}),
             ({"fc2.weight": Threshold(density=0.001, min_entries=100)}, {"fc2.weight"}),    # 2 of 2304: too few
             ({"fc1.weight": None, "fc2.weight": TopK(0.05)}, {"fc1.weight"}),               # one on, one off
             ({"fc1.weight": NoCompression()}, set())]
    collectives = []
    for step, (move, moved) in enumerate(moves):
        opt.set_compressors(move)
        on_bypass = {name_of[p] for p in opt._sync.bypass.params}
        assert on_bypass & set(fc) == moved, (step, on_bypass)
        assert {n for n, c in opt.compressor_names.items() if c == "dense"} == on_bypass
        collectives.append(check_one_step(f"placement/step{step}", model, opt, [batch(step)], 1e-3).collectives)
    if comm.get().engine == "horovod":       # one collective per queued exchange there: two fewer
        assert collectives[1] < collectives[0], collectives
    try:
        opt.set_compressors({"conv.weight": TopK(0.05)})
        raise AssertionError("a tensor below min_numel left the bypass")
    except UserError as error:
        assert "conv.weight rides the fused bypass (numel 48 < min_numel 300)" in str(error), error
    opt.remove_hooks()
    ok(f"placement: onto the bypass and off it, each step the mean of what the ranks sent; collectives {collectives}")


CHECKS = {"exchange": exchange_checks, "fusion": fusion_checks, "nan": nan_check, "buckets": bucket_checks,
          "grouped": grouped_allgather_check, "placement": placement_checks}

if __name__ == "__main__":
    comm.init()
    sys.exit(run_guarded(CHECKS[sys.argv[1]]))
