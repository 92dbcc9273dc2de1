"""`compression = "auto"` on real ranks, launched by tests/test_auto.py under mpirun:

    python auto_checks.py decide     dense warm-up, rank 0 measures and picks per layer, every rank
                                     applies the same choice and trains on with identical parameters;
                                     a larger global batch decides again; the link is probed
    python auto_checks.py check      the first choice measured slower than the dense steps goes back
                                     to dense on every rank; measured faster, it stays
    python auto_checks.py race       the model's plan and an alternative measured in turn, dense again
                                     beside them: the fastest of the three stays on every rank
    python auto_checks.py hierarchical   under HPCTRAIN_RANKS_PER_NODE (several simulated nodes) and a
                                     slow link, auto runs the sparse compressor hierarchically

Rank 0 prints one `ok ...` line per check and an `event ...` line per decision.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch

from hpctrain import comm
from hpctrain.cli import run_guarded
from hpctrain.compression import Policy
from hpctrain.compression.auto import BYPASS, AutoCompression, build_candidates
from hpctrain.compression.policy import DENSE
from hpctrain.optimizer import DistributedOptimizer

from optimizer_checks import MIN_NUMEL, batch, loss_of, make_model, ok


def decide_checks() -> None:
    for link in ("auto", "1mbit"):
        decide(link)
    ok(f"fusion buffer {comm.get().fusion_bytes} bytes")        # what auto's model fuses into


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
    measuring = ("measuring the alternative", "keeps ", "back to dense")     # settling the first decision
    decisions = [e["step"] for e in events if not any(m in e["reason"] for m in measuring)]
    assert decisions == [3, 10], events      # batch change: one step to capture the new gradients
    assert all(e["reason"].startswith("compression auto") and ("per layer" in e["reason"] or "dense everywhere" in e["reason"])
               for e in events), events
    if link == "1mbit":                # a slow link: some layer must be compressed, and training goes on
        assert set(auto.choice.per_layer.values()) - {"none", BYPASS}, auto.choice
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


def given_times(name: str, candidates: tuple[str, ...], steps: int, plan_seconds: Callable[[str], float],
                **options: Any) -> tuple[list[dict], dict[str, str]]:
    """`steps` steps of one 64×64 layer under auto over a 1 kbit/s link (AdaComp the model's choice)
    whose step times are given, not measured, so the verdicts do not depend on this machine: dense
    steps "take" 0.1 s (0.09 of it the exchange), a plan's `plan_seconds(its compressor)` + 0.01 × rank.
    The events rows, and the compressors every rank ended with (checked to agree)."""
    layer = torch.nn.Linear(64, 64, bias=False)
    opt = DistributedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), [(name, layer.weight)],
                               compression=Policy(default=DENSE, min_numel=16))
    auto = AutoCompression({"none": None, **build_candidates(candidates)}, warmup_steps=3, link="1kbit", **options)
    auto.attach(opt)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(comm.rank()))
    rows = []
    for step in range(1, steps + 1):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        dense = auto.choice is None
        step_s = 0.1 if dense else plan_seconds(opt.compressor_names[name]) + 0.01 * comm.rank()
        row = auto.step_done(step, 8 * comm.size(), step_s, 0.09 if dense else 0.0)
        rows += [row] if row is not None else []
    names = comm.get().allgather_object(opt.compressor_names)
    assert all(n == names[0] for n in names), f"ranks disagree: {names}"
    opt.remove_hooks()
    return rows, names[0]


def check_checks() -> None:
    """The model's plan alone (AdaComp the only candidate), measured slower or faster than dense."""
    for after, back in ((0.2, True), (0.05, False)):
        name = f"{after}.w"
        rows, names = given_times(name, ("adacomp",), 11, lambda plan: after)
        assert "adacomp ×1" in rows[0]["reason"], rows
        if back:
            assert len(rows) == 2 and rows[1]["step"] == 8 and "back to dense everywhere" in rows[1]["reason"], rows
            assert names == {name: "none"}, names
            ok("auto check slower: measured slower than dense, every rank went back to dense at the same step")
        else:
            assert len(rows) == 1 and names == {name: "adacomp"}, (rows, names)
            ok("auto check faster: measured faster than dense, the choice stays")


def race_checks() -> None:
    """The model's plan (AdaComp) and an alternative (fp16 alone, let in by an infinite window) run
    4 steps each; the fastest and the warm-up's dense steps (0.1 s) are within that window of each
    other, so dense runs 4 steps again beside them and the fastest of the three stays (the two
    fastest 1.5× apart: none measured again). (Outside the window dense comes back at once: `check`.)"""
    cases = (({"adacomp": 0.08, "fp16": 0.06}, "fp16"), ({"adacomp": 0.2, "fp16": 0.3}, "none"),
             ({"adacomp": 0.09, "fp16": 0.105, "none": 0.07}, "none"),
             ({"adacomp": 0.12, "fp16": 0.18, "none": 0.15}, "adacomp"))
    for case, (seconds, kept) in enumerate(cases):
        name = f"{case}.w"
        rows, names = given_times(name, ("adacomp", "fp16"), 20, lambda plan: seconds.get(plan, 0.1),
                                  trial_window=float("inf"))
        assert [r["step"] for r in rows] == [3, 8, 13, 18], rows
        assert "adacomp ×1" in rows[0]["reason"] and "measuring the alternative per layer fp16 ×1" in rows[1]["reason"], rows
        assert "measuring the alternative dense everywhere again" in rows[2]["reason"], rows
        assert names == {name: kept}, (names, rows)
        dense = f"vs dense {seconds.get('none', 0.1) * 1e3:.3g} ms (measured again)"
        verdict = "back to dense everywhere" if kept == "none" else f"keeps per layer {kept} ×1"
        assert verdict in rows[3]["reason"] and dense in rows[3]["reason"], rows
    ok("auto race: two plans and dense again measured one after the other, every rank kept the fastest of the "
       "three (fp16; dense, faster than both or than the warm-up's; adacomp, when the warm-up's dense steps were lucky)")


def confirm_checks() -> None:
    """AdaComp's first 4 steps are lucky (0.06 s, then 0.12), fp16 takes 0.07 throughout: within
    1.2× of each other, both run 4 steps again, and fp16, faster over all its steps, stays."""
    calls = {"adacomp": 0}

    def seconds(plan: str) -> float:
        if plan != "adacomp":
            return 0.07 if plan == "fp16" else 0.1
        calls["adacomp"] += 1
        return 0.06 if calls["adacomp"] <= 5 else 0.12       # the step after the switch, then 4 measured

    rows, names = given_times("confirm.w", ("adacomp", "fp16"), 30, seconds, trial_window=float("inf"))
    assert [r["step"] for r in rows] == [3, 8, 13, 18, 23, 28], rows        # AdaComp, fp16, dense again, the two
    assert "measuring again fp16 ×1 and adacomp ×1, the two fastest (70 and 60 ms/step, within 1.2×)" in rows[3]["reason"], rows
    assert "measuring again adacomp ×1 (the plan before it measured 70 ms/step)" in rows[4]["reason"], rows
    assert "keeps per layer fp16 ×1" in rows[5]["reason"] and "adacomp ×1 90 ms" in rows[5]["reason"], rows
    assert names == {"confirm.w": "fp16"}, names
    ok("auto confirm: the two fastest within 1.2× measured again, the lucky first measurement lost to the steadier plan")


CHECKS = {"decide": decide_checks, "hierarchical": hierarchical_checks, "check": check_checks, "race": race_checks,
          "confirm": confirm_checks}

if __name__ == "__main__":
    comm.init()
    sys.exit(run_guarded(CHECKS[sys.argv[1]]))
