"""`compression = "auto"` on real ranks, launched by tests/test_auto.py under mpirun:

    python auto_checks.py decide     dense warm-up, rank 0 measures and picks per layer, every rank
                                     applies the same choice and trains on with identical parameters;
                                     a larger global batch decides again; the link is probed
    python auto_checks.py hierarchical   under HPCTRAIN_RANKS_PER_NODE (several simulated nodes) and a
                                     slow link, auto runs the sparse compressor hierarchically

Rank 0 prints one `ok ...` line per check and an `event ...` line per decision.
"""
from __future__ import annotations

import sys
import time

import torch

from hpctrain import comm
from hpctrain.cli import run_guarded
from hpctrain.compression import Policy
from hpctrain.compression.auto import AutoCompression, build_candidates
from hpctrain.compression.policy import DENSE
from hpctrain.optimizer import DistributedOptimizer

from optimizer_checks import MIN_NUMEL, batch, loss_of, make_model, ok


def decide_checks() -> None:
    for link in ("auto", "1mbit"):
        decide(link)


def train_steps(opt: DistributedOptimizer, auto: AutoCompression, model: torch.nn.Module, steps: int) -> list[dict]:
    """`steps` optimizer steps with auto deciding when due (the global batch grows at step 8);
    the decision events, each checked to be applied alike on every rank."""
    events, batch_size = [], 8
    for step in range(steps):
        if step == 8:
            batch_size = 32                     # batch growth: the ratio of compute to communication changes
        start = time.perf_counter()
        loss_of(model, *batch(step, size=batch_size)).backward()
        opt.synchronize()
        stats = opt.new_step_stats()
        with opt.skip_synchronize():
            opt.step()
        step_s = time.perf_counter() - start
        row = auto.step_done(step + 1, batch_size * comm.size(), step_s, stats.comm_time_s)
        if row is not None:
            events.append(row)
            names = comm.get().allgather_object(opt.compressor_names)
            assert all(n == names[0] for n in names), f"ranks disagree on the choice: {names}"
        opt.zero_grad()
    return events


def identical_parameters(model: torch.nn.Module) -> None:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    everyone = comm.get().allgather_object(params)
    assert all(torch.equal(t[n], params[n]) for t in everyone for n in params), "parameters differ between ranks"


def decide(link: str) -> None:
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                               [(f"{link}.{n}", p) for n, p in model.named_parameters()],
                               compression=Policy(default=DENSE, min_numel=MIN_NUMEL))
    auto = AutoCompression(build_candidates(), warmup_steps=3, link=link)
    auto.attach(opt)
    events = train_steps(opt, auto, model, 12)
    assert [e["step"] for e in events] == [3, 10], events      # batch change: one step to capture the new gradients
    assert all(e["reason"].startswith("compression auto") and ("per layer" in e["reason"] or "dense everywhere" in e["reason"])
               for e in events), events
    if link == "1mbit":                # a slow link: some layer must be compressed, and training goes on
        assert set(auto.choice.per_layer.values()) != {"none"}, auto.choice
    identical_parameters(model)
    if comm.rank() == 0:
        for event in events:
            print("event", event, flush=True)
        print("choice", auto.choice.per_layer, flush=True)
    opt.remove_hooks()
    ok(f"auto link={link}: decided after the warm-up and again on batch growth; every rank applied the same choice; "
       "parameters identical")


def hierarchical_checks() -> None:
    """4 ranks as 2 nodes × 2, a 1 Mbit/s link between them: the sparse compressor's allgather
    among one leader per node beats the flat one, so auto turns the hierarchical exchange on."""
    model = make_model()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(),
                               compression=Policy(default=DENSE, min_numel=MIN_NUMEL))
    assert not opt.hierarchical
    auto = AutoCompression({"none": None, **build_candidates(("adacomp",))}, warmup_steps=3, link="1mbit",
                           ranks_per_node=comm.local_size())
    auto.attach(opt)
    events = train_steps(opt, auto, model, 6)
    assert auto.choice.hierarchical and opt.hierarchical, auto.choice
    assert "hierarchical over 2 nodes" in events[0]["reason"], events
    identical_parameters(model)
    opt.remove_hooks()
    ok("auto hierarchical: chose the hierarchical exchange on 2 nodes × 2 over a slow link; parameters identical")


CHECKS = {"decide": decide_checks, "hierarchical": hierarchical_checks}

if __name__ == "__main__":
    comm.init()
    sys.exit(run_guarded(CHECKS[sys.argv[1]]))
