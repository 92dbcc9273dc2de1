"""`hpctrain train`: the loop that joins data, model, DistributedOptimizer, log and checkpoints.

The path of a sample: dataset (built-in, HDF5 file or shards) → kept rows of the train split
(importance filtering) → GlobalBatchSampler (this rank's slice of the global batch) → micro-batches on the
device (gradient accumulation above `batch.max_local`) → loss → backward (the optimizer's hooks
exchange gradients) → step → one row in the step log.

Tasks (`train.loss`): cross_entropy trains a classifier on integer labels and evaluates
validation loss and accuracy; mse and l1 regress float targets of any shape (the model's output
is reshaped to the target's shape) and evaluate validation loss and PSNR = 10·log10(peak² / MSE),
MSE per target element over the whole validation split, peak = `train.psnr_peak` or the targets'
range (max − min over train and validation targets). A custom `package.module:function` is
called as function(output, target) → mean loss; its task is `train.task` (auto: what the data holds).

Reliability (docs/reliability.md): rank 0 locks the run directory and refuses a fresh run into
one that holds a run (`--overwrite` moves it aside); a resume compares the checkpoint's config
with the new one and falls back past a damaged newest checkpoint; SIGTERM/SIGUSR1/SIGINT ride
the per-step loss allreduce, so all ranks stop after the same step, checkpoint together and exit
with `preempt.REQUEUE_EXIT_CODE`; a non-finite or exploding loss stops before any checkpoint of
the diverged model is written.

Checkpoints: each stateful part of a run is a torch `Stateful` (state_dict / load_state_dict),
registered once by its key in the checkpoint (`Trainer._register_parts`); saving and resuming
are loops over them.
"""
from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hpctrain import __version__, checkpoint, comm, preempt, rundir
from hpctrain.atomic import write_atomic
from hpctrain.batch import BatchDecision, BatchOrchestrator, BatchStats, GradNormObserver
from hpctrain.checkpoint import Part
from hpctrain.data.shards import MANIFEST, manifest_hash
from hpctrain.comm.horovod import apply_environment as horovod_environment
from hpctrain.compression import describe, policy_from_config
from hpctrain.compression.auto import auto_from_config
from hpctrain.config import Config, TrainConfig, task_for
from hpctrain.data import Dataset, filtering, load_splits
from hpctrain.data.sampler import GlobalBatchSampler
from hpctrain.errors import AgreedError, UserError
from hpctrain.h5log import StepLog
from hpctrain.models import build_model
from hpctrain.optimizer import DistributedOptimizer
from hpctrain.optimizer.distributed import CompressionState

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LOSSES = {"cross_entropy": nn.functional.cross_entropy, "mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss}


def resolve_loss(name: str):
    """`train.loss`: a built-in loss function, or `package.module:function` imported (on every rank)."""
    if name in LOSSES:
        return LOSSES[name]
    import importlib
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"train.loss = {name!r} cannot be loaded ({exc}); check the module is importable on every "
                        f"rank (e.g. on PYTHONPATH) and defines {attr!r}") from None
    if not callable(fn):
        raise UserError(f"train.loss = {name!r} is not callable; give a function(output, target) -> loss")
    return fn


def psnr(mse: float, peak: float) -> float:
    """Peak signal-to-noise ratio in dB; inf for a perfect fit, NaN without a peak."""
    if not peak > 0:
        return float("nan")
    return 10 * math.log10(peak * peak / mse) if mse > 0 else float("inf")


def init_comm(cfg: Config) -> comm.Communicator:
    """Start the engine the run config asks for; rank 0 says which one it got."""
    horovod_environment(cfg.horovod.fusion_threshold_mb, cfg.horovod.cycle_time_ms)
    communicator = comm.init(cfg.dist.backend, cfg.dist.torch_backend, cfg.dist.timeout_s, cfg.train.device,
                             cfg.dist.bucket_mb)
    if communicator.rank == 0:
        note = getattr(communicator, "note", None)
        print(f"hpctrain: engine {communicator.describe()}, {communicator.size} rank(s)"
              + (f" ({note})" if note else ""), flush=True)
    return communicator


