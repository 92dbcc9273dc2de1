"""The recipes Horovod users rely on, run unchanged against hpctrain.DistributedOptimizer on real
ranks; launched by tests/test_horovod_dropin.py under mpirun (HPCTRAIN_BACKEND picks the engine).

    python horovod_recipes.py recipes   2 ranks: resume (broadcast_optimizer_state), clipping,
                                        AMP with a GradScaler (dense and every compressor), sparse
                                        embeddings with SparseAdam, op=Sum, gradient_predivide_factor
    python horovod_recipes.py sets      4 ranks in two process sets (Horovod ProcessSet / torch group)

Every check runs on every rank; rank 0 prints one `ok ...` line per passed check. A failed check
raises, and `run_guarded` takes the whole job down (no rank is left waiting in a collective).
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

import hpctrain
from hpctrain import comm
from hpctrain.cli import run_guarded
from hpctrain.compression import FP16, AdaComp, LowRank, NoCompression, Policy, Threshold, TopK
from hpctrain.compression.base import Compressor
from hpctrain.optimizer import DistributedOptimizer

COMPRESSORS: dict[str, Callable[[], Compressor | None]] = {
    "dense": lambda: None, "none": NoCompression, "fp16": FP16, "topk": lambda: TopK(0.05),
    "threshold": lambda: Threshold(density=0.05), "adacomp": lambda: AdaComp(conv_bin=5, fc_bin=50),
    "lowrank": lambda: LowRank(rank=2)}
AMP_COMPRESSORS = ("dense", "fp16", "topk", "threshold", "adacomp", "lowrank")    # "none" is "dense"
MIN_NUMEL = 500              # the weights are compressed, the biases ride the bypass


def engine() -> str:
    return comm.get().engine


def ok(message: str) -> None:
    if comm.rank() == 0:
        print("ok", f"[{engine()}]", message, flush=True)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_model() -> MLP:
    torch.manual_seed(0)                   # the same weights on every rank
    return MLP()


def batch(step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data (different on every rank, so averaging matters)."""
    g = torch.Generator().manual_seed(1000 * comm.rank() + step)
    return torch.randn(size, 16, generator=g), torch.randint(0, 4, (size,), generator=g)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x).float(), y)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_on_every_rank(value: dict[str, torch.Tensor], label: str, ranks: list[int] | None = None) -> None:
    everyone = comm.get().allgather_object(value, name=f"{label}.same")
    for r, theirs in enumerate(everyone):
        if ranks is not None and r not in ranks:
            continue
        for name, mine in value.items():
            assert torch.equal(theirs[name], mine), f"{label}: {name} differs between rank {comm.rank()} and rank {r}"


def flat_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state and hyper-parameters, comparable across ranks."""
    sd = opt.state_dict()
    out: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            out[f"{pid}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    for i, group in enumerate(sd["param_groups"]):
        out[f"group{i}.lr"] = torch.tensor(float(group["lr"]))
    return out


# -- resume: load on the root, broadcast, train on -------------------------------------------
def resume(broadcast: Callable[[torch.optim.Optimizer], None], label: str) -> None:
    """The checkpoint is made on rank 0 (3 local Adam steps, then the LR lowered); the other
    ranks start fresh. After broadcasting the parameters and the optimizer state every rank
    must hold the root's, and train on in lockstep (a hang here is the bug of issue 21)."""
    model = make_model()
    if comm.rank() == 0:
        local = torch.optim.Adam(model.parameters(), lr=0.01)
        for step in range(3):
            loss_of(model, step).backward()
            local.step()
            local.zero_grad()
        local.param_groups[0]["lr"] = 0.004
        checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(local.state_dict()))
        model = make_model()
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters())
    if comm.rank() == 0:
        model.load_state_dict(checkpoint[0])
        opt.load_state_dict(checkpoint[1])
    hpctrain.broadcast_parameters(model.state_dict(), root_rank=0)
    broadcast(opt)
    state = flat_state(opt)
    assert state["group0.lr"] == 0.004 and state["0.exp_avg"].abs().sum() > 0, f"{label}: state not the root's"
    same_on_every_rank(state, f"{label}.state")
    for step in range(3):
        loss_of(model, 10 + step).backward()
        opt.step()
        opt.zero_grad()
    same_on_every_rank(params_of(model), f"{label}.params")
    opt.remove_hooks()
    ok(f"resume with {label}: every rank holds the root's optimizer state and LR, and trains on in lockstep")


def resume_checks() -> None:
    if engine() == "horovod":
        import horovod.torch as hvd
        resume(lambda opt: hvd.broadcast_optimizer_state(opt, root_rank=0), "hvd.broadcast_optimizer_state")
    resume(lambda opt: hpctrain.broadcast_optimizer_state(opt, root_rank=0), "hpctrain.broadcast_optimizer_state")


