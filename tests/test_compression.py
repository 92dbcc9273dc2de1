"""Single-process tests of every gradient codec, driven through `simulate` (N ranks in-process)."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from hpctrain.compression import (FP16, AdaComp, Collective, LowRank, NoCompression, ParamState, Policy,
                                  SignSGD, Threshold, TopK, describe, kernels, policy_from_config, registry,
                                  simulate)
from hpctrain.compression.base import Compressor
from hpctrain.config import COMPRESSOR_NAMES, config_from_dict
from hpctrain.errors import UserError
from hpctrain.compression.synthetic import heavy_tailed_grads

WORLD = 3
CONV = (16, 8, 3)        # 384 entries: 7.68 bins of 50, so the last bin is ragged
FC = (40, 37)            # 1480 entries: 2.96 bins of 500
ERROR_FEEDBACK = {
    "topk": TopK(ratio=0.05),
    "threshold": Threshold(density=0.02, refresh_every=4),
    "adacomp": AdaComp(conv_bin=50, fc_bin=500, quantize=True),
    "adacomp-fp32": AdaComp(conv_bin=50, fc_bin=500, quantize=False),
    "lowrank": LowRank(rank=3, power_iterations=1),
    "lowrank-2it-cold": LowRank(rank=3, power_iterations=2, warm_start=False),
    "signsgd": SignSGD(),
}
ALL = {**ERROR_FEEDBACK, "none": NoCompression(), "fp16": FP16()}
SPARSE = ["topk", "threshold", "adacomp", "adacomp-fp32"]


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """allclose with atol = rtol = tol (torch.testing.assert_close costs seconds of imports)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), f"max |diff| {(actual - expected).abs().max():.3g}"


def grads_for(shape, world: int, seed: int, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(world)]


def fresh_states(world: int, name: str = "layer.weight") -> list[ParamState]:
    return [ParamState(name) for _ in range(world)]


