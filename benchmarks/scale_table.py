"""The cost model's scale table: which compressor pays at which world size, on Summit-, Frontier-
and Perlmutter-like links (jobs/sites/*.toml [links]), for models of 10M, 100M and 1B parameters.

Pure model, no measurement: compute per step = 6 · parameters · tokens per rank / achieved FLOP/s
(40% of the GPU's dense fp16/bf16 peak); ratios as benchmarks/codec.py measures them on
gradient-like data (TopK 50×, Threshold ~350×, AdaComp fc ~250×, SignSGD 32×; LowRank rank 4
exact from the shapes); codec times modelled from codec.py's multiples of clone() at the GPU's
memory bandwidth (hpctrain/cost/codec.py). Models are stacks of square fc layers.

    python benchmarks/scale_table.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpctrain.compression.registry import build  # noqa: E402
from hpctrain.cost import Layer, Method, predict, site_network  # noqa: E402
from hpctrain.cost import codec as codec_model  # noqa: E402

# site → (GPU, achieved FLOP/s at 40% of the fp16/bf16 dense peak, memory bytes/s)
GPUS = {"summit": ("V100", 0.4 * 125e12, 900e9), "frontier": ("MI250X GCD", 0.4 * 191.5e12, 1.6e12),
        "perlmutter": ("A100", 0.4 * 312e12, 1.555e12)}
MODELS = {"10M": (40, 512), "100M": (24, 2048), "1B": (64, 4096)}      # layers × [width, width]
TOKENS_PER_RANK = 8192
RANKS = [2**i for i in range(3, 14)]          # 8 … 8192
RATIOS = {"topk": 50.0, "threshold": 350.0, "adacomp": 250.0, "signsgd": 32.0}


def model_layers(depth: int, width: int) -> list[Layer]:
    return [layer for i in range(depth) for layer in (Layer(f"l{i}.weight", (width, width)), Layer(f"l{i}.bias", (width,)))]


def methods() -> list[Method]:
    out = [Method("dense"), Method("fp16", build("fp16"))]
    out += [Method(name, build(name), default_ratio=ratio) for name, ratio in RATIOS.items()]
    return out + [Method("lowrank", build("lowrank", {"rank": 4}))]


def ranges(values: list[int]) -> str:
    """[8, 16, 32, 128] → '8–32, 128' over the RANKS grid."""
    if not values:
        return "never"
    spans, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur is None or RANKS.index(cur) != RANKS.index(prev) + 1:
            spans.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = cur
    return ", ".join(spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overlap", type=float, default=0.5, help="fraction of compute that hides communication")
    parser.add_argument("--tokens", type=int, default=TOKENS_PER_RANK, help="tokens (samples) per rank per step")
    parser.add_argument("--detail", default="frontier:1B", help="SITE:MODEL whose step times to print in full")
    args = parser.parse_args(argv)
    ms = methods()
    print(f"World sizes where each method beats dense fp32 (P = {RANKS[0]}…{RANKS[-1]}, powers of 2), "
          f"flat / hierarchical; overlap {args.overlap}, {args.tokens} tokens per rank per step.\n")
    print("| site | model | compute/step | " + " | ".join(m.name for m in ms[1:]) + " |")
    print("|---|---|---:|" + "---|" * (len(ms) - 1))
    detail = {}
    for site, (gpu, flops, memory) in GPUS.items():
        network = site_network(site)
        for label, (depth, width) in MODELS.items():
            layers = model_layers(depth, width)
            params = sum(layer.numel for layer in layers)
            compute = 6 * params * args.tokens / flops
            codecs = {m.name: codec_model.modelled(m, layers, memory) for m in ms if m.compressor is not None}
            wins: dict[tuple[str, bool], list[int]] = {}
            for ranks in RANKS:
                for hier in (False, True):
                    verdict = predict(ms, layers, compute, ranks, network, codecs, hier, args.overlap)
                    dense = verdict.predictions[0].step_s
                    flat_dense = predict(ms[:1], layers, compute, ranks, network, codecs, False, args.overlap).winner.step_s
                    for p in verdict.predictions[1:]:
                        if p.step_s < min(dense, flat_dense) * 0.99:
                            wins.setdefault((p.method, hier), []).append(ranks)
                    if f"{site}:{label}" == args.detail:
                        detail[(ranks, hier)] = verdict
            cells = [f"{ranges(wins.get((m.name, False), []))} / {ranges(wins.get((m.name, True), []))}" for m in ms[1:]]
            print(f"| {site} ({gpu}, {network.ranks_per_node}/node) | {label} ({params / 1e6:.0f}M) | "
                  f"{compute * 1e3:.3g} ms | " + " | ".join(cells) + " |")
    if detail:
        print(f"\nStep time (ms) and winner, {args.detail}, flat | hierarchical:\n")
        print("| P | " + " | ".join(m.name for m in ms) + " | winner (flat) | winner (hier) |")
        print("|---:|" + "---:|" * len(ms) + "---|---|")
        for ranks in RANKS:
            flat, hier = detail[(ranks, False)], detail[(ranks, True)]
            cells = [f"{f.step_s * 1e3:.0f} \\| {h.step_s * 1e3:.0f}" for f, h in zip(flat.predictions, hier.predictions)]
            print(f"| {ranks} | " + " | ".join(cells) + f" | {flat.winner.method} | {hier.winner.method} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
