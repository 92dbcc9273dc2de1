"""TOML run configuration → typed dataclasses, validated with one-line errors.

Every section is a dataclass; its fields (with type hints and defaults) are the schema.
`load_config` rejects unknown keys (suggesting the closest valid one), wrong types and values
outside a `Literal`'s choices, so a typo fails on every rank before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpctrain.compression import registry
from hpctrain.errors import UserError
from hpctrain.schema import build

COMPRESSOR_NAMES = registry.NAMES


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    # World sizes this run may be launched with; empty means any.
    world_sizes: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    # A built-in dataset ("mnist1d", "digits"), an HDF5 file with x/y, or a shard directory.
    name: str = "mnist1d"
    # mnist1d only: how many samples to generate (train + test).
    num_samples: int = 10000
    # Fraction held out for validation when the source has no split of its own.
    val_fraction: float = 0.2
    # Importance filtering (see hpctrain.data.filtering): keep this fraction of samples.
    keep_fraction: float = 1.0
    # Score method (a dataset in scores.h5) and which samples to keep: "hardest", "easiest",
    # "middle", or a score range "lo:hi" (then leave keep_fraction at 1).
    score: str = "el2n"
    keep: str = "hardest"
    # Scores file from `hpctrain score`; empty means <shard directory>/scores.h5.
    scores_file: str = ""
    # InfoBatch-style: each epoch drop `dynamic_prune` of the below-mean-score samples at random
    # and scale the loss of the remaining ones by 1 / (1 - dynamic_prune).
    dynamic: bool = False
    dynamic_prune: float = 0.5


@dataclass
class ModelConfig:
    # "cnn1d", "mlp", or "package.module:factory" (called with the args below).
    name: str = "cnn1d"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Stop after this many optimizer steps (0: run all epochs).
    max_steps: int = 0
    backward_passes_per_step: int = 1
    fusion: Literal["none", "backward", "forward"] = "none"
    # Stop (before saving a checkpoint of the diverged model) on a non-finite training or validation
    # loss, and on a training loss above explode_factor x max(its lowest value so far, explode_floor).
    abort_on_nan: bool = True
    explode_factor: float = 1e4
    explode_floor: float = 0.01
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    # The loss: "cross_entropy" (classification: integer labels, logged val_accuracy), "mse" or "l1"
    # (regression: float targets of any shape, logged val_psnr), or "package.module:function" called
    # as function(output, target) -> mean loss (output reshaped to the target's shape for regression).
    loss: str = "cross_entropy"
    # What the targets are: "auto" follows the loss (cross_entropy: classification; mse, l1:
    # regression; a custom loss: whatever the data holds, an integer 1-D y being class labels).
    task: Literal["auto", "classification", "regression"] = "auto"
    # Clip the global gradient norm (after the allreduce, before the update) to this; 0: off.
    # Needs train.fusion = "none" (every gradient must be in before any parameter is updated).
    max_grad_norm: float = 0.0
    # Regression: PSNR = 10 log10(psnr_peak^2 / MSE) over the validation split; 0 takes the targets'
    # range (max - min over every train and validation target, e.g. 1 for images in [0, 1]).
    psnr_peak: float = 0.0


@dataclass
class BatchConfig:
    # Global batch size (summed over ranks) at the start, and the most it may grow to.
    initial: int = 128
    max: int = 0
    # Most samples per forward pass on one rank (0: no cap); beyond it, gradient accumulation.
    max_local: int = 0
    policy: Literal["fixed", "schedule", "plateau", "gns"] = "fixed"
    growth_factor: int = 2
    # The LR is train.lr at batch.initial, rescaled by this at each growth, ramped over warmup_steps.
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_steps: int = 0
    # schedule policy: grow when these epochs begin, and after these optimizer steps.
    at_epochs: list[int] = field(default_factory=list)
    at_steps: list[int] = field(default_factory=list)
    # plateau policy: grow after `patience` checks without improving by the fraction min_delta;
    # val_loss is checked each epoch end, train_loss (mean over decide_every steps) every decide_every steps.
    plateau_metric: Literal["val_loss", "train_loss"] = "val_loss"
    patience: int = 2
    min_delta: float = 1e-3
    # gns policy: EMA factor of the noise-scale estimate and steps between decisions; grow while
    # gns_factor × B_noise > global batch (1: McCandlish's critical batch; larger: fewer steps, more samples).
    gns_ema: float = 0.99
    gns_factor: float = 1.0
    decide_every: int = 20


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    every_epochs: int = 1
    keep: int = 2
    # Seconds one checkpoint write is expected to take; job templates size the walltime warning
    # signal from it until a run has measured its own (RUN_DIR/timing.json).
    write_s: float = 30.0


@dataclass
class LogConfig:
    # Write per-layer compression stats every N steps (0: never).
    layers_every: int = 50


@dataclass
class CompressionConfig:
    # A compressor registered in hpctrain/compression/registry.py, or "none" (dense fp32).
    name: str = "none"
    # Tensors with fewer elements skip compression and ride one fused dense allreduce.
    min_numel: int = 1024
    # The first N optimizer steps send every gradient dense, then compression starts.
    warmup_steps: int = 0
    # Parameter-name glob → compressor name, first match wins (e.g. "*.bias" = "none").
    rules: dict[str, str] = field(default_factory=dict)
    # Hyper-parameters per compressor, written as tables `[compression.adacomp]`, ...: each
    # compressor's dataclass fields are their schema (hpctrain/compression/<name>.py).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Sparse (allgather) compressors on several nodes: reduce dense inside each node, allgather
    # among one leader per node, broadcast back (docs/cost-model.md, "Hierarchical exchange").
    hierarchical: bool = False
    # The inter-node link `name = "auto"` decides for: a rate ("1gbit", "25gbit", "200gbit") or
    # "auto" (a quick allreduce probe at the decision).
    link: str = "auto"
    # `name = "auto"`: the first decision is settled by measurement: the model's plan and up to
    # trial_plans − 1 alternatives run check_steps steps each; the fastest stays, or dense when it
    # is slower than the warm-up's dense steps by over 5% (when the two are within 1.5× of each
    # other, either way, dense runs check_steps again beside them and may win; when the two fastest
    # are within 1.2×, both run check_steps again). check_steps = 0 trusts the model;
    # trial_plans = 1 measures the model's plan against dense only; the default 5 measures every
    # candidate placed as its fixed method would be that the model puts within 1.5× of its plan (the
    # model ranks close plans poorly on a busy machine). Each plan costs check_steps + 1 steps: on a run of a
    # few hundred steps the default's 25 (30 with dense again) are a small price for the fastest plan.
    check_steps: int = 4
    trial_plans: int = 5


@dataclass
class DistConfig:
    # The communication engine: "horovod", "torch" (torch.distributed), or "auto": Horovod when it
    # is installed and the job was started by mpirun, horovodrun or jsrun, torch otherwise
    # (torchrun, srun, one process). The environment variable HPCTRAIN_BACKEND overrides it.
    backend: Literal["auto", "horovod", "torch"] = "auto"
    # torch engine: "nccl" (RCCL on ROCm) where every local rank has its own GPU, else "gloo".
    torch_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # torch engine: a collective not done after this long fails the job (a rank that dies is
    # noticed sooner: its peers' connections break). Long enough for rank 0's checkpoint writes.
    timeout_s: float = 600.0
    # torch engine: gradient allreduces are fused into buckets of up to this many MB, filled in
    # backward's order (DDP's bucket_cap_mb): one collective per bucket, not one per tensor.
    # Horovod fuses on its own (horovod.fusion_threshold_mb, cycle_time_ms).
    bucket_mb: float = 25.0


@dataclass
class HorovodConfig:
    # Job templates export these as HOROVOD_FUSION_THRESHOLD (bytes) and HOROVOD_CYCLE_TIME.
    fusion_threshold_mb: int = 64
    cycle_time_ms: float = 1.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    positive = {
        "train.epochs": cfg.train.epochs, "batch.initial": cfg.batch.initial,
        "train.backward_passes_per_step": cfg.train.backward_passes_per_step,
        "batch.growth_factor": cfg.batch.growth_factor, "data.num_samples": cfg.data.num_samples,
        "dist.timeout_s": cfg.dist.timeout_s, "dist.bucket_mb": cfg.dist.bucket_mb,
    }
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"config: {key} = {value} must be positive")
    for key, value in {"compression.min_numel": cfg.compression.min_numel,
                       "compression.warmup_steps": cfg.compression.warmup_steps,
                       "compression.check_steps": cfg.compression.check_steps}.items():
        if value < 0:
            raise UserError(f"config: {key} = {value} must be 0 or positive")
    if cfg.compression.trial_plans < 1:
        raise UserError(f"config: compression.trial_plans = {cfg.compression.trial_plans} must be 1 or more")
    if cfg.train.explode_factor < 0 or (cfg.train.explode_factor and cfg.train.explode_factor <= 1):
        raise UserError(f"config: train.explode_factor = {cfg.train.explode_factor} must be above 1 (or 0: off)")
    if not cfg.train.explode_floor > 0:
        raise UserError(f"config: train.explode_floor = {cfg.train.explode_floor} must be positive")
    if not cfg.train.lr > 0:
        raise UserError(f"config: train.lr = {cfg.train.lr} must be positive")
    for key, value in {"data.keep_fraction": cfg.data.keep_fraction}.items():
        if not 0 < value <= 1:
            raise UserError(f"config: {key} = {value} must be in (0, 1]")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"config: data.val_fraction = {cfg.data.val_fraction} must be in (0, 1)")
    _validate_compression(cfg.compression)
    if cfg.batch.max and cfg.batch.max < cfg.batch.initial:
        raise UserError(f"config: batch.max = {cfg.batch.max} is below batch.initial = {cfg.batch.initial}")
    _validate_batch(cfg.batch)
    if cfg.batch.policy == "gns" and cfg.train.fusion == "forward":
        raise UserError("config: batch.policy = 'gns' reads the averaged gradient at step(), which "
                        "train.fusion = 'forward' defers; use fusion 'none' or 'backward'")
    _validate_train(cfg.train)
    if not cfg.run.name or "/" in cfg.run.name:
        raise UserError(f"config: run.name = {cfg.run.name!r} must be a non-empty name without '/'")


BUILTIN_LOSSES = ("cross_entropy", "mse", "l1")


def _validate_train(train: TrainConfig) -> None:
    """[train] loss, task, max_grad_norm and psnr_peak."""
    module, sep, function = train.loss.partition(":")
    if train.loss not in BUILTIN_LOSSES and not (sep and module.strip() and function.strip()):
        raise UserError(f"config: train.loss = {train.loss!r}: choose one of {', '.join(BUILTIN_LOSSES)} "
                        "or give package.module:function")
    if train.loss == "cross_entropy" and train.task == "regression" or \
            train.loss in ("mse", "l1") and train.task == "classification":
        raise UserError(f"config: train.loss = {train.loss!r} does not fit train.task = {train.task!r}; "
                        "leave train.task at 'auto'")
    if not 0 <= train.max_grad_norm < float("inf"):
        raise UserError(f"config: train.max_grad_norm = {train.max_grad_norm} must be 0 (off) or positive")
    if train.max_grad_norm and train.fusion != "none":
        raise UserError(f"config: train.max_grad_norm clips the global gradient norm, which needs every gradient "
                        f"before any parameter is updated; train.fusion = {train.fusion!r} updates early: "
                        "set train.fusion = 'none' or train.max_grad_norm = 0")
    if not 0 <= train.psnr_peak < float("inf"):
        raise UserError(f"config: train.psnr_peak = {train.psnr_peak} must be 0 (the targets' range) or positive")


def task_for(train: TrainConfig) -> str | None:
    """The task the loss needs: "classification", "regression", or None (a custom loss: the data decides)."""
    if train.task != "auto":
        return train.task
    return {"cross_entropy": "classification", "mse": "regression", "l1": "regression"}.get(train.loss)


def _validate_compression(compression: CompressionConfig) -> None:
    """Names against the registry; each hyper-parameter table by building its compressor
    (which imports torch only for configs that compress)."""
    if compression.name not in COMPRESSOR_NAMES:
        raise UserError(f"config: compression.name = {compression.name!r} is not allowed; "
                        f"choose one of {', '.join(map(repr, COMPRESSOR_NAMES))}")
    per_layer = [n for n in COMPRESSOR_NAMES if n != "auto"]      # auto decides for all layers at once
    for pattern, name in compression.rules.items():
        if name not in per_layer:
            raise UserError(f"config: compression.rules.{pattern!r} = {name!r}; choose one of {', '.join(per_layer)}"
                            + (' (use compression.name = "auto" to let the cost model choose per layer)'
                               if name == "auto" else ""))
    for name, options in compression.options.items():
        registry.build(name, options)


def _validate_batch(batch: BatchConfig) -> None:
    """[batch] checks: an adaptive policy needs room to grow and a trigger."""
    for key in ("decide_every", "patience"):
        if getattr(batch, key) <= 0:
            raise UserError(f"config: batch.{key} = {getattr(batch, key)} must be positive")
    for key in ("max_local", "warmup_steps"):
        if getattr(batch, key) < 0:
            raise UserError(f"config: batch.{key} = {getattr(batch, key)} must be 0 or positive")
    if not 0 <= batch.min_delta < 1:
        raise UserError(f"config: batch.min_delta = {batch.min_delta} must be in [0, 1) (a relative improvement)")
    if not 0 <= batch.gns_ema < 1:
        raise UserError(f"config: batch.gns_ema = {batch.gns_ema} must be in [0, 1)")
    if not 0 < batch.gns_factor < float("inf"):
        raise UserError(f"config: batch.gns_factor = {batch.gns_factor} must be a positive number "
                        "(the gns policy grows while gns_factor × noise scale > batch)")
    if any(v <= 0 for v in batch.at_epochs + batch.at_steps):
        raise UserError("config: batch.at_epochs and batch.at_steps must hold positive numbers "
                        "(epoch e: grow when epoch e begins, after e epochs; step s: after step s)")
    if batch.policy == "fixed":
        return
    if batch.max <= batch.initial:
        raise UserError(f"config: batch.policy = {batch.policy!r} grows the batch up to batch.max, "
                        f"but batch.max = {batch.max}; set batch.max above batch.initial = {batch.initial}")
    if batch.growth_factor < 2:
        raise UserError(f"config: batch.growth_factor = {batch.growth_factor} must be at least 2 "
                        f"for batch.policy = {batch.policy!r}")
    if batch.policy == "schedule" and not (batch.at_epochs or batch.at_steps):
        raise UserError("config: batch.policy = 'schedule' needs batch.at_epochs or batch.at_steps "
                        "(e.g. at_epochs = [3, 6])")


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value); the value is read as TOML, else a string."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path.strip().split("."), value


def config_from_dict(table: dict[str, Any], overrides: list[str] = ()) -> Config:
    table = json.loads(json.dumps(table))  # deep copy; overrides must not touch the caller's dict
    for assignment in overrides:
        keys, value = parse_override(assignment)
        node = table
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {assignment!r}: {key!r} is not a table")
        node[keys[-1]] = value
    compression = table.get("compression")
    if isinstance(compression, dict):
        options = compression.setdefault("options", {})
        for name in [key for key, value in compression.items() if key in registry.COMPRESSORS and isinstance(value, dict)]:
            options[name] = compression.pop(name)
    cfg = build(Config, table)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or only defaults when `path` is None) and apply `--set` overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass an existing TOML file (see configs/)")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    return config_from_dict(table, overrides)


def check_world_size(cfg: Config, world_size: int) -> None:
    """Reject a launch the config forbids, before any work starts."""
    if cfg.run.world_sizes and world_size not in cfg.run.world_sizes:
        allowed = ", ".join(map(str, cfg.run.world_sizes))
        raise UserError(f"world size {world_size} is not allowed by run.world_sizes = [{allowed}]; "
                        f"launch with -np one of {allowed} or change run.world_sizes")
    if cfg.batch.initial % world_size:
        raise UserError(f"batch.initial = {cfg.batch.initial} is not divisible by world size {world_size}; "
                        f"use a multiple of {world_size}")