def step(compressor: Compressor, grads, states, rounds=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One exchange as the optimizer runs it; returns (averaged per rank, what each rank sent)."""
    before = [g.float() + (0 if s.residual is None else s.residual) for g, s in zip(grads, states)]
    out = simulate(compressor, grads, states, rounds)
    for s in states:
        s.steps += 1
    sent = [b - s.residual if compressor.error_feedback else b for b, s in zip(before, states)]
    return out, sent


@pytest.mark.parametrize("shape", [CONV, FC], ids=["conv", "fc"])
@pytest.mark.parametrize("key", list(ALL))
def test_average_is_mean_of_what_each_rank_sent(key, shape):
    compressor, states = ALL[key], fresh_states(WORLD)
    for t in range(3):
        grads = grads_for(shape, WORLD, seed=t)
        out, sent = step(compressor, grads, states)
        for o in out[1:]:
            assert torch.equal(o, out[0]), "ranks must get bit-identical averages"
        tol = 1e-3 if key == "fp16" else 1e-5
        assert_near(out[0], torch.stack(sent).mean(0), tol)
        assert out[0].shape == shape and out[0].dtype == torch.float32


@pytest.mark.parametrize("key", SPARSE)
def test_sparse_decode_of_own_payload_is_what_was_sent(key):
    """Decoding one rank's payload alone (a world of 1) gives exactly what left its residual,
    and the N-rank average equals the average of those per-rank decodes."""
    compressor, states = ALL[key], fresh_states(WORLD)
    for t in range(3):
        grads = grads_for(CONV, WORLD, seed=10 + t)
        alone = [step(compressor, [g], [copy.deepcopy(s)]) for g, s in zip(grads, states)]
        out, sent = step(compressor, grads, states)
        for (own, own_sent), s in zip(alone, sent):
            assert_near(own[0], own_sent[0], 1e-6)
            assert_near(own[0], s, 1e-6)
        assert_near(out[0], torch.stack([a[0][0] for a in alone]).mean(0), 1e-6)


@pytest.mark.parametrize("key", list(ERROR_FEEDBACK))
def test_error_feedback_loses_nothing(key):
    """World of 1: the decoded gradients summed over steps plus the final residual are the summed gradients."""
    compressor, states = ERROR_FEEDBACK[key], fresh_states(1)
    total_in, total_out = torch.zeros(FC), torch.zeros(FC)
    for t in range(12):
        (g,) = grads_for(FC, 1, seed=100 + t)
        (out,), _ = step(compressor, [g], states)
        total_in += g
        total_out += out
    assert_near(total_out + states[0].residual, total_in, 1e-4)
    assert states[0].residual.abs().sum() > 0, "a compressor that sends everything tests nothing"


@pytest.mark.parametrize("key", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_grads_keep_their_dtype(key, dtype):
    compressor, states = ALL[key], fresh_states(2)
    grads = grads_for(CONV, 2, seed=7, dtype=dtype)
    out, sent = step(compressor, grads, states)
    assert all(o.dtype == dtype and o.shape == CONV for o in out)
    if compressor.error_feedback:
        assert states[0].residual.dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_near(out[0].float(), torch.stack(sent).mean(0), tol)


@pytest.mark.parametrize("key", list(ALL))
def test_zero_gradient_sends_zero_without_nan(key):
    compressor, states = ALL[key], fresh_states(2)
    out, _ = step(compressor, [torch.zeros(FC)] * 2, states)
    assert torch.equal(out[0], torch.zeros(FC))


def test_compensate_never_writes_into_the_gradient():
    grad = torch.randn(FC)
    kept = grad.clone()
    for compressor in ERROR_FEEDBACK.values():
        step(compressor, [grad], fresh_states(1))
        assert torch.equal(grad, kept)


@pytest.mark.parametrize("length", [1, 7, 50, 500, 3000])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grad_scale", [1.0, 0.01], ids=["many-hits", "few-hits"])
def test_cpu_bin_max_kernel_equals_the_torch_ops(length, grad_dtype, grad_scale):
    """numba's selection and the GPU path's torch ops pick the same indices: ragged last bin and
    block, an all-zero bin (nothing sent), ties with the bin maximum (sent), with many entries
    per 64-entry mask sent and few."""
    gen = torch.Generator().manual_seed(length)
    residue = torch.randn(10_000 + 3, generator=gen)
    residue[:length] = 0
    grad = (grad_scale * torch.randn(residue.numel(), generator=gen)).to(grad_dtype)
    grad[:length] = 0
    residue[length:2 * length] = torch.where(torch.arange(length) == 0, 2.0, 1.0)
    grad[length:2 * length] = 0
    expected, expected_scale = kernels._reaching_bin_max_torch(residue, grad, length)
    picked, scale = kernels.reaching_bin_max(residue, grad, length)
    assert picked.dtype == torch.int64 and picked.numel() > 0
    assert torch.equal(picked, expected)
    assert scale == pytest.approx(float(expected_scale), rel=1e-5)
    tie_bin = [i for i in picked.tolist() if length <= i < 2 * length]
    assert tie_bin == [length]                              # |H| == max |G| goes; the 1s stay
    assert not any(i < length for i in picked.tolist())     # the all-zero bin sends nothing


@pytest.mark.parametrize("bound", [0.5, 3.0, 10.0])
def test_cpu_threshold_kernel_equals_the_torch_ops(bound):
    values = torch.randn(100_003, generator=torch.Generator().manual_seed(3))
    values[7] = -bound                                      # |value| == bound is sent
    expected = (values.abs() >= bound).nonzero().squeeze(1)
    assert torch.equal(kernels.at_least(values, torch.tensor(bound)), expected)
    assert 7 in kernels.at_least(values, bound).tolist()


# -- AdaComp --------------------------------------------------------------------------------
def test_adacomp_selects_by_the_papers_rule():
    """Bins of 4: send where |G + grad| >= max |G| of the bin, G = residue + grad."""
    compressor = AdaComp(fc_bin=4, quantize=False)
    state = ParamState("w", residual=torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]))
    grad = torch.tensor([-0.5, 1.0, 2.0, 0.1, 0.0, 0.2, -0.5, 0.3, 0.0, 0.0])
    # G = [2.5, 1, 2, .1 | 0, .2, -1.5, .3 | 0, 0];  H = G + grad = [2, 2, 4, .2 | 0, .4, -2, .6 | 0, 0]
    # bin maxima of |G|: 2.5, 1.5, 0 → sent: index 2 (|4| >= 2.5), index 6 (|-2| >= 1.5); zero bin sends nothing
    (out,), (sent,) = step(compressor, [grad], [state])
    expected = torch.zeros(10)
    expected[2], expected[6] = 2.0, -1.5
    assert torch.equal(out, expected) and torch.equal(sent, expected)


def test_adacomp_quantised_sends_sign_times_one_scale():
    """The scale is the mean max |G| over the bins not all zero, those that send (2.5, 1.5) and
    those that do not (G = [4, 0, 0, 0], H = [3, ...]: nothing reaches 4); the zero bin is left out."""
    compressor = AdaComp(fc_bin=4)
    state = ParamState("w", residual=torch.tensor([3.0, 0, 0, 0, 0, 0, -1.0, 0, 5.0, 0, 0, 0, 0, 0, 0, 0]))
    grad = torch.tensor([-0.5, 1.0, 2.0, 0.1, 0.0, 0.2, -0.5, 0.3, -1.0, 0, 0, 0, 0, 0, 0, 0])
    rounds: list[list[Collective]] = []
    (out,), _ = step(compressor, [grad], [state], rounds)
    scale = (2.5 + 1.5 + 4.0) / 3
    expected = torch.zeros(16)
    expected[2], expected[6] = scale, -scale
    assert torch.equal(out, expected)
    assert rounds[0][0].nbytes == 2 * 2 + 4 + 4   # two 16-bit signed gap codes, count, scale


def sign_payloads(send_signs):
    """Three ranks' residues (long gaps, an empty rank, a gap of exactly GAP_LIMIT) through
    `send_signs` → (codes, counts, scales, the residues after sending, what each rank sent)."""
    limit, numel = kernels.GAP_LIMIT, 10**6 + 1
    ranks = [([0, 5, 5 + limit, 5 + 3 * limit + 7, 10**6], [-1.0, 2.0, -3.0, 4.0, 5.0]), ([], []),
             ([limit - 1, 2 * limit - 1], [0.5, -0.25])]
    codes, counts, scales, residues, sent = [], [], [], [], []
    for indices, values in ranks:
        residue, index = torch.zeros(numel), torch.tensor(indices, dtype=torch.long)
        residue[index] = torch.tensor(values)
        before = residue.clone()
        code, scale = send_signs(residue, index, residue[index].abs().mean() if values else 0.0)
        codes.append(code)
        counts.append(code.shape[0])
        scales.append(scale)
        residues.append(residue)
        sent.append(before - residue)
    return torch.cat(codes), torch.tensor(counts, dtype=torch.int32), torch.cat(scales), residues, sent


@pytest.mark.parametrize("implementation", ["cpu", "torch"])
def test_sign_codes_round_trip_long_gaps_and_empty_ranks(implementation):
    send, mean = ((kernels.send_signs, kernels.mean_of_signs) if implementation == "cpu" else
                  (kernels._send_signs_torch, kernels._mean_of_signs_torch))
    codes, counts, scales, _, sent = sign_payloads(send)
    assert codes.dtype == torch.uint8 and codes.shape[1] == 2          # 2 bytes per code
    assert counts.tolist() == [5 + 2 + 27, 0, 2]         # 0 codes bridge the two long gaps
    assert_near(scales, torch.tensor([3.0, 0.0, 0.375]), 1e-7)
    assert torch.equal(sent[0][[0, 5]], torch.tensor([-3.0, 3.0]))       # sign × the rank's scale
    assert_near(mean(codes, counts, scales, sent[0].numel()), sum(sent) / 3, 1e-7)


def test_cpu_sign_codes_equal_the_torch_ops():
    cpu, reference = sign_payloads(kernels.send_signs), sign_payloads(kernels._send_signs_torch)
    for got, expected in zip(cpu[:3], reference[:3]):
        assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(cpu[3], reference[3]))   # residues after sending
    codes, counts, scales = cpu[:3]
    assert torch.equal(kernels.mean_of_signs(codes, counts, scales, 10**6 + 1),
                       kernels._mean_of_signs_torch(codes, counts, scales, 10**6 + 1))


def test_cpu_take_and_scatter_equal_the_torch_ops():
    """Exact values: taking zeroes the residue, and the scatter adds duplicates across ranks in
    rank order, bit for bit as `index_put_(accumulate=True)` does."""
    gen = torch.Generator().manual_seed(5)
    flat = torch.randn(50_000, generator=gen)
    indices = torch.randperm(50_000, generator=gen)[:4000]
    reference = flat.clone()
    assert torch.equal(kernels.take_sent(flat, indices), kernels._take_sent_torch(reference, indices))
    assert torch.equal(flat, reference) and not flat[indices].any()
    values = torch.randn(3 * 4000, generator=gen)
    gathered = torch.cat([indices, indices.flip(0), indices[:4000]]).to(torch.int32)   # 3 ranks, duplicates
    assert torch.equal(kernels.scatter_mean(values, gathered, 3, 50_000),
                       kernels._scatter_mean_torch(values, gathered, 3, 50_000))


def test_corrupt_sparse_payloads_are_refused_not_written_out_of_bounds():
    with pytest.raises(RuntimeError, match="beyond the tensor"):
        kernels.scatter_mean(torch.ones(2), torch.tensor([3, 10], dtype=torch.int32), 1, 10)
    codes = torch.tensor([3, 9], dtype=torch.int16).view(torch.uint8).view(-1, 2)
    with pytest.raises(RuntimeError, match="beyond the tensor"):
        kernels.mean_of_signs(codes, torch.tensor([2], dtype=torch.int32), torch.ones(1), 10)
    with pytest.raises(RuntimeError, match="2 codes where the counts say 3"):
        kernels.mean_of_signs(codes, torch.tensor([1, 2], dtype=torch.int32), torch.ones(2), 10)


def test_adacomp_per_rank_scales_are_expanded_over_their_own_entries():
    compressor = AdaComp(fc_bin=1000)
    grads = [torch.zeros(2000), torch.zeros(2000)]
    grads[0][5], grads[0][1500] = 1.0, -3.0       # rank 0: scale 2, in bins 0 and 1
    grads[1][5] = 10.0                            # rank 1: scale 10, and an all-zero second bin
    out, _ = step(compressor, grads, fresh_states(2))
    expected = torch.zeros(2000)
    expected[5], expected[1500] = (2.0 + 10.0) / 2, -2.0 / 2
    assert torch.equal(out[0], expected)


@pytest.mark.parametrize(("shape", "gaussian_min", "heavy_min"), [
    ((32, 32, 3, 3), 15, 40),    # conv: bins of 50
    ((256, 256), 100, 200),       # fc: bins of 500
], ids=["conv", "fc"])
def test_adacomp_wire_ratio(shape, gaussian_min, heavy_min):
    """Steady-state wire ratio (dense fp32 bytes / bytes handed to the network), steps 10..39.

    The paper's ≈40× (conv) / ≈200× (fc) holds on gradient-like data (measured 44.7× and
    290×); on i.i.d. Gaussian noise the same rule sends more entries per bin (19.7× and 127×)."""
    gen = torch.Generator().manual_seed(0)
    for data, bound in (([torch.randn(shape, generator=gen) for _ in range(40)], gaussian_min),
                        (heavy_tailed_grads(shape, 40, torch.Generator().manual_seed(0)), heavy_min)):
        state, wire = ParamState("w"), []
        for g in data:
            rounds: list[list[Collective]] = []
            step(AdaComp(), [g], [state], rounds)
            wire.append(rounds[0][0].nbytes)
        ratio = 4 * math.prod(shape) * 30 / sum(wire[10:])
        assert ratio >= bound, f"{ratio:.1f}x < {bound}x"


# -- Threshold ------------------------------------------------------------------------------
def test_threshold_density_tracks_target():
    """Exact at a refresh; between refreshes the count stays within `drift` of the target,
    or the very next step re-tunes the threshold."""
    compressor, state = Threshold(density=0.005, refresh_every=1000), ParamState("w")
    numel, counts, thresholds = 200 * 500, [], []
    target = 0.005 * numel
    for t in range(40):
        rounds: list[list[Collective]] = []
        step(compressor, grads_for((200, 500), 1, seed=t), [state], rounds)
        counts.append(rounds[0][0].payloads[0].numel())
        thresholds.append(float(state.memory.threshold))
    assert counts[0] == target
    for t in range(39):
        assert target / 2 <= counts[t] <= 2 * target or thresholds[t + 1] != thresholds[t], (t, counts[t])
    assert target <= sum(counts) / len(counts) <= 2.5 * target


def test_threshold_is_recomputed_only_on_schedule_when_drift_is_allowed():
    compressor, state = Threshold(density=0.01, refresh_every=5, drift=1e9), ParamState("w")
    seen = []
    for t in range(12):
        step(compressor, grads_for(FC, 1, seed=t), [state])
        seen.append(float(state.memory.threshold))
    changes = [t for t in range(1, 12) if seen[t] != seen[t - 1]]
    assert changes == [5, 10]


def test_threshold_refreshes_when_count_drifts():
    """After the first refresh the residual grows, too many entries pass, and it re-tunes."""
    compressor, state = Threshold(density=0.01, refresh_every=1000), ParamState("w")
    thresholds = []
    for t in range(10):
        step(compressor, grads_for((100, 100), 1, seed=t), [state])
        thresholds.append(float(state.memory.threshold))
    assert len(set(thresholds)) > 1 and thresholds[-1] > thresholds[0]


# -- LowRank --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 24), (16, 4, 3)], ids=["fc", "conv"])
def test_lowrank_is_exact_on_rank_k_gradients(shape):
    """Ranks' gradients sharing a rank-3 column space are reproduced exactly, residual ≈ 0."""
    gen = torch.Generator().manual_seed(0)
    cols = math.prod(shape[1:])
    basis = torch.randn(shape[0], 3, generator=gen)
    grads = [(basis @ torch.randn(3, cols, generator=gen)).view(shape) for _ in range(WORLD)]
    states = fresh_states(WORLD)
    out, _ = step(LowRank(rank=3), grads, states)
    assert_near(out[0], torch.stack(grads).mean(0), 1e-4)
    assert all(s.residual.abs().max() < 1e-4 for s in states)