# -- clipping: synchronize, clip, step inside skip_synchronize -------------------------------
def clip_checks() -> None:
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               compression=Policy(default=TopK(0.05), min_numel=MIN_NUMEL))
    for step in range(3):
        loss_of(model, step).backward()
        opt.synchronize()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        same_on_every_rank(grads, f"clip.{step}.grads")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert clipped <= 0.05 + 1e-6, f"clip: norm {float(clipped)} after clipping to 0.05"
        before = params_of(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with opt.skip_synchronize():
                opt.step()
        assert not [w for w in caught if "skip_synchronize" in str(w.message)], "clip: warned inside skip_synchronize"
        for n, p in model.named_parameters():       # the update used the clipped gradient
            assert torch.allclose(p.detach(), before[n] - 0.1 * p.grad, atol=1e-7), f"clip: {n} not updated by it"
        opt.zero_grad()
    same_on_every_rank(params_of(model), "clip.params")
    loss_of(model, 5).backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w for w in caught if "skip_synchronize" in str(w.message)], "no warning: step() after synchronize()"
    opt.zero_grad()
    opt.remove_hooks()
    ok("clipping: synchronize, clip_grad_norm_, step in skip_synchronize: clipped averaged gradients, same "
       "parameters on every rank; step() after synchronize() without it warns")


# -- AMP: fp16 autocast + GradScaler, overflows skipped on every rank -------------------------
def amp_run(compression: str, inject: dict[int, int], init_scale: float, steps: int) -> dict[str, Any]:
    """`steps` steps of the Horovod AMP recipe; at step s, rank inject[s] makes one gradient Inf."""
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), model.named_parameters(),
                               compression=Policy(default=COMPRESSORS[compression](), min_numel=MIN_NUMEL))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    state = {"step": -1}
    model.fc2.weight.register_hook(
        lambda g: g * float("inf") if inject.get(state["step"]) == comm.rank() else g)
    losses, skipped, backoffs = [], [], []
    x, y = batch(0, size=32)                     # the same batch every step: the loss must go down
    for step in range(steps):
        state["step"] = step
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        losses.append(loss.item())
        scaler.scale(loss).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        before, scale = params_of(model), scaler.get_scale()
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if all(torch.equal(before[n], p) for n, p in model.named_parameters()):
            skipped.append(step)
        if scaler.get_scale() < scale:
            backoffs.append(step)
    label = f"amp.{compression}.{init_scale}"
    same_on_every_rank(params_of(model), f"{label}.params")
    same_on_every_rank({"scale": torch.tensor(scaler.get_scale())}, f"{label}.scale")
    for name, st in ((opt._names[p], s) for p, s in opt._states.items()):
        assert st.residual is None or bool(torch.isfinite(st.residual).all()), f"{label}: {name} residual not finite"
    assert all(torch.isfinite(p).all() for p in model.parameters()), f"{label}: parameters not finite"
    opt.remove_hooks()
    return {"losses": losses, "skipped": skipped, "backoffs": backoffs}


def amp_checks() -> None:
    inject = {2: 1, 5: 0, 6: 1}                  # rank 1 at step 2, rank 0 at 5, rank 1 at 6
    for compression in AMP_COMPRESSORS:
        run = amp_run(compression, inject, init_scale=2.0 ** 8, steps=10)
        assert run["skipped"] == sorted(inject), f"amp {compression}: skipped {run['skipped']}, not {sorted(inject)}"
        assert run["backoffs"] == sorted(inject), f"amp {compression}: scale backed off at {run['backoffs']}"
        first, last = sum(run["losses"][:3]) / 3, sum(run["losses"][-3:]) / 3
        assert last < first - 0.03, f"amp {compression}: loss {first:.4f} -> {last:.4f} did not go down"
        ok(f"amp {compression}: fp16 autocast + GradScaler skips exactly the overflow steps on every rank, "
           f"same parameters everywhere, residuals finite, loss {first:.3f} -> {last:.3f}")
    run = amp_run("topk", {}, init_scale=2.0 ** 22, steps=8)     # real fp16 overflows while the scale backs off
    assert run["skipped"] and run["skipped"] == run["backoffs"] and run["skipped"][0] == 0, run
    ok(f"amp natural overflows: steps {run['skipped']} skipped on every rank, the scale backed off at exactly those")


