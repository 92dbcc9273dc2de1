"""Per-sample importance scores of a training split, computed in parallel, stored in scores.h5.

Higher score = harder / rarer / more informative for every method, so `keep = "hardest"` keeps
the high end:

  loss              cross-entropy of the model's prediction
  el2n              ‖softmax − onehot‖₂ (Paul et al. 2021, "Deep learning on a data diet")
  grand             gradient norm of the loss w.r.t. the LAST linear layer, in closed form:
                    ‖(p − y) ⊗ [h, 1]‖ = ‖p − y‖·√(‖h‖² + 1) with h the penultimate features
  forgetting        learned→forgotten transitions over a short training run (Toneva et al. 2019);
                    samples never learned get the number of presentations (more than any count)
  feature-density   mean distance to the k nearest neighbours (or to the class centroid) in the
                    embedding of a frozen extractor (TorchScript or torch.export .pt2 file,
                    module:factory + state dict, or by default the trained model's `embed()`)

The model is a checkpoint (`--checkpoint`) or, without one, a short pre-training run from the
run config; `--seeds N` averages every method's scores over N such runs, each initialised and
shuffled by its own seed (run.seed, run.seed + 1, …), as Paul et al. do for EL2N. Scores do not
depend on the number of ranks: samples are cut into fixed blocks whose contents never change
with the world size, ranks take contiguous runs of blocks, and results are gathered in block
order. The short run stays rank-invariant the same way: each
rank computes the gradients of its fixed blocks, all block gradients are gathered and summed
in block order, so every world size takes exactly the same optimizer steps.

scores.h5 layout (schema `SCHEMA_VERSION`), rows in ascending sample_id order:
  /sample_id int64 [N], /label int64 [N]
  /scores/<method> float64 [N]  attrs: method, model, step, date, data, manifest_sha256, ...
                                (short runs: short_run_epochs, seeds averaged over)
  /embedding float32 [N, D]     (when a method computed one; the first run's)  attrs: model
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hpctrain.atomic import replacing
from hpctrain.errors import UserError

SCHEMA_VERSION = 1
METHODS = ("loss", "el2n", "grand", "forgetting", "feature-density")
SCORE_BLOCK = 256        # samples per evaluation block (fixed: results never depend on world size)
GRAD_BLOCK = 32          # samples per gradient block in the short training run
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


# -- pure per-sample maths -------------------------------------------------------------------

def logit_scores(method: str, logits: torch.Tensor, labels: torch.Tensor,
                 features: torch.Tensor | None = None) -> np.ndarray:
    """loss / el2n / grand for a block, in float64."""
    logits = logits.double()
    if method == "loss":
        return nn.functional.cross_entropy(logits, labels, reduction="none").cpu().numpy()
    error = torch.softmax(logits, dim=1) - nn.functional.one_hot(labels, logits.shape[1]).double()
    el2n = error.norm(dim=1)
    if method == "el2n":
        return el2n.cpu().numpy()
    if features is None:
        raise ValueError("grand needs the penultimate features")
    return (el2n * torch.sqrt(1 + features.double().flatten(1).pow(2).sum(1))).cpu().numpy()


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Learned→forgotten transitions per sample from a [presentations, N] correctness history."""
    correct = np.asarray(correct, dtype=bool)
    forgotten = (correct[:-1] & ~correct[1:]).sum(axis=0)
    return np.where(correct.any(axis=0), forgotten, len(correct)).astype(np.float64)