def test_lowrank_sends_p_and_q_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rounds: list[list[Collective]] = []
    states = fresh_states(2)
    step(LowRank(rank=4), grads_for((64, 48), 2, seed=1), states, rounds)
    assert torch.equal(torch.get_rng_state(), before)
    assert [r[0].kind for r in rounds] == ["allreduce", "allreduce"]
    assert [tuple(r[0].payloads[0].shape) for r in rounds] == [(64, 4), (48, 4)]
    assert torch.equal(states[0].memory.q, states[1].memory.q)   # warm start: same on every rank


def test_lowrank_applies_only_where_it_saves_bytes():
    lowrank = LowRank(rank=4)
    assert not lowrank.applies_to(torch.Size([100]))
    assert not lowrank.applies_to(torch.Size([4, 100]))        # rank >= min(n, m)
    assert not lowrank.applies_to(torch.Size([6, 6]))          # P and Q would be bigger than M
    assert lowrank.applies_to(torch.Size([64, 48]))
    assert lowrank.applies_to(torch.Size([16, 4, 3]))


# -- state, checkpoints, devices ------------------------------------------------------------
@pytest.mark.parametrize("key", ["threshold", "lowrank", "adacomp"])
def test_state_dict_round_trip_resumes_identically(key):
    compressor, states = ALL[key], fresh_states(2)
    for t in range(3):
        step(compressor, grads_for(CONV, 2, seed=t), states)
    buffer = io.BytesIO()
    torch.save([s.state_dict() for s in states], buffer)
    buffer.seek(0)
    restored = fresh_states(2)
    for s, saved in zip(restored, torch.load(buffer)):
        s.load_state_dict(saved, torch.device("cpu"))
    grads = grads_for(CONV, 2, seed=99)
    out_a, _ = step(compressor, grads, states)
    out_b, _ = step(compressor, grads, restored)
    assert torch.equal(out_a[0], out_b[0])
    assert all(torch.equal(a.residual, b.residual) and a.steps == b.steps for a, b in zip(states, restored))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("key", list(ALL))
