"""`hpctrain.ddp_comm_hook` checks on real ranks, launched by tests/test_ddp_hook.py under torchrun (Gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/mpi_workers/ddp_hook_checks.py

Every check runs on every rank; rank 0 prints one `ok ...` line per passed check, a failed check
raises (and `run_guarded` takes the job down). The reference for a compressed exchange is
`simulate` on the local gradients and compressor states gathered from all ranks.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpctrain import comm  # noqa: E402
from hpctrain.cli import run_guarded  # noqa: E402
from hpctrain.compression import FP16, NoCompression, Policy, TopK, simulate  # noqa: E402
from hpctrain.compression.base import ParamState  # noqa: E402
from hpctrain.compression.policy import DENSE  # noqa: E402
from hpctrain.ddp import ddp_comm_hook  # noqa: E402
from tests.mpi_workers.optimizer_checks import COMPRESSORS  # noqa: E402

MIN_NUMEL = 300      # conv weight (48) and head weight (192) and every bias ride the fused bypass
STEPS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8, 48)
        self.fc2 = nn.Linear(48, 48)
        self.head = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        return self.head(torch.relu(self.fc2(h)))


def make_ddp(hook_with: Policy | None = None, named: bool = True, **ddp_args) -> tuple[Net, DDP, object]:
    torch.manual_seed(0)
    net = Net()
    ddp = DDP(net, bucket_cap_mb=0.01, **ddp_args)          # ~2500 floats: several buckets
    state = None
    if hook_with is not None:
        state, hook = ddp_comm_hook(hook_with, model=ddp if named else None)
        ddp.register_comm_hook(state, hook)
    return net, ddp, state


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * td.get_rank() + step)
    return torch.randn(8, 2, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def local_grads(net: Net, step: int) -> dict[str, torch.Tensor]:
    """This rank's own gradient (no DDP) for `step`, on a copy of the weights."""
    twin = Net()
    twin.load_state_dict(net.state_dict())
    x, y = batch(step)
    nn.functional.cross_entropy(twin(x), y).backward()
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


