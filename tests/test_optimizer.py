"""DistributedOptimizer on one process (Horovod with size 1): fusion is exact, hooks come off,
weight tying, forward fusion never leaves a stale pending update, construction errors, resume."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from hpctrain import comm
from hpctrain.compression import NoCompression, Policy, TopK
from hpctrain.errors import UserError
from hpctrain.h5log import read_log
from hpctrain.optimizer import DistributedOptimizer, NonFiniteGradientError
from hpctrain.local_launch import run_cli
from tests.helpers import REPO
from tests.mpi_workers.optimizer_checks import FUSIONS, OPTIMIZERS, train


@pytest.fixture(scope="module", autouse=True)
def horovod():
    comm.init()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny tensors: more threads only spin against each other
    yield
    torch.set_num_threads(threads)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))


def _wrap(model: nn.Module, fusion: str, make=lambda ps: torch.optim.Adam(ps, lr=0.01), **kwargs):
    return DistributedOptimizer(make(list(model.parameters())), model.named_parameters(),
                                compression=Policy(default=TopK(0.1), min_numel=100), fusion=fusion, **kwargs)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)


def _backward(model: nn.Module, step: int) -> None:
    x, y = _data(step)
    nn.functional.cross_entropy(model(x), y).backward()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), name


@pytest.mark.parametrize("compression", [None, "topk"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_equals_unfused_after_50_steps_on_one_rank(optimizer, compression):
    final = train(optimizer, compression)
    for fusion in ("backward", "forward"):
        _assert_same(final[fusion], final["none"], atol=1e-6)


def test_fusion_with_gradient_accumulation_equals_unfused():
    models = {fusion: _mlp() for fusion in FUSIONS}
    opts = {fusion: DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                         [(f"{fusion}.{n}", p) for n, p in m.named_parameters()],
                                         compression=Policy(default=TopK(0.1), min_numel=100),
                                         backward_passes_per_step=3, fusion=fusion)
            for fusion, m in models.items()}
    for step in range(6):
        for fusion, model in models.items():
            for micro in range(3):
                _backward(model, 3 * step + micro)
            opts[fusion].step()
            opts[fusion].zero_grad()
    for fusion in FUSIONS:
        opts[fusion].flush()
        _assert_same(_params(models[fusion]), _params(models["none"]))


@pytest.mark.parametrize("fusion", ["backward", "forward"])
def test_max_grad_norm_with_fusion_is_rejected_at_construction(fusion):
    expected = f"max_grad_norm .* cannot be combined with fusion='{fusion}': use fusion='none'"
    with pytest.raises(UserError, match=expected):
        _wrap(_mlp(), fusion, max_grad_norm=1.0)


def test_unknown_fusion_is_rejected():
    with pytest.raises(UserError, match="fusion='sideways': choose 'none', 'backward' or 'forward'"):
        _wrap(_mlp(), "sideways")


@pytest.mark.parametrize("how", ["gc", "remove_hooks"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_hooks_come_off_when_the_optimizer_is_discarded(fusion, how):
    model = _mlp()
    opt = _wrap(model, fusion)
    _backward(model, 0)
    opt.step()                                # with forward fusion an update is now pending
    with pytest.raises(UserError, match="computed twice before step"):
        _backward(model, 1)                   # proof the hooks are live: two backwards, no step
        _backward(model, 2)
    model.zero_grad()
    if how == "gc":
        ref = weakref.ref(opt)
        del opt
        gc.collect()
        assert ref() is None                  # the hooks on the model do not keep it alive
    else:
        opt.remove_hooks()
    before = _params(model)
    _backward(model, 1)
    _backward(model, 2)                       # no hook left to object, or to apply a pending update
    _assert_same(_params(model), before)


class _Tied(nn.Module):
    """A language-model shape: the output projection is the input embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(60, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 60, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.embed(tokens))))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_tied_weight_gets_exactly_one_update_per_step(fusion):
    model, reference = _Tied(), _Tied()
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters(),
                               compression=Policy(default=NoCompression(), min_numel=500), fusion=fusion)
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    assert len(opt.compressor_names) == 3 and opt.compressor_names["embed.weight"] == "none"
    for step in range(5):
        tokens = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (reference, plain)):
            nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
            o.step()
            o.zero_grad()
    opt.flush()
    assert all(int(state["step"]) == 5 for state in opt.state.values()) and len(opt.state) == 3
    _assert_same(_params(model), _params(reference), atol=1e-6)


class _Branchy(nn.Module):
    """An MLP with a branch that only even steps use (its parameters get no gradient on odd ones)."""

    def __init__(self):
        super().__init__()
        self.body, self.branch = _mlp(), nn.Linear(12, 3)
        self.use_branch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (self.branch(x) if self.use_branch else 0)


