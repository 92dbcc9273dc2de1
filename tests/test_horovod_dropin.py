"""hpctrain.DistributedOptimizer as a drop-in for hvd.DistributedOptimizer (issue 21): the recipes
Horovod users rely on, on real ranks and on both engines (tests/mpi_workers/horovod_recipes.py
holds the checks; rank 0 reports one `ok ...` line each), and the argument errors in-process."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from hpctrain.local_launch import run_mpi
from tests.helpers import REPO

WORKER = [sys.executable, str(REPO / "tests" / "mpi_workers" / "horovod_recipes.py")]
ENGINES = ("horovod", "torch")
COMPRESSORS = ("dense", "fp16", "topk", "threshold", "adacomp", "lowrank")


def _passed(np: int, check: str, engine: str, env: dict[str, str] | None = None) -> list[str]:
    proc = run_mpi(np, [check], program=WORKER, timeout=240, env={"HPCTRAIN_BACKEND": engine, **(env or {})})
    prefix = f"ok [{engine}] "
    return [line[len(prefix):] for line in proc.stdout.splitlines() if line.startswith(prefix)]


def _has(passed: list[str], start: str) -> bool:
    return any(line.startswith(start) for line in passed)


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_horovod_recipes_work_unchanged_on_two_ranks(engine):
    passed = _passed(2, "recipes", engine)
    if engine == "horovod":
        assert _has(passed, "resume with hvd.broadcast_optimizer_state: every rank holds the root's"), passed
    assert _has(passed, "resume with hpctrain.broadcast_optimizer_state: every rank holds the root's"), passed
    assert _has(passed, "clipping: synchronize, clip_grad_norm_, step in skip_synchronize"), passed
    for compression in COMPRESSORS:
        assert _has(passed, f"amp {compression}: fp16 autocast + GradScaler skips exactly the overflow steps"), passed
    assert _has(passed, "amp natural overflows:"), passed
    for variant in ("bypass", "allgather", "sparse_as_dense"):
        assert _has(passed, f"sparse {variant}: nn.Embedding(sparse=True) + SparseAdam =="), passed
    for label in ("op=Sum", "op='average'", "gradient_predivide_factor=4"):
        assert _has(passed, f"{label}: the exchanged gradients are the"), passed


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_process_sets_average_over_the_set_only_on_four_ranks(engine):
    passed = _passed(4, "sets", engine, env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})
    for compression in ("dense", "topk"):
        assert _has(passed, f"process sets {compression}: gradients averaged over the set only"), passed
    assert "process sets: a set this rank is not in is a ValueError" in passed


# -- argument errors are ValueErrors (raised before any communication) -----------------------
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def _wrap(model: nn.Module, **kwargs):
    from hpctrain.optimizer import DistributedOptimizer

    named = kwargs.pop("named_parameters", model.named_parameters())
    return DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named, **kwargs)


def test_duplicate_named_parameters_are_a_value_error():
    model = _model()
    named = [("w", p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"duplicate names \['w'\]"):
        _wrap(model, named_parameters=named)


def test_missing_named_parameters_are_a_value_error():
    model = _model()
    with pytest.raises(ValueError, match="missing from named_parameters"):
        _wrap(model, named_parameters=list(model.named_parameters())[:1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(backward_passes_per_step=0), "backward_passes_per_step=0: must be >= 1"),
    (dict(fusion="sideways"), "fusion='sideways'"),
    (dict(op=2), "op=Adasum is not supported"),                 # hvd.Adasum
    (dict(op="adasum"), "op=Adasum is not supported"),
    (dict(op="max"), "op='max': choose"),
    (dict(op=1, gradient_predivide_factor=2.0), "only supported with op=Average"),   # hvd.Sum
    (dict(gradient_predivide_factor=0.0), "must be > 0"),
    (dict(groups=0), "groups=0"),
    (dict(groups=[[torch.zeros(1)]]), "parameters of the wrapped optimizer"),
])
def test_bad_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _wrap(_model(), **kwargs)


def test_invalid_argument_is_also_a_user_error():
    from hpctrain.errors import InvalidArgument, UserError

    assert issubclass(InvalidArgument, UserError) and issubclass(InvalidArgument, ValueError)


def test_horovod_constants_are_the_ints_hpctrain_maps():
    hvd = pytest.importorskip("horovod.torch")
    from hpctrain.optimizer.reduction import _HOROVOD_OPS

    assert (_HOROVOD_OPS[hvd.Average], _HOROVOD_OPS[hvd.Sum], _HOROVOD_OPS[hvd.Adasum]) == ("average", "sum", "adasum")
