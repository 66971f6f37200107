"""The training loop every launcher runs: local (one process) and Ray Train (one per worker).

It knows nothing of any method's internals: it builds the method named in the config and calls
its contract (vitrail.ssl.base.Method) alone: the views, the method's optimizer and schedules, the
step and its hooks. It checkpoints and logs on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from vitrail import checkpoints, ssl, storage
from vitrail.config import Config
from vitrail.errors import VitrailError
from vitrail.eval.features import extract
from vitrail.eval.online import OnlineMonitor
from vitrail.launch import resume, sync_batchnorm
from vitrail.launch.init_from import initialise
from vitrail.pipelines.shards import ShardIndex, read_index
from vitrail.precision import autocast, float32_norms, uses_bf16
from vitrail.ssl.optim import apply


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int  # the length every schedule spans
    stop_step: int    # where this run stops (max_steps may cut it short)

    @classmethod
    def of(cls, config: Config, num_samples: int, world_size: int) -> "Schedule":
        global_batch = config.optim.batch_size * max(1, world_size)
        steps_per_epoch = num_samples // global_batch
        if steps_per_epoch < 1:
            raise VitrailError(
                f"the shard set holds {num_samples} samples, fewer than one global batch "
                f"({config.optim.batch_size} per worker x {max(1, world_size)} workers); lower optim.batch_size"
            )
        total = steps_per_epoch * config.optim.epochs
        return cls(steps_per_epoch, total, min(total, config.optim.max_steps or total))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VitrailError("run.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


class Trainer:
    """Owns the method, optimizer and step counter of one worker."""

    def __init__(self, config: Config, num_samples: int, rank: int = 0, world_size: int = 1, device=None,
                 report_checkpoint=None):
        """`report_checkpoint(step, state)`, when given, takes the checkpoints on every rank (rank 0's
        state, None elsewhere): Ray Train's collective `report`. Without it rank 0 writes them itself."""
        self.config, self.rank, self.world_size = config, rank, world_size
        self.report_checkpoint = report_checkpoint
        self.device = device or resolve_device(config.run.device)
        self.schedule = Schedule.of(config, num_samples, world_size)
        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        self.method = ssl.build(config, self.schedule.steps_per_epoch, self.schedule.total_steps).to(self.device)
        if world_size > 1 and config.model.sync_batchnorm:
            # Student and EMA teacher alike: both normalise by batch statistics in training mode.
            self.method = sync_batchnorm.convert(self.method, self.device)
        float32_norms(self.method)  # after the conversion, which builds new BatchNorm layers
        self.recipe = config.optim.recipe()
        self.optimizer = self.method.optimizer(self.recipe)
        self.step = 0
        self.views = self.method.views()
        self.autocast = uses_bf16(config.run.precision, self.device)

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "config": self.config.model_dump(mode="json")}

    def restore(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def resume_if_possible(self) -> None:
        """Resume from the run dir's checkpoint; a fresh run starts from model.init_from when set."""
        if checkpoints.list_checkpoints(self.config.run.dir):
            self.restore(checkpoints.load(self.config.run.dir, map_location=self.device))
        elif self.config.model.init_from:
            initialise(self.method, self.config)

    def save_checkpoint(self) -> None:
        if self.report_checkpoint is not None:
            self.report_checkpoint(self.step, self.state() if self.rank == 0 else None)
        elif self.rank == 0:
            checkpoints.save(self.config.run.dir, self.step, self.state(), self.config.run.keep_last)

    def training_set_features(self, backbone: nn.Module, transform) -> tuple:
        """(features (N, D) float32, keys) of every training sample through `transform`: the
        `features_of` that `method.on_epoch_start` gets, since the view stream never holds the whole data set."""
        was_training = backbone.training
        data = self.config.data
        features, _, keys = extract(backbone, read_index(data.shards), transform, data.normalization, device=self.device,
                                    return_keys=True, max_pixels=data.max_image_pixels,
                                    progress="training-set features" if self.rank == 0 else None)
        backbone.train(was_training)
        return features, keys

    # -- one step ------------------------------------------------------------------------
    def set_schedules(self) -> dict[str, float]:
        global_batch = self.config.optim.batch_size * self.world_size
        values = self.method.schedules(self.recipe, self.step, global_batch)
        apply(self.optimizer, values["lr"], values["weight_decay"])
        return values

    def train_step(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logged = self.set_schedules()
        views = self.views.to_device(batch, self.device, self.config.data.normalization)
        with autocast(self.device, self.autocast):
            loss, metrics = model(views, self.step)  # the method's training_step, through DDP's forward
        if not torch.isfinite(loss):
            raise VitrailError(
                f"loss is {loss.item()} at step {self.step}: training stopped. The last checkpoint in "
                f"{checkpoints.checkpoint_dir(self.config.run.dir)} is intact; lower optim.lr or raise "
                "optim.warmup_epochs and resume"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.clip_grad > 0:
            self.method.clip_gradients(self.recipe.clip_grad)
        self.method.after_backward(self.step)
        if self.step < self.config.model.freeze_backbone_steps:
            # Head warm-up: an optimizer skips a parameter without a gradient (no update, no weight decay).
            for parameter in self.method.backbone_pair()[0].parameters():
                parameter.grad = None
        self.optimizer.step()
        logged.update(self.method.after_step(self.step))
        self.step += 1
        logged.update({key: float(value) for key, value in metrics.items()})
        return logged

    def data_counts(self, ledger) -> dict[str, int]:
        """`data/skipped` and `data/extra_samples` from the ledger the batches' shards are counted in
        (`stream.ShardLedger`, or `RemoteLedger`). Under Ray it counts the shards of every rank, so
        rank 0 alone asks and reports; {} elsewhere or without a ledger."""
        if ledger is None or self.rank != 0:
            return {}
        totals = ledger.totals()
        return {"data/skipped": totals["skipped"], "data/extra_samples": totals["extra"]}

    def fit(self, batches: Iterable[dict], report=None, progress: bool = True, before_checkpoint=None,
            ledger=None) -> None:
        """Train until `schedule.stop_step` or the data ends; `report(metrics, step)` on log steps, and
        `report(metrics, step, images=...)` from the online monitor (k-NN, view grids, attention);
        `before_checkpoint()` before each checkpoint: tracker files reach the run dir before the checkpoint
        a resume would start from, so its metrics.jsonl never lacks the rows up to that step. The data
        counts logged are `ledger`'s (`data_counts`): they cover the shards read so far, which may run
        ahead of the batches trained on."""
        run = self.config.run
        model = self.method
        if self.world_size > 1:
            # Unused parameters exist by design (e.g. DINO's last layer during its first epoch).
            # DDP's default buffer sync (broadcast_buffers, forward_sync_buffers in torch 2.14) is kept on
            # purpose: buffers (BN running statistics, centres) go from rank 0 to all at every forward,
            # so with sync_batchnorm off no rank's BN statistics drift on its own batches alone.
            model = nn.parallel.DistributedDataParallel(self.method, find_unused_parameters=True)
        bar = _progress(self.schedule.stop_step, self.step, enabled=progress and self.rank == 0)
        monitor = OnlineMonitor(self.config, self.device, report, self.schedule.stop_step) if report is not None and self.rank == 0 else None
        images, started = 0, time.perf_counter()
        # The first row after a resume says so: in metrics.jsonl a restart is one key, not a guess from the steps.
        resumed_from = self.step or None
        iterator: Iterator[dict] = iter(batches)
        while self.step < self.schedule.stop_step:
            batch = next(iterator, None)
            if batch is None:
                break
            if self.step % self.schedule.steps_per_epoch == 0:
                self.method.on_epoch_start(self.step // self.schedule.steps_per_epoch, self.training_set_features)
            metrics = self.train_step(model, batch)
            images += len(batch["label"]) * self.world_size
            if self.step % run.log_every == 0 or self.step == self.schedule.stop_step:
                elapsed = time.perf_counter() - started
                metrics.update({"images_per_second": images / elapsed, **self.data_counts(ledger),
                                "epoch": self.step / self.schedule.steps_per_epoch})
                images, started = 0, time.perf_counter()
                if resumed_from is not None:
                    metrics["resumed_from"], resumed_from = resumed_from, None
                if report is not None and self.rank == 0:
                    report(metrics, self.step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_second']:.1f}")
            if monitor is not None:
                # Watching is not training: its time stays out of images_per_second.
                started += monitor.after_step(self.method, batch, self.step)
            bar.update(1)
            if self.step % run.checkpoint_every == 0:
                if before_checkpoint is not None:
                    before_checkpoint()
                self.save_checkpoint()
        if self.step % run.checkpoint_every != 0:
            self.save_checkpoint()
        bar.close()


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="pretrain", unit="step",
                mininterval=2.0, dynamic_ncols=True)


def start_run(config: Config, reset: bool = False) -> ShardIndex:
    """Check the shards, and that the run dir's checkpoints are of this model and method (with `reset`,
    move the previous run aside instead), then record the config (paths made absolute) in the run dir;
    returns the shard index. Call it holding the run dir's lock."""
    config.make_paths_absolute()
    index = read_index(config.data.shards)
    run_dir = config.run.dir
    storage.check_readable(run_dir, "run dir")
    storage.makedirs(run_dir)
    if reset:
        resume.set_aside(run_dir)
    else:
        resume.check_resumable(config)
    storage.write_text(storage.join(run_dir, "config.yaml"), config.to_yaml())
    return index


def first_epoch(config: Config, num_samples: int, world_size: int) -> int:
    """The epoch a resumed run restarts its data from (data resumes at epoch granularity)."""
    step = checkpoints.latest_step(config.run.dir)
    return step // Schedule.of(config, num_samples, world_size).steps_per_epoch