def test_cuda_matches_cpu(key):
    compressor = ALL[key]
    cpu_states, gpu_states = fresh_states(2), fresh_states(2)
    for t in range(3):
        grads = grads_for(FC, 2, seed=t)
        cpu, _ = step(compressor, grads, cpu_states)
        gpu, _ = step(compressor, [g.cuda() for g in grads], gpu_states)
        assert gpu[0].is_cuda and torch.equal(gpu[0], gpu[1])
        assert_near(gpu[0].cpu(), cpu[0], 1e-4)
        if compressor.error_feedback:
            assert gpu_states[0].residual.is_cuda


# -- policy and config ----------------------------------------------------------------------
def test_policy_rules_globs_and_bypass():
    adacomp, topk = AdaComp(), TopK()
    policy = Policy(default=adacomp, rules={"*.bias": None, "head.*": topk, "head.weight": LowRank()},
                    min_numel=100)
    big, matrix, vector = torch.zeros(200, 3), torch.zeros(64, 48), torch.zeros(500)
    assert policy.resolve("body.0.weight", big) is adacomp
    assert policy.resolve("head.weight", matrix) is topk            # first matching rule wins
    assert isinstance(policy.resolve("body.0.bias", vector), NoCompression)   # rule None: dense
    assert policy.resolve("body.1.weight", torch.zeros(99)) is None          # small: fused bypass
    assert Policy(default=LowRank()).resolve("x", vector) is None            # shape: bypass
    assert isinstance(Policy().resolve("x", matrix), NoCompression)