def lr_at(cfg: Config, base_lr: float, progress: float) -> float:
    """The scheduled LR at `progress` ∈ [0, 1] of training (by samples seen, so batch growth keeps it)."""
    if cfg.train.lr_schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return base_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class GlobalRNG:
    """The process-wide generators (Python, NumPy, torch, CUDA): rank 0's are saved, every rank
    loads them (as a fresh run seeds every rank alike)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where training stands."""
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    global_batch: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(vars(Progress(**state)))     # in place: the checkpoint part is this object


class DivergenceGuard:
    """Stops every rank on a diverged training loss, before a checkpoint of the diverged model is
    written; the running minimum it compares with is checkpointed, so a resumed run keeps it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.min_loss = math.inf

    def check(self, loss: float, step: int, epoch: int) -> None:
        """The mean loss (the same on every rank) is non-finite or `train.explode_factor` times its running
        minimum: every rank stops here."""
        t = self.cfg
        if not t.abort_on_nan:
            return
        if not math.isfinite(loss):
            raise AgreedError(f"non-finite loss ({loss}) at step {step}, epoch {epoch}; no checkpoint of the "
                              "diverged model was written: lower train.lr, check the data, or set "
                              "train.abort_on_nan = false")
        if t.explode_factor and step > 1 and loss > t.explode_factor * max(self.min_loss, t.explode_floor):
            raise AgreedError(f"training loss exploded at step {step}, epoch {epoch}: {loss:.4g} is more than "
                              f"train.explode_factor = {t.explode_factor:g} times its lowest value so far "
                              f"({self.min_loss:.4g}, floor {t.explode_floor:g}); no checkpoint of the diverged model was "
                              "written: lower train.lr, or raise train.explode_factor (0 turns the check off)")
        self.min_loss = min(self.min_loss, loss)

    def state_dict(self) -> dict[str, Any]:
        return {"min_loss": self.min_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_loss = float(state["min_loss"])


def data_fingerprint(name: str) -> str:
    """What names the exact training data: a shard directory's manifest hash, a file's SHA-256
    (size and mtime beyond 1 GiB), '' for built-in datasets (their recipe is the config)."""
    path = Path(name)
    if path.is_dir():
        return f"manifest sha256 {manifest_hash(path)}" if (path / MANIFEST).is_file() else ""
    if path.is_file():
        size = path.stat().st_size
        if size > 1 << 30:
            return f"size {size} mtime {int(path.stat().st_mtime)}"
        with open(path, "rb") as f:
            return f"sha256 {hashlib.file_digest(f, 'sha256').hexdigest()}"
    return ""


class Preempted(Exception):
    """Every rank stopped after the same step on a signal and the checkpoint is written."""


class Trainer:
    def __init__(self, cfg: Config, stop: preempt.StopSignals | None = None, resume: str | None = None,
                 overwrite: bool = False, prepare: bool = False):
        """`resume`/`overwrite` as `hpctrain train` takes them; the run directory is locked and checked
        first (before any data is loaded), unless `prepare` is False (then `fit` does it)."""
        self.cfg = cfg
        self.stop = stop or preempt.StopSignals()
        self.lock: rundir.RunLock | None = None
        self.config_changes: list[tuple[str, Any, Any]] = []
        self._fingerprint: str | None = None
        self.rank, self.world = comm.rank(), comm.size()
        self.root = self.rank == 0
        self._prepared: tuple[bool, tuple[Path, dict[str, Any]] | None] | None = None   # resumed?, the checkpoint
        if prepare:
            self._prepare(resume, overwrite)
        self.device = comm.pick_device(cfg.train.device)
        # cuDNN's autotuned kernels differ run to run: resume promises the uninterrupted run's bits.
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        seed_everything(cfg.run.seed)
        self.splits = load_splits(cfg.data, cfg.run.seed, task=task_for(cfg.train))
        self.task = self.splits.task
        self.regression = self.task == "regression"
        self.psnr_peak = cfg.train.psnr_peak or (
            self.splits.target_range[1] - self.splits.target_range[0] if self.splits.target_range else 0.0)
        self.model = build_model(cfg.model.name, self.splits.input_shape, self.splits.num_outputs,
                                 cfg.model.args).to(self.device)
        base = self._base_optimizer()
        self.optimizer = DistributedOptimizer(
            base, named_parameters=self.model.named_parameters(),
            compression=policy_from_config(cfg.compression),
            backward_passes_per_step=cfg.train.backward_passes_per_step, fusion=cfg.train.fusion,
            max_grad_norm=cfg.train.max_grad_norm or None)
        self.auto = auto_from_config(cfg.compression, comm.local_size())    # compression.name = "auto"
        if self.auto is not None:
            self.auto.attach(self.optimizer)
        self.train_rows = filtering.training_rows(self.splits.train, cfg.data)
        self.pruning = filtering.dynamic_pruning(self.splits.train, self.train_rows, cfg.data, cfg.run.seed)
        self.loss_weights: np.ndarray | None = None     # per row of the train split, set each epoch by dynamic pruning
        self.sampler = GlobalBatchSampler(self.train_rows, cfg.run.seed, self.rank, self.world)
        self.progress = Progress(global_batch=cfg.batch.initial)
        self.batch = BatchOrchestrator(cfg.batch, cfg.train.lr, self.world, cfg.train.backward_passes_per_step)
        self.grad_norms = GradNormObserver.attach(self.optimizer) if self.batch.needs_grad_norms else GradNormObserver()
        self.loss_fn = resolve_loss(cfg.train.loss)
        self.guard = DivergenceGuard(cfg.train)
        self.log: StepLog | None = None
        self.log_rows: dict[str, int] | None = None    # log length at the checkpoint resumed from
        self.parts = self._register_parts()

    def _register_parts(self) -> dict[str, Part]:
        """The run's stateful parts by their key in a checkpoint, in the order they load: the auto
        choice sets the compressors whose residuals and memories "compression" then restores."""
        auto = {"auto": Part(self.auto, optional=True)} if self.auto is not None else {}
        return {"model": Part(self.model), "optimizer": Part(self.optimizer), **auto,
                "compression": Part(CompressionState(self.optimizer), per_rank=True),
                "sampler": Part(self.sampler), "batch": Part(self.batch), "progress": Part(self.progress),
                "rng": Part(GlobalRNG()), "divergence": Part(self.guard, optional=True)}

    def _base_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = self.model.parameters()
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        return OPTIMIZERS[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay)

    # -- the run directory (rank 0) -------------------------------------------------------
    def data_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.cfg.data.name)
        return self._fingerprint

    def _agree(self, message: str | None) -> None:
        """Rank 0's verdict to every rank: an error stops all of them together, said once (by rank 0)."""
        if self.root and message:
            print(f"hpctrain: error: {message}", file=sys.stderr, flush=True)
        if self.world > 1:
            message = comm.get().broadcast_object(message, name="hpctrain.rundir.verdict")
        if message:
            raise AgreedError(message, printed=True)

    def _prepare_run_dir(self, resume: str | None, overwrite: bool) -> tuple[Path, dict[str, Any]] | None:
        """Lock the run directory, refuse or move aside an old run, load and check the checkpoint
        (its path and state: None for a fresh start)."""
        run_dir = self.cfg.run_dir
        self.lock = rundir.RunLock(run_dir)
        self.lock.acquire()
        if self.lock.note:
            print(f"hpctrain: {self.lock.note}", flush=True)
        for tmp in checkpoint.remove_temp_files(run_dir):
            print(f"hpctrain: removed {tmp.name}, left by an interrupted checkpoint write", flush=True)
        if resume is None:
            if rundir.holds_run(run_dir):
                if not overwrite:
                    raise UserError(rundir.fresh_run_refusal(run_dir))
                self.lock.release()
                old = rundir.move_aside(run_dir)
                (old / rundir.LOCK_NAME).unlink(missing_ok=True)
                self.lock = rundir.RunLock(run_dir)
                self.lock.acquire()
                print(f"hpctrain: --overwrite: moved the old run in {run_dir} aside to {old}", flush=True)
            return None
        if resume in ("latest", "auto"):
            found = checkpoint.load_latest(run_dir, say=lambda line: print(line, flush=True))
            if found is None:
                if resume == "latest":
                    raise UserError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(run_dir)}; start "
                                    "without --resume or use --resume=auto")
                log = run_dir / "log.h5"
                if log.exists():       # a run killed before its first checkpoint: keep its log, aside
                    kept = rundir.move_log_aside(log)
                    print(f"hpctrain: --resume=auto: no checkpoint yet; starting fresh, the old log is kept "
                          f"as {kept.name}", flush=True)
                return None
            path, state = found
        else:
            path = Path(resume)
            state = checkpoint.load(path)
        self._check_resume(path, state)
        print(f"hpctrain: resuming from {path} (step {state['progress']['step']})", flush=True)
        return path, state

    def _check_resume(self, path: Path, state: dict[str, Any]) -> None:
        """The checkpoint must belong to this run: must-match keys equal, the same data, the ranks its
        compression memories were written by."""
        mismatched, self.config_changes = checkpoint.config_differences(state.get("config", {}), self.cfg.to_dict())
        old_data = state.get("data_fingerprint")
        if old_data is not None and old_data != self.data_fingerprint():
            mismatched.append(f"data contents ({self.cfg.data.name}): {old_data or 'built-in'} -> "
                              f"{self.data_fingerprint() or 'built-in'}")
        first = checkpoint.load_rank_parts(path, state, 0, ["compression"])["compression"]
        reason = CompressionState.resumable_at(checkpoint.saved_ranks(state, "compression"), first, self.world)
        if reason:
            mismatched.append(f"world size: {state['world_size']} -> {self.world} ({reason})")
        if mismatched:
            raise UserError(f"cannot resume from {path}: the run differs from the checkpoint's in "
                            f"{'; '.join(mismatched)}; resume with the checkpoint's settings, or start a new "
                            "run (another run.name, or --overwrite)")

    # -- state -----------------------------------------------------------------------------
    def _resume(self, path: Path, state: dict[str, Any]) -> None:
        """Every rank: the shared parts from `state` (read by rank 0, broadcast), its own from its file."""
        per_rank = [name for name, part in self.parts.items() if part.per_rank]
        mine = checkpoint.load_rank_parts(path, state, self.rank, per_rank)
        for name, part in self.parts.items():
            saved = mine if part.per_rank else state
            if name in saved or not part.optional:
                part.state.load_state_dict(saved[name])
        self.log_rows = state["log_rows"]

    def _save(self) -> None:
        """Every rank writes its per-rank parts (first: that flushes pending updates), then rank 0
        writes the checkpoint that makes them count."""
        start = time.perf_counter()
        step = self.progress.step
        mine = {name: part.state.state_dict() for name, part in self.parts.items() if part.per_rank}
        written = checkpoint.save_rank_parts(mine, self.cfg.run_dir, step, self.rank)
        rank_bytes = comm.get().allgather_object(written, name=f"ckpt.{step}")    # every rank's file is complete
        if not self.root:
            return
        checkpoint.save({
            "hpctrain_version": __version__, "config": self.cfg.to_dict(), "world_size": self.world,
            "data_fingerprint": self.data_fingerprint(),
            "log_rows": self.log.row_counts() if self.log is not None else {},
            **{name: part.state.state_dict() for name, part in self.parts.items() if not part.per_rank},
        }, self.cfg.run_dir, step, self.cfg.checkpoint.keep, rank_bytes)
        self._write_timing(time.perf_counter() - start)

    def _write_timing(self, checkpoint_s: float) -> None:
        """What one checkpoint and one step take, for job templates sizing the walltime signal."""
        p = self.progress
        step_s = p.elapsed_s / max(p.step, 1)
        path = self.cfg.run_dir / "timing.json"
        try:
            write_atomic(path, f'{{"checkpoint_s": {checkpoint_s:.3f}, "step_s": {step_s:.4f}}}\n')
        except UserError:       # a full disk here is not worth stopping for; the checkpoint is written
            pass

    def _open_log(self, resumed: bool) -> None:
        if not self.root:
            return
        attrs = {"config": self.cfg.to_json(), "world_size": self.world, "hpctrain_version": __version__,
                 "engine": comm.get().engine}
        self.log = StepLog(self.cfg.run_dir / "log.h5", attrs, resume=resumed,
                           resume_rows=self.log_rows)
        if self.log.set_aside_to is not None:
            print(f"hpctrain: {self.log.damage.split('; ')[0]}; set aside as {self.log.set_aside_to.name}, a new "
                  f"log continues from step {self.progress.step}", flush=True)
        lr = self.optimizer.param_groups[0]["lr"]
        for key, old, new in self.config_changes:
            reason = f"resume: {key} {old!r} -> {new!r}"
            print(f"hpctrain: {reason} (applied)", flush=True)
            self.log.append("events", {"step": self.progress.step, "old_batch": self.progress.global_batch,
                                       "new_batch": self.progress.global_batch, "old_lr": lr, "new_lr": lr,
                                       "reason": reason, "statistic": float("nan")})

    # -- the loop --------------------------------------------------------------------------
    def _prepare(self, resume: str | None, overwrite: bool) -> None:
        """Rank 0 locks and checks the run directory; every rank learns the verdict (and the state)."""
        found, error = None, None
        if self.root:
            try:
                found = self._prepare_run_dir(resume, overwrite)
            except UserError as exc:
                error = str(exc)
        try:
            self._agree(error)
        except AgreedError:
            if self.lock is not None:
                self.lock.release()
            raise
        resumed = comm.get().broadcast_object(found is not None, name="hpctrain.resumed") if self.world > 1 \
            else found is not None
        self._prepared = (resumed, found)

    def fit(self, resume: str | None = None, overwrite: bool = False) -> int:
        """Train; returns the exit code (0, or `preempt.REQUEUE_EXIT_CODE` after a stop signal)."""
        try:
            if self._prepared is None:
                self._prepare(resume, overwrite)
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> int:
        resumed, found = self._prepared
        if resumed:
            self._resume(*(comm.get().broadcast_object(found, name="resume") if self.world > 1 else found))
        else:
            comm.broadcast_parameters(self.model.state_dict())
        self._open_log(resumed=resumed)
        if self.root:
            print(f"hpctrain {__version__}: {self.world} rank(s) on {self.device}, "
                  f"{len(self.splits.train)} train / {len(self.splits.val)} val samples, run dir {self.cfg.run_dir}")
            if len(self.train_rows) < len(self.splits.train):
                d = self.cfg.data
                print(f"importance filtering: training on {len(self.train_rows)} of {len(self.splits.train)} "
                      f"samples ({d.keep} {d.keep_fraction:g} by {d.score})")
            lines = describe(self.optimizer.policy, self.model.named_parameters())
            print("compression policy:\n  " + "\n  ".join(lines), flush=True)
        every_epochs = self.cfg.checkpoint.every_epochs
        try:
            for epoch in range(self.progress.epoch, self.cfg.train.epochs):
                self.progress.epoch = epoch
                if self.pruning is not None:
                    rows, self.loss_weights = self.pruning.epoch(epoch, self.cfg.train.epochs)
                    self.sampler.set_rows(rows)
                self.sampler.set_epoch(epoch)
                if not self._train_epoch():       # max_steps reached inside the epoch
                    self._evaluate()
                    self._save()
                    break
                self.progress.epoch = epoch + 1
                self.sampler.set_epoch(epoch + 1)
                val_loss = self._evaluate()
                self._apply_batch(self.batch.after_epoch(self.progress.step, epoch + 1, val_loss))
                if (every_epochs and (epoch + 1) % every_epochs == 0) or self._done():
                    self._save()
                if self._done():
                    break
        except Preempted:
            if self.root:
                print(f"hpctrain: {self.stop.name()} received: every rank stopped after step {self.progress.step} "
                      f"and the checkpoint is written; exit code {preempt.REQUEUE_EXIT_CODE} (requeue; "
                      f"`hpctrain train --resume=auto` continues)", file=sys.stderr, flush=True)
            return preempt.REQUEUE_EXIT_CODE
        finally:
            if self.log is not None:
                self.log.close()
        return 0

    def _done(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.progress.step >= self.cfg.train.max_steps

    def _train_epoch(self) -> bool:
        """Run the epoch's remaining steps; False if max_steps stopped it early."""
        p, cfg = self.progress, self.cfg
        show = self.root and cfg.train.progress     # when shown, TQDM_DISABLE=1 still turns it off
        bar = tqdm(total=self.sampler.steps_left(p.global_batch), desc=f"epoch {p.epoch}", leave=False,
                   dynamic_ncols=True, **({} if show else {"disable": True}))
        with bar:
            while not self._done() and not self.sampler.exhausted():
                local = self.sampler.next_batch(p.global_batch)
                start = time.perf_counter()
                loss, stop = self._step(local)
                stats = self.optimizer.new_step_stats()
                p.step += 1
                p.samples_seen += len(local) * self.world
                step_time = time.perf_counter() - start
                p.elapsed_s += step_time
                self._log_step(loss, stats, step_time)
                self.guard.check(loss, p.step, p.epoch)
                if stop:                          # a stop signal reached some rank: all stop here
                    self._save()
                    if self.world > 1:            # nobody exits (and has the launcher kill the rest)
                        comm.get().barrier()      # before rank 0's checkpoint is on disk
                    raise Preempted()
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()
                decision = self.batch.after_step(p.step, p.epoch, BatchStats(
                    loss, len(local), len(local) * self.world, *self.grad_norms.take()))
                if decision is not None:
                    self._apply_batch(decision)
                    bar.total = bar.n + self.sampler.steps_left(p.global_batch)
                if self.auto is not None:         # after the batch decision: a new batch, a new choice
                    row = self.auto.step_done(p.step, p.global_batch, step_time, stats.comm_time_s)
                    if row is not None and self.root:
                        self.log.append("events", row)
                if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0:
                    self._save()
        return self.sampler.exhausted()

    def _step(self, local: np.ndarray) -> tuple[float, bool]:
        """One optimizer step on this rank's rows; returns the loss averaged over ranks, and whether
        any rank was asked to stop (the request rides the loss allreduce: no extra message)."""
        self.model.train()
        lr = lr_at(self.cfg, self.batch.lr_at(self.progress.step + 1),
                   self.progress.samples_seen / (self.cfg.train.epochs * len(self.train_rows)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self._micro_batches(local)
        loss_sum = 0.0
        for micro in micro_batches:
            x, y = self._to_device(self.splits.train, micro)
            loss = self._loss(self.model(x), y, micro)
            value = float(loss.detach())
            if self.cfg.train.abort_on_nan and not math.isfinite(value):
                raise UserError(f"non-finite loss ({value}) at step {self.progress.step}, epoch {self.progress.epoch}; "
                                "lower train.lr, check the data, or set train.abort_on_nan = false")
            (loss * (len(micro) / len(local))).backward()
            loss_sum += value * len(micro)
        self.optimizer.step()
        self.optimizer.zero_grad()
        mean_loss, stop = comm.get().allreduce_scalars([loss_sum / len(local), float(self.stop.requested)],
                                                       name="loss")
        return mean_loss, stop > 0

    def _shaped(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Regression: the model's output [B, n] as the targets' shape [B, *target_shape]."""
        if not self.regression or output.shape == y.shape:
            return output
        if output.numel() != y.numel():
            raise UserError(f"model {self.cfg.model.name!r} outputs {tuple(output.shape[1:])} per sample but the targets "
                            f"have shape {tuple(y.shape[1:])}; the model must output one value per target element")
        return output.reshape(y.shape)

    def _loss(self, output: torch.Tensor, y: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The mean of `train.loss`; under dynamic pruning each sample's term carries its InfoBatch weight."""
        output = self._shaped(output, y)
        if self.loss_weights is None:
            return self.loss_fn(output, y)
        weights = torch.from_numpy(self.loss_weights[rows]).to(output.device)
        try:
            per_sample = self.loss_fn(output, y, reduction="none")
        except TypeError:
            raise UserError(f"train.loss = {self.cfg.train.loss!r} takes no reduction='none', which data.dynamic "
                            "needs (per-sample weights); add the argument or turn data.dynamic off") from None
        if per_sample.dim() > 1:
            per_sample = per_sample.flatten(1).mean(1)
        return (per_sample * weights).mean()

    def _micro_batches(self, local: np.ndarray) -> list[np.ndarray]:
        """Split this rank's batch for gradient accumulation (memory cap `batch.max_local`)."""
        passes = min(self.batch.accumulation, len(local))
        if passes != self.optimizer.backward_passes_per_step:
            self.optimizer.set_backward_passes_per_step(passes)
        return np.array_split(local, passes)

    def _apply_batch(self, decision: BatchDecision | None) -> None:
        """Take rank 0's batch-size decision (the same on every rank) from the next step on."""
        if decision is None:
            return
        self.progress.global_batch = decision.global_batch
        if self.root:
            self.log.append("events", decision.event_row())
            tqdm.write(f"step {decision.step}: global batch {decision.old_batch} -> {decision.global_batch} "
                       f"({decision.local_batch} x {decision.accumulation} per rank), lr {decision.old_lr:.4g} -> "
                       f"{decision.lr:.4g}: {decision.reason}")

    def _to_device(self, dataset: Dataset, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = dataset.get(rows)
        return (torch.from_numpy(x).to(self.device, non_blocking=True),
                torch.from_numpy(y).to(self.device, non_blocking=True))

    def _log_step(self, loss: float, stats, step_time: float) -> None:
        if self.log is None:
            return
        p = self.progress
        self.log.append("steps", {
            "step": p.step, "epoch": p.epoch, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
            "global_batch": p.global_batch, "samples_seen": p.samples_seen, "step_time_s": step_time,
            "comm_time_s": stats.comm_time_s, "wire_bytes": stats.wire_bytes, "dense_bytes": stats.dense_bytes,
            "codec_time_s": stats.codec_time_s})
        every = self.cfg.log.layers_every
        if every and (p.step % every == 0 or p.step == 1):
            self.log.append_many("layers", [
                {"step": p.step, "name": name, "compressor": self.optimizer.compressor_names[name],
                 "wire_bytes": wire, "dense_bytes": dense, "ratio": dense / max(wire, 1)}
                for name, (wire, dense) in stats.per_param.items()])

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Validation loss (returned) and the task's metric (accuracy, or PSNR) over the whole held-out
        split, each rank a slice of it. The loss is `train.loss`'s mean over the split's samples."""
        self.optimizer.flush()
        self.model.eval()
        val = self.splits.val
        mine = np.arange(self.rank, len(val), self.world)
        loss_sum = metric = squares = 0.0
        elements = 0
        for chunk in np.array_split(mine, max(1, -(-len(mine) // 1024))):
            if len(chunk) == 0:
                continue
            x, y = self._to_device(val, chunk)
            output = self._shaped(self.model(x), y)
            if self.regression:
                loss_sum += float(self.loss_fn(output, y)) * len(chunk)
                squares += float(((output - y) ** 2).sum())
                elements += y.numel()
            else:
                if self.loss_fn is nn.functional.cross_entropy:
                    loss_sum += float(nn.functional.cross_entropy(output, y, reduction="sum"))
                else:
                    loss_sum += float(self.loss_fn(output, y)) * len(chunk)
                metric += float((output.argmax(1) == y).sum())
        loss_sum, metric, squares, elements = comm.get().allreduce_scalars(
            [loss_sum, metric, squares, float(elements)], name="eval", average=False)
        val_loss = loss_sum / len(val)
        val_acc = float("nan") if self.regression else metric / len(val)
        val_psnr = psnr(squares / max(elements, 1), self.psnr_peak) if self.regression else float("nan")
        if self.cfg.train.abort_on_nan and not math.isfinite(val_loss):    # the same on every rank
            raise AgreedError(f"non-finite validation loss ({val_loss}) at step {self.progress.step}, epoch "
                              f"{self.progress.epoch}; no checkpoint of the diverged model was written: lower "
                              "train.lr, check the data, or set train.abort_on_nan = false")
        if self.root:
            if self.log is not None:
                self.log.append("evals", {"step": self.progress.step, "epoch": self.progress.epoch,
                                          "val_loss": val_loss, "val_accuracy": val_acc,
                                          "wall_time_s": self.progress.elapsed_s, "val_psnr": val_psnr})
            metric_text = f"val_psnr {val_psnr:.2f} dB" if self.regression else f"val_accuracy {val_acc:.4f}"
            print(f"[epoch {self.progress.epoch}/{self.cfg.train.epochs}, step {self.progress.step}] val_loss {val_loss:.4f} "
                  f"{metric_text}", flush=True)
        return val_loss