def knn_distance(embedding: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance to the k nearest other samples (large = sparse region)."""
    from sklearn.neighbors import NearestNeighbors
    if not 0 < k < len(embedding):
        raise UserError(f"--k {k} must be between 1 and the number of samples - 1 ({len(embedding) - 1})")
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return distances[:, 1:].mean(axis=1).astype(np.float64)     # column 0 is the sample itself


def centroid_distance(embedding: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Euclidean distance of each sample to its class centroid."""
    out = np.empty(len(labels), dtype=np.float64)
    emb = embedding.astype(np.float64)
    for c in np.unique(labels):
        members = labels == c
        out[members] = np.linalg.norm(emb[members] - emb[members].mean(axis=0), axis=1)
    return out


def rank_blocks(n: int, block: int, rank: int, size: int) -> list[tuple[int, int]]:
    """This rank's contiguous run of the fixed [lo, hi) blocks covering range(n)."""
    bounds = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
    return bounds[rank * len(bounds) // size:(rank + 1) * len(bounds) // size]


# -- models and extractors -------------------------------------------------------------------

Embed = Callable[[torch.Tensor], torch.Tensor]


def embed_fn(model: nn.Module, what: str) -> Embed:
    if not hasattr(model, "embed"):
        raise UserError(f"{what} has no embed() method giving penultimate features; add one "
                        f"(see hpctrain/models.py) or pass --extractor")
    return lambda x: model.embed(x).flatten(1)


def load_extractor(spec: str, state: str | None, device: torch.device) -> tuple[Embed, str]:
    """A frozen feature extractor: a TorchScript or torch.export (.pt2) file, or `module:factory`
    (+ a state dict file)."""
    if Path(spec).is_file() and spec.endswith(".pt2"):
        try:
            module = torch.export.load(spec).module().to(device)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--extractor {spec}: not a torch.export program ({str(exc).splitlines()[0]}); "
                            f"save it with torch.export.save(torch.export.export(model, (x,)), path)") from None
        return (lambda x: module(x).flatten(1)), spec
    if Path(spec).is_file():
        try:
            module = torch.jit.load(spec, map_location=device)
        except RuntimeError as exc:
            raise UserError(f"--extractor {spec}: not a TorchScript file ({str(exc).splitlines()[0]}); "
                            f"save it with torch.jit.save(torch.jit.script(model), path)") from None
    elif ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            module = getattr(importlib.import_module(module_name), attr)()
        except (ImportError, AttributeError) as exc:
            raise UserError(f"--extractor {spec}: cannot load ({exc}); give an importable module:factory") from None
        if state:
            try:
                module.load_state_dict(torch.load(state, map_location="cpu"))
            except (OSError, RuntimeError) as exc:
                raise UserError(f"--extractor-state {state}: cannot load into {spec} ({str(exc).splitlines()[0]})") from None
        module = module.to(device)
    else:
        raise UserError(f"--extractor {spec!r} is neither an existing TorchScript file nor module:factory")
    module.eval()
    forward = module.embed if hasattr(module, "embed") else module
    return (lambda x: forward(x).flatten(1)), spec


@dataclass
class Trained:
    """A model to score with, and where it came from (provenance)."""
    model: nn.Module
    name: str
    step: int
    history: np.ndarray | None = None       # forgetting: [epochs, N] correctness of each presentation


def from_checkpoint(state: dict[str, Any], path: str, cfg, splits, device: torch.device) -> Trained:
    from hpctrain.models import build_model
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: its weights do not fit model {cfg.model.name!r} on this data "
                        f"({str(exc).splitlines()[0]}); score the data it was trained on") from None
    return Trained(model.to(device).eval(), f"{cfg.model.name} ({path})", int(state.get("step", 0)))