# -- sparse embeddings with SparseAdam ---------------------------------------------------------
def sparse_checks() -> None:
    n = comm.size()
    variants = {"bypass": dict(compression=None),                                       # small: fused dense allreduce
                "allgather": dict(compression=Policy(default=TopK(0.05), min_numel=100)),
                "sparse_as_dense": dict(compression=Policy(min_numel=100), sparse_as_dense=True)}
    for label, kwargs in variants.items():
        torch.manual_seed(0)
        model = nn.Embedding(50, 8, sparse=True)
        ref = copy.deepcopy(model)
        opt = DistributedOptimizer(torch.optim.SparseAdam(model.parameters(), lr=0.05), model.named_parameters(),
                                   **kwargs)
        ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
        for step in range(3):
            g = torch.Generator().manual_seed(100 * comm.rank() + step)
            idx = torch.randint(0, 50, (6, 3), generator=g)
            target = torch.randn(6, generator=g)
            (model(idx).sum((1, 2)) - target).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            # Reference: one process averaging every rank's sparse gradient itself.
            total = None
            for r_idx, r_target in comm.get().allgather_object((idx, target), name=f"sparse.{label}.{step}"):
                ref.zero_grad()
                (ref(r_idx).sum((1, 2)) - r_target).pow(2).mean().backward()
                total = ref.weight.grad if total is None else total + ref.weight.grad
            ref.weight.grad = (total / n).coalesce()
            ref_opt.step()
        same_on_every_rank(params_of(model), f"sparse.{label}")
        error = float((model.weight - ref.weight).detach().abs().max())
        assert error < 1e-5, f"sparse {label}: {error:.3g} away from SparseAdam on the averaged sparse gradient"
        opt.remove_hooks()
        ok(f"sparse {label}: nn.Embedding(sparse=True) + SparseAdam == SparseAdam on the averaged gradient")


# -- op=Sum and gradient_predivide_factor ------------------------------------------------------
def local_grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_of(model, step), list(params.values()))
    return dict(zip(params, grads))


def reduce_checks() -> None:
    n = comm.size()
    total_op: Any = "sum"
    if engine() == "horovod":
        import horovod.torch as hvd
        total_op = hvd.Sum
    for label, kwargs, factor in (("op=Sum", dict(op=total_op), n), ("op='average'", dict(op="average"), 1),
                                  ("gradient_predivide_factor=4", dict(gradient_predivide_factor=4.0), 1)):
        for compression in ("dense", "fp16"):
            model = make_model()
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                       compression=Policy(default=COMPRESSORS[compression](), min_numel=MIN_NUMEL),
                                       **kwargs)
            everyone = comm.get().allgather_object(local_grads(model, 0), name=f"reduce.{label}.{compression}")
            loss_of(model, 0).backward()
            opt.synchronize()
            tolerance = 1e-3 if compression == "fp16" else 1e-6
            for name, p in model.named_parameters():
                expected = sum(g[name] for g in everyone) / n * factor
                scale = float(expected.abs().max())
                assert float((p.grad - expected).abs().max()) <= tolerance * scale, f"{label} {compression}: {name}"
            with opt.skip_synchronize():
                opt.step()
            opt.zero_grad()
            opt.remove_hooks()
        ok(f"{label}: the exchanged gradients are the {'sum' if factor > 1 else 'mean'} over ranks "
           "(bypass and compressed paths)")


def recipes() -> None:
    for check in (resume_checks, clip_checks, amp_checks, sparse_checks, reduce_checks):
        start = time.perf_counter()
        check()
        if comm.rank() == 0:
            print(f"{check.__name__}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


# -- process sets: 4 ranks in two sets -------------------------------------------------------
def sets() -> None:
    assert comm.size() == 4
    if engine() == "horovod":
        import horovod.torch as hvd
        groups = [hvd.add_process_set([0, 1]), hvd.add_process_set([2, 3])]
    else:
        import torch.distributed as td
        groups = [td.new_group([0, 1]), td.new_group([2, 3])]
    mine = 0 if comm.rank() < 2 else 1
    members = [[0, 1], [2, 3]][mine]
    everyone_grads = None
    for compression in ("dense", "topk"):
        model = make_model()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   compression=Policy(default=COMPRESSORS[compression](), min_numel=MIN_NUMEL),
                                   process_set=groups[mine])
        everyone_grads = comm.get().allgather_object(local_grads(model, 0), name=f"sets.{compression}.local")
        for step in range(2):
            loss_of(model, step).backward()
            opt.synchronize()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            if step == 0 and compression == "dense":
                for name, got in grads.items():
                    expected = sum(everyone_grads[r][name] for r in members) / 2
                    assert torch.allclose(got, expected, rtol=0, atol=1e-6), f"sets: {name} is not the set's mean"
            if step == 0:
                other = comm.get().allgather_object(grads, name=f"sets.{compression}.got")[(comm.rank() + 2) % 4]
                assert not torch.equal(other["fc2.weight"], grads["fc2.weight"]), "sets: the two sets got the same"
            same_on_every_rank(grads, f"sets.{compression}.{step}", ranks=members)
            with opt.skip_synchronize():
                opt.step()
            opt.zero_grad()
        same_on_every_rank(params_of(model), f"sets.{compression}.params", ranks=members)
        opt.remove_hooks()
        ok(f"process sets {compression}: gradients averaged over the set only (ranks 0,1 and 2,3)")
    model = make_model()
    try:
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                             process_set=groups[1 - mine])
    except ValueError as exc:
        assert "does not include this rank" in str(exc), exc
    else:
        raise AssertionError("a process set without this rank was accepted")
    ok("process sets: a set this rank is not in is a ValueError")


CHECKS = {"recipes": recipes, "sets": sets}

if __name__ == "__main__":
    comm.init()
    sys.exit(run_guarded(CHECKS[sys.argv[1]]))
