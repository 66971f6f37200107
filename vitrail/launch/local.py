"""Pretrain in this one process, without Ray: tests, debugging, a laptop."""

from __future__ import annotations

from vitrail.config import Config
from vitrail.launch.lock import run_dir_lock
from vitrail.launch.loop import Trainer, first_epoch, start_run
from vitrail.launch.tracking import Tracker
from vitrail.pipelines.ledger import ShardLedger
from vitrail.pipelines.stream import local_batches


def pretrain(config: Config, progress: bool = True, reset: bool = False) -> Trainer:
    """Train `config` here; `reset` starts over, moving a previous run in the run dir aside."""
    with run_dir_lock(config.run.dir):
        index = start_run(config, reset)
        trainer = Trainer(config, index.num_samples)
        trainer.resume_if_possible()
        ledger = ShardLedger()
        batches = local_batches(index, config.method.views(), config.run.seed, config.data.channels,
                                config.optim.batch_size, start_epoch=first_epoch(config, index.num_samples, 1),
                                max_pixels=config.data.max_image_pixels, verify=config.data.verify, ledger=ledger)
        tracker = Tracker(config.run.dir, config.run.tracking, config.model_dump(mode="json"))
        try:
            trainer.fit(batches, report=tracker.log, progress=progress, before_checkpoint=tracker.sync, ledger=ledger)
        finally:
            sync_command = tracker.close()
    if sync_command:
        print(f"wandb ran offline; upload with: {sync_command}")
    return trainer