@pytest.mark.parametrize("min_numel", [100, 10**6], ids=["compressed", "all-bypass"])
def test_forward_fusion_leaves_no_stale_update_for_checkpoints_evaluation_or_zero_grad(min_numel):
    unfused, fused = _Branchy(), _Branchy()
    policy = Policy(default=TopK(0.1), min_numel=min_numel)
    opt_u, opt_f = (DistributedOptimizer(OPTIMIZERS["adamw"](list(m.parameters())),   # names unique in flight
                                         [(f"{fusion}.{n}", p) for n, p in m.named_parameters()],
                                         compression=policy, fusion=fusion)
                    for m, fusion in ((unfused, "none"), (fused, "forward")))
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_u, opt_f)]
    for step in range(7):
        for model, opt, schedule in zip((unfused, fused), (opt_u, opt_f), schedules):
            model.use_branch = step % 2 == 0
            _backward(model, step)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=False)   # must not wipe the gradient a pending update holds
        if step % 3 == 2:                      # (not every step: the branch's update must wait a step)
            x, _ = _data(100 + step)
            with torch.no_grad():              # evaluation: the forward applies what is pending
                assert torch.equal(fused.eval()(x), unfused.eval()(x))
            fused.train(), unfused.train()
    opt_u.step(), opt_f.step()                 # a step whose forward never ran: updates pending...
    assert not torch.equal(fused.body[0].weight, unfused.body[0].weight)
    f_state, u_state = opt_f.state_dict(), opt_u.state_dict()
    _assert_same(_params(fused), _params(unfused))          # ...applied by state_dict() (a checkpoint)
    for p in u_state["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(f_state["state"][p][key], u_state["state"][p][key])


def test_forward_fusion_reports_a_parameter_read_past_its_module():
    class Peeking(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(12, 3)

        def forward(self, x):      # uses inner's weight without running inner: no pre-hook of its owner
            return x @ self.inner.weight.T

    model = Peeking()
    opt = _wrap(model, "forward")
    _backward(model, 0)
    opt.step()
    with pytest.raises(UserError, match="fusion='forward': inner.weight was used before its module's forward ran"):
        _backward(model, 1)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_learning_rates_set_after_load_state_dict_reach_the_update(fusion):
    model = _mlp()
    opt = _wrap(model, fusion)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())     # torch replaces the param_group dicts here
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = _params(model)
    _backward(model, 1)
    opt.step()
    opt.flush()
    _assert_same(_params(model), before)


def test_step_runs_a_closure_with_gradients_enabled():
    model = _mlp()
    opt = _wrap(model, "none")
    before = _params(model)

    def closure():
        opt.zero_grad()
        x, y = _data(0)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nan_in_a_bypassed_gradient_names_the_parameter_and_step():
    model = _mlp()
    opt = _wrap(model, "none")
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    model[4].bias.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteGradientError, match=r"parameter '4.bias' at step 3"):
        _backward(model, 2)
        opt.step()


def test_forward_fused_training_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    args = ["train", "--config", REPO / "configs" / "digits.toml", "--set", f"run.out_dir='{tmp_path}'",
            "--set", "train.epochs=1", "--set", "train.fusion='forward'", "--set", "train.optimizer='adamw'",
            "--set", "train.lr=0.003", "--set", "train.lr_schedule='cosine'", "--set", "compression.name='topk'",
            "--set", "compression.min_numel=256", "--set", "checkpoint.every_steps=5", "--set", "checkpoint.keep=10"]
    run_cli(args)
    uninterrupted = read_log(tmp_path / "digits" / "log.h5")
    run_cli(args + ["--resume", tmp_path / "digits" / "checkpoints" / f"step-{10:09d}.pt"])
    resumed = read_log(tmp_path / "digits" / "log.h5")
    assert resumed["steps"]["step"].tolist() == uninterrupted["steps"]["step"].tolist() == list(range(1, 24))
    np.testing.assert_array_equal(resumed["steps"]["loss"], uninterrupted["steps"]["loss"])
    np.testing.assert_array_equal(resumed["evals"]["val_loss"], uninterrupted["evals"]["val_loss"])


def test_compression_warmup_sends_dense_then_compresses_with_a_fresh_residual():
    model, reference = _mlp(), _mlp()
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model.named_parameters(),
                               compression=Policy(default=TopK(0.1), min_numel=100, warmup_steps=2))
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    wire = []
    for step in range(3):
        for m, o in ((model, opt), (reference, plain)):
            _backward(m, step)
            o.step()
            o.zero_grad()
        stats = opt.new_step_stats()
        wire.append(stats.wire_bytes / stats.dense_bytes)
        residuals = [state.residual for state in opt._states.values()]
        if step < 2:        # dense: the exact update, nothing remembered
            _assert_same(_params(model), _params(reference), atol=1e-7)
            assert all(r is None for r in residuals)
    assert wire[0] == wire[1] == 1.0 and wire[2] < 0.3
    assert sum(r is not None for r in residuals) == 3        # the 40x12, 40x40, 3x40 weights; biases bypass



def test_codec_time_counts_the_compressors_own_work():
    """codec_time_s: the seconds inside compressor code, none while everything rides the bypass."""
    model = _mlp()
    topk = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.named_parameters(),
                                compression=Policy(default=TopK(0.1), min_numel=100))
    _backward(model, 0)
    topk.step()
    stats = topk.new_step_stats()
    assert 0.0 < stats.codec_time_s < 10.0
    topk.remove_hooks()
    bypass = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.named_parameters(),
                                  compression=Policy(default=None, min_numel=10**9))
    model.zero_grad()
    _backward(model, 1)
    bypass.step()
    assert bypass.new_step_stats().codec_time_s == 0.0