def to_device(dataset, positions: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.get(positions)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def short_run(cfg, splits, device: torch.device, epochs: int, seed: int, rank: int, size: int) -> Trained:
    """Train from scratch (initialised and shuffled by `seed`) for `epochs` on the train split, taking
    the same steps for any world size, and record whether each sample was classified correctly when
    it was trained on."""
    from hpctrain import comm
    from hpctrain.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model.args).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    extra = {"momentum": t.momentum} if t.optimizer == "sgd" else {}
    optimizer = OPTIMIZERS[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay, **extra)
    train, n, batch = splits.train, len(splits.train), cfg.batch.initial
    numel = sum(p.numel() for p in params)
    history = np.zeros((epochs, n), dtype=bool)      # this rank's presentations only; OR-ed at the end
    steps = 0
    with tqdm(total=epochs * -(-n // batch), desc="short run", unit="step", disable=rank != 0) as bar:
        for epoch in range(epochs):
            order = np.random.default_rng((seed, epoch)).permutation(n)
            for start in range(0, n, batch):
                members = order[start:start + batch]
                model.train()
                grads = []
                for lo, hi in rank_blocks(len(members), GRAD_BLOCK, rank, size):
                    x, y = to_device(train, members[lo:hi], device)
                    model.zero_grad(set_to_none=True)
                    logits = model(x)
                    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
                    grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
                    history[epoch, members[lo:hi]] = (logits.argmax(1) == y).cpu().numpy()
                local = torch.stack(grads) if grads else torch.zeros((0, numel), device=device)
                every = comm.get().allgather_async(local, name="hpctrain.score.grads").wait()
                flat = every.sum(dim=0) / len(members)     # block order: same sum for any world size
                for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                    p.grad = g.view_as(p).clone()
                optimizer.step()
                steps += 1
                bar.update()
    history = np.logical_or.reduce(comm.get().allgather_object(history, name="hpctrain.score.history"))
    return Trained(model.eval(), cfg.model.name, steps, history)


# -- one rank's part -------------------------------------------------------------------------

LOGIT_METHODS = ("loss", "el2n", "grand")


@torch.no_grad()
def score_blocks(methods: list[str], train, blocks: list[tuple[int, int]], device: torch.device,
                 model: nn.Module | None, model_embed: Embed | None, extractor: Embed | None,
                 show_progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """This rank's loss/el2n/grand scores, and its embedding (the extractor's if given, else the model's)."""
    logit_methods = [m for m in methods if m in LOGIT_METHODS]
    scores: dict[str, list[np.ndarray]] = {m: [] for m in logit_methods}
    embeddings = []
    for lo, hi in tqdm(blocks, desc="score", unit="block", disable=not show_progress):
        x, y = to_device(train, np.arange(lo, hi), device)
        features = model_embed(x) if model_embed is not None else None
        if logit_methods:
            logits = model(x)
            for m in logit_methods:
                scores[m].append(logit_scores(m, logits, y, features))
        embedding = extractor(x) if extractor is not None else features
        if embedding is not None:
            embeddings.append(embedding.float().cpu().numpy())
    return ({m: np.concatenate(v) if v else np.zeros(0) for m, v in scores.items()},
            np.concatenate(embeddings) if embeddings else None)


# -- scores.h5 -------------------------------------------------------------------------------

@dataclass
class ScoresFile:
    path: Path
    sample_ids: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    attrs: dict[str, dict[str, Any]]
    embedding: np.ndarray | None
    embedding_attrs: dict[str, Any]

    def method(self, name: str) -> np.ndarray:
        if name not in self.scores:
            have = ", ".join(self.scores) or "none"
            raise UserError(f"{self.path} has no {name!r} scores (it has: {have}); compute them with "
                            f"`hpctrain score --data DIR --method {name}`")
        return self.scores[name]


def read_scores(path: str | Path) -> ScoresFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scores file {path} not found; compute it with `hpctrain score --data DIR --method M`")
    try:
        with h5py.File(path, "r") as f:
            group = f.get("scores", {})
            emb = f.get("embedding")
            return ScoresFile(path, f["sample_id"][:], f["label"][:], {k: group[k][:] for k in group},
                              {k: dict(group[k].attrs) for k in group},
                              None if emb is None else emb[:], {} if emb is None else dict(emb.attrs))
    except (OSError, KeyError) as exc:
        raise UserError(f"{path} is not a readable scores file ({exc}); delete it and run `hpctrain score` again") from None


def write_scores(path: Path, sample_ids: np.ndarray, labels: np.ndarray,
                 results: dict[str, tuple[np.ndarray, dict[str, Any]]], embedding: np.ndarray | None = None,
                 embedding_attrs: dict[str, Any] | None = None) -> None:
    """Add/replace methods' (scores, provenance attrs), keeping other methods' if they cover the same samples."""
    order = np.argsort(sample_ids, kind="stable")
    ids = sample_ids[order]
    old = read_scores(path) if path.exists() else None
    if old is not None and not np.array_equal(old.sample_ids, ids):
        print(f"note: {path} held scores of other samples ({', '.join(old.scores)}); they are replaced")
        old = None
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.create_dataset("sample_id", data=ids)
        f.create_dataset("label", data=labels[order])
        group = f.create_group("scores")
        for name, values in (old.scores.items() if old is not None else ()):
            if name not in results:
                group.create_dataset(name, data=values).attrs.update(old.attrs[name])
        for name, (values, attrs) in results.items():
            group.create_dataset(name, data=values[order]).attrs.update(attrs)
        if embedding is not None:
            f.create_dataset("embedding", data=embedding[order]).attrs.update(embedding_attrs or {})
        elif old is not None and old.embedding is not None:
            f.create_dataset("embedding", data=old.embedding).attrs.update(old.embedding_attrs)


# -- command line ----------------------------------------------------------------------------

def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} (comma-separated)")
    return list(dict.fromkeys(methods))


def _check_arguments(args: argparse.Namespace) -> None:
    if "forgetting" in args.method and args.checkpoint:
        raise UserError("--method forgetting records its own short training run; drop --checkpoint "
                        "(or score forgetting separately)")
    if args.extractor and "feature-density" not in args.method:
        raise UserError("--extractor is the embedding for --method feature-density; add that method or drop --extractor")
    if args.extractor_state and not args.extractor:
        raise UserError("--extractor-state needs --extractor module:factory")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs} must be at least 1")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds} must be at least 1")
    if args.seeds > 1 and args.checkpoint:
        raise UserError(f"--seeds {args.seeds} averages short pre-training runs; a --checkpoint is one model, "
                        f"drop one of them")
    if args.seeds > 1 and not needs_model(args):
        raise UserError(f"--seeds {args.seeds} averages short pre-training runs, but feature-density with "
                        f"--extractor trains none; drop --seeds")