def test_threshold_leaves_tensors_it_would_starve_to_the_dense_bypass():
    """At density 0.001 a tensor must have 8000 entries for 8 of them to go each step."""
    threshold = Threshold(density=0.001)
    assert not threshold.applies_to(torch.Size([10, 128]))       # 1.3 entries per step: dense
    assert threshold.applies_to(torch.Size([128, 320]))          # 41 per step: thresholded
    assert Threshold(density=0.001, min_entries=1).applies_to(torch.Size([10, 128]))
    policy = Policy(default=threshold)
    assert policy.resolve("head.weight", torch.zeros(10, 128)) is None
    assert "min_entries=8" in describe(policy, [("head.weight", torch.zeros(10, 128))])[0]
    table = {"compression": {"name": "threshold", "threshold": {"min_entries": 1}}}
    assert policy_from_config(config_from_dict(table).compression).default.min_entries == 1


def test_describe_names_every_parameter_and_why():
    policy = Policy(default=LowRank(), rules={"skip.*": None}, min_numel=100)
    params = [("enc.weight", torch.zeros(64, 48)), ("enc.bias", torch.zeros(64)),
              ("big.bias", torch.zeros(500)), ("skip.weight", torch.zeros(64, 48))]
    lines = describe(policy, params)
    assert len(lines) == 4 and all(line.startswith(name) for line, (name, _) in zip(lines, params))
    assert "LowRank(rank=4" in lines[0] and "(64, 48)" in lines[0]
    assert "bypass: small" in lines[1]
    assert "LowRank(rank=4" in lines[2] and "does not apply" in lines[2]
    assert lines[3].rstrip().endswith("dense")


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_policy_from_config_builds_every_compressor(name):
    cfg = config_from_dict({"compression": {
        "name": name, "min_numel": 10, "rules": {"*.bias": "none", "head.*": "fp16"},
        "adacomp": {"conv_bin": 7, "quantize": False}, "threshold": {"density": 0.25},
        "lowrank": {"rank": 2}, "topk": {"ratio": 0.5}}}).compression
    policy = policy_from_config(cfg)
    expected = {"none": type(None), "auto": NoCompression, "fp16": FP16, "topk": TopK, "adacomp": AdaComp,
                "threshold": Threshold, "lowrank": LowRank, "signsgd": SignSGD}[name]
    assert isinstance(policy.default, expected) and policy.min_numel == 10
    assert policy.rules["*.bias"] is None and isinstance(policy.rules["head.*"], FP16)
    hyper = {"topk": ("ratio", 0.5), "adacomp": ("conv_bin", 7), "threshold": ("density", 0.25),
             "lowrank": ("rank", 2)}
    if name in hyper:
        key, value = hyper[name]
        assert getattr(policy.default, key) == value