def ddp_step(ddp: DDP, step: int) -> dict[str, torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    x, y = batch(step)
    nn.functional.cross_entropy(ddp(x), y).backward()
    return {n: p.grad.clone() for n, p in ddp.module.named_parameters()}


def gather(obj):
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def reference(policy: Policy, net: Net, step: int, saved: dict) -> dict[str, torch.Tensor]:
    """What every rank should get: `simulate` of all ranks' gradients and states, per the policy."""
    all_grads = gather(local_grads(net, step))
    all_states = gather(saved)
    out = {}
    for name, p in net.named_parameters():
        grads = [g[name] for g in all_grads]
        compressor = policy.resolve(name, p)
        if compressor is None:
            out[name] = torch.stack(grads).mean(0)
            continue
        states = []
        for s in all_states:
            states.append(ParamState(name))
            states[-1].load_state_dict(s[name], p.device)
        if states[0].steps < policy.warmup_steps:
            compressor = DENSE
        out[name] = simulate(compressor, grads, states)[td.get_rank()]
    return out


def assert_close(got: dict, want: dict, what: str, atol: float = 1e-6) -> None:
    for name in want:
        if not torch.allclose(got[name], want[name], rtol=1e-4, atol=atol):
            err = (got[name] - want[name]).abs().max().item()
            raise AssertionError(f"{what}: {name} differs by {err:.3g}")


def same_on_all_ranks(grads: dict, what: str) -> None:
    for other in gather(grads)[1:]:
        for name in grads:
            if not torch.equal(other[name], grads[name]):
                raise AssertionError(f"{what}: ranks disagree on {name}")


def ok(message: str) -> None:
    if td.get_rank() == 0:
        print("ok", message, flush=True)


def check_dense() -> None:
    _, plain, _ = make_ddp()
    _, hooked, state = make_ddp(NoCompression(), named=False)
    for step in range(STEPS):
        want, got = ddp_step(plain, step), ddp_step(hooked, step)
        assert_close(got, want, f"NoCompression step {step}")
    same_on_all_ranks(got, "NoCompression")
    assert state.wire_bytes == state.dense_bytes, (state.wire_bytes, state.dense_bytes)
    assert state.buckets > STEPS, state.buckets          # several buckets per step (after the first)
    assert sorted(state.state_dict()) == [f"bucket0.{i}" for i in range(8)], sorted(state.state_dict())
    ok(f"none: DDP+hook == plain DDP for {STEPS} steps over {state.buckets} buckets, wire bytes == dense bytes, "
       "no model: parameters named after DDP's first bucket")


def check_compressor(name: str) -> None:
    policy = Policy(default=COMPRESSORS[name](), min_numel=MIN_NUMEL, warmup_steps=1)
    net, ddp, state = make_ddp(policy)
    for step in range(STEPS):
        want = reference(policy, net, step, state.state_dict())
        got = ddp_step(ddp, step)
        assert_close(got, want, f"{name} step {step}")
        same_on_all_ranks(got, f"{name} step {step}")
    ok(f"{name}: DDP+hook == simulate of all ranks for {STEPS} steps (1 dense warm-up), same on every rank, "
       f"wire {state.wire_bytes} of {state.dense_bytes} dense bytes")


def check_state_dict() -> None:
    policy = Policy(default=COMPRESSORS["adacomp"](), min_numel=MIN_NUMEL)
    _, ddp, state = make_ddp(policy)
    for step in range(STEPS):
        ddp_step(ddp, step)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    _, fresh_ddp, fresh = make_ddp(policy)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    saved, loaded = state.state_dict(), fresh.state_dict()
    residuals = [n for n, s in saved.items() if s["residual"] is not None]
    assert residuals and all(s["residual"].abs().sum() > 0 for n, s in saved.items() if n in residuals)
    for n in saved:
        assert (saved[n]["residual"] is None) == (loaded[n]["residual"] is None), n
        if saved[n]["residual"] is not None:
            assert torch.equal(saved[n]["residual"], loaded[n]["residual"]), n
        assert saved[n]["steps"] == loaded[n]["steps"], n
    assert_close(ddp_step(fresh_ddp, STEPS), ddp_step(ddp, STEPS), "after load_state_dict", atol=0)
    ok(f"state_dict: residuals of {sorted(residuals)} restored; the next step matches the original run")


def check_rules() -> None:
    policy = Policy(default=TopK(0.05), rules={"*.bias": None, "fc2.*": FP16()}, min_numel=0)
    net, ddp, state = make_ddp(policy, find_unused_parameters=True)   # DDP's own allreduce after backward
    chosen = {state.params[p].name: (c.name if c is not None else "dense") for p, c in state.compressors.items()}
    assert chosen == {"conv.weight": "topk", "conv.bias": "none", "fc1.weight": "topk", "fc1.bias": "none",
                      "fc2.weight": "fp16", "fc2.bias": "none", "head.weight": "topk", "head.bias": "none"}, chosen
    for step in range(2):
        want = reference(policy, net, step, state.state_dict())
        got = ddp_step(ddp, step)
        assert_close(got, want, f"rules step {step}")
    for name in ("conv.bias", "fc1.bias", "head.bias"):
        assert state.state_dict()[name]["residual"] is None, name
    ok("rules: '*.bias' = None sent dense, 'fc2.*' = FP16 beats the default TopK, names from the DDP-wrapped model, "
       "find_unused_parameters=True")


def check_non_finite() -> None:
    """Rank 1's fc1 gradient is NaN at one step: every rank sees Inf/NaN in its gradients (a
    GradScaler would skip the step everywhere), and no residual takes the NaN in."""
    policy = Policy(default=COMPRESSORS["adacomp"](), min_numel=MIN_NUMEL)
    net, ddp, state = make_ddp(policy)
    ddp_step(ddp, 0)
    handle = net.fc1.weight.register_hook(lambda g: g * float("nan")) if td.get_rank() == 1 else None
    got = ddp_step(ddp, 1)
    assert not all(torch.isfinite(g).all() for g in got.values()), "the overflow did not reach this rank"
    if handle is not None:
        handle.remove()
    residuals = {n: s["residual"] for n, s in state.state_dict().items() if s["residual"] is not None}
    assert residuals and all(torch.isfinite(r).all() for r in residuals.values()), "a residual took the NaN in"
    got = ddp_step(ddp, 2)
    assert all(torch.isfinite(g).all() for g in got.values()), "the step after the overflow is not finite"
    same_on_all_ranks(got, "after the overflow")
    ok("non-finite: one rank's NaN gradient reaches every rank as Inf/NaN, residuals stay finite, "
       "the next step is finite again")


def main() -> None:
    td.init_process_group("gloo")
    comm.init(backend="torch")
    check_dense()
    for name in COMPRESSORS:
        if name != "none":
            check_compressor(name)
    check_state_dict()
    check_rules()
    check_non_finite()


if __name__ == "__main__":
    sys.exit(run_guarded(main))