def _default_out(data: str) -> Path:
    if not Path(data).is_dir():
        raise UserError(f"--data {data} is not a shard directory; pass --out SCORES.h5 for where to write scores")
    return Path(data) / "scores.h5"


def needs_model(args: argparse.Namespace) -> bool:
    """Every method but feature-density with its own extractor scores with a (trained) model."""
    return set(args.method) != {"feature-density"} or not args.extractor


def scoring_model(args: argparse.Namespace, state: dict[str, Any] | None, cfg, splits, device: torch.device,
                  seed: int, rank: int, size: int) -> tuple[Trained | None, Embed | None]:
    """The model that scores (the checkpoint's, or a short run from `seed`; none with only an
    extractor) and its embedding, which feeds grand, the default feature-density and the explorer."""
    if not needs_model(args):
        return None, None
    if state is not None:
        trained = from_checkpoint(state, args.checkpoint, cfg, splits, device)
    else:
        trained = short_run(cfg, splits, device, args.epochs, seed, rank, size)
    if {"grand", "feature-density"} & set(args.method) or hasattr(trained.model, "embed"):
        return trained, embed_fn(trained.model, f"model {cfg.model.name!r}")
    return trained, None


def run_scores(method: str, trained: Trained | None, scores: dict[str, np.ndarray], embedding: np.ndarray | None,
               labels: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """`method`'s scores of all samples from one model (one short run or the checkpoint)."""
    if method == "forgetting":
        return forgetting_counts(trained.history)
    if method == "feature-density":
        return knn_distance(embedding, args.k) if args.density == "knn" else centroid_distance(embedding, labels)
    return scores[method]


def run(args: argparse.Namespace) -> int:
    from hpctrain import __version__, checkpoint, comm
    from hpctrain.config import config_from_dict, load_config
    from hpctrain.data import load_splits
    from hpctrain.data.shards import manifest_hash

    _check_arguments(args)
    methods: list[str] = args.method
    out = Path(args.out) if args.out else _default_out(args.data)
    state = checkpoint.load(args.checkpoint) if args.checkpoint else None
    cfg = config_from_dict(state["config"], args.set) if state else load_config(args.config, args.set)
    cfg.data.name = str(args.data)
    comm.init()
    rank, size = comm.rank(), comm.size()
    device = comm.pick_device(cfg.train.device)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False   # rank-invariant on GPU too
    splits = load_splits(cfg.data, cfg.run.seed, task=None)
    if splits.task != "classification":
        raise UserError(f"hpctrain score: {cfg.data.name} holds regression targets; the score methods read class "
                        "logits and labels, so they score classification data only")
    train = splits.train
    extractor = None
    if args.extractor:
        extractor, extractor_name = load_extractor(args.extractor, args.extractor_state, device)
    blocks = rank_blocks(len(train), SCORE_BLOCK, rank, size)

    # Paul et al. (2021) average EL2N over 10 initialisations: one short run ranks samples noisily
    seeds = [cfg.run.seed + i for i in range(args.seeds)]
    per_run: list[dict[str, np.ndarray]] = []
    embedding = None
    for i, seed in enumerate(seeds):
        trained, model_embed = scoring_model(args, state, cfg, splits, device, seed, rank, size)
        model = trained.model if trained is not None else None
        part = score_blocks(methods, train, blocks, device, model, model_embed, extractor, rank == 0)
        parts = comm.get().allgather_object(part, name=f"hpctrain.score.parts.{i}")
        if rank == 0:
            run_embedding = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
            if i == 0:
                embedding = run_embedding          # one model's embedding (averaging models' makes no sense)
            logit = {m: np.concatenate([p[0][m] for p in parts]) for m in parts[0][0]}
            per_run.append({m: run_scores(m, trained, logit, run_embedding, train.labels, args) for m in methods})
    if rank != 0:
        return 0

    common = {"data": str(args.data), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "hpctrain_version": __version__,
              "manifest_sha256": manifest_hash(Path(args.data)) if Path(args.data).is_dir() else ""}
    if trained is not None:
        common.update(model=trained.name, step=trained.step)
        if state is None:
            common.update(short_run_epochs=args.epochs, seeds=np.array(seeds, dtype=np.int64))
    results = {}
    for method in methods:
        attrs = dict(common, method=method)
        if method == "feature-density":
            attrs.update(density=args.density, k=args.k if args.density == "knn" else 0)
            if extractor is not None:
                attrs.update(model=extractor_name, step=0)
        scores = np.mean([r[method] for r in per_run], axis=0)       # run order: the same on any world size
        results[method] = (scores, attrs)
        print(f"{method}: mean {scores.mean():.4g}, min {scores.min():.4g}, max {scores.max():.4g}"
              + (f" (mean of {len(seeds)} runs)" if len(seeds) > 1 else ""))
    source = extractor_name if extractor is not None else trained.name
    write_scores(out, train.sample_ids, train.labels, results, embedding, {"model": source})
    print(f"wrote {', '.join(methods)} scores of {len(train)} samples to {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="shard directory (or any data.name; then give --out)")
    parser.add_argument("--method", required=True, type=parse_methods,
                        help=f"one or more (comma-separated) of {', '.join(METHODS)}; one model serves them all")
    parser.add_argument("--checkpoint", help="score with this trained model (else: a short pre-training run)")
    parser.add_argument("--extractor", help="feature-density: frozen extractor, a TorchScript or torch.export "
                                            "(.pt2) file, or module:factory")
    parser.add_argument("--extractor-state", help="state dict file for a module:factory extractor")
    parser.add_argument("--config", help="run config (model, optimizer, batch, seed) for the short pre-training run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the short pre-training run (default 5)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="average the scores of this many short runs, seeded run.seed, run.seed+1, … (default 1)")
    parser.add_argument("--density", choices=("knn", "centroid"), default="knn", help="feature-density measure")
    parser.add_argument("--k", type=int, default=10, help="neighbours for --density knn (default 10)")
    parser.add_argument("--out", help="scores file (default DATA/scores.h5)")
    parser.set_defaults(func=run)