@pytest.mark.parametrize("block", [0, 256])
def test_signsgd_sends_one_bit_per_entry_and_keeps_what_the_sign_missed(block):
    """Each rank: ceil(n/8) bytes of signs and one fp32 scale per block = its mean |p|;
    residual = p − scale·sign(p)."""
    compressor, states = SignSGD(block=block), fresh_states(WORLD)
    grads = grads_for(FC, WORLD, seed=3)
    rounds: list = []
    out, sent = step(compressor, grads, states, rounds)
    numel = torch.Size(FC).numel()
    blocks = 1 if block == 0 else -(-numel // block)          # 1480 entries: 5 full blocks and 200
    for rank, (g, s, state) in enumerate(zip(grads, sent, states)):
        assert [t.numel() * t.element_size() for t in rounds[0][rank].payloads] == [-(-numel // 8), 4 * blocks]
        flat = g.reshape(-1)
        chunks = [flat] if block == 0 else flat.split(block)
        scale = torch.cat([c.abs().mean().expand(len(c)) for c in chunks]).view(FC)
        assert_near(s, torch.where(g < 0, -scale, scale), 1e-6)
        assert_near(state.residual, g - s, 1e-6)
    assert_near(out[0], torch.stack(sent).mean(0), 1e-6)


def test_a_compressor_is_one_file_and_one_registration_line():
    """The registry names every compressor a config can use; each builds from its own fields."""
    assert set(registry.NAMES) == {"none", "auto", "fp16", "topk", "threshold", "adacomp", "lowrank", "signsgd"}
    for name in registry.COMPRESSORS:
        cls = registry.compressor_class(name)
        assert cls.name == name and isinstance(registry.build(name), cls)
    assert registry.build("threshold", {"drift": 3.0}).drift == 3.0       # every field is a config key


def test_bad_compressor_settings_are_one_line_user_errors():
    for make in (lambda: TopK(ratio=0), lambda: Threshold(density=2), lambda: AdaComp(fc_bin=0),
                 lambda: LowRank(power_iterations=0), lambda: registry.build("zip"),
                 lambda: registry.build("adacomp", {"bins": 3}), lambda: registry.build("none", {"x": 1})):
        with pytest.raises(UserError) as err:
            make()
        assert "\n" not in str(err.value)
