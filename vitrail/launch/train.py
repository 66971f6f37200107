"""Pretrain with Ray: Ray Data streams the views, Ray Train runs the loop on N DDP workers.

The driver reads the shard index, builds the view dataset (decoding and augmentation run in
Ray Data tasks, uint8 all the way), and hands `streaming_split` shards of it to the
workers. Workers run `loop.Trainer`. Checkpoints go through Ray Train's own API: rank 0's state
in `ray.train.report(checkpoint=...)`, which Ray stores under RUN_DIR/checkpoints (local or object
storage), and a worker group that starts or restarts on any node resumes from
`ray.train.get_checkpoint()`. Before any worker starts, every node is checked to reach the data
and the run dir (`preflight`).
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path

import torch

from vitrail import checkpoints, storage
from vitrail.errors import VitrailError
from vitrail.cluster import LOOPBACK_ENV, init_ray
from vitrail.config import Config, RaySection, from_dict
from vitrail.launch.lock import run_dir_lock
from vitrail.launch.loop import Schedule, Trainer, first_epoch, start_run
from vitrail.launch.tracking import Tracker
from vitrail.pipelines.shards import INDEX, read_index
from vitrail.pipelines.ledger import RemoteLedger
from vitrail.pipelines.stream import ingest_options, ray_dataset

def _worker_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = from_dict(loop_config["config"])
    # Ray pins OMP threads to the worker's CPU reservation; the data tasks beside it may be light
    # enough that the worker should use more (the demo: 1 CPU reserved, 2 threads).
    torch.set_num_threads(config.ray.torch_threads or max(1, int(config.ray.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    trainer = Trainer(config, loop_config["num_samples"], rank, world_size, device=device,
                      report_checkpoint=_report_checkpoint)
    reported = ray.train.get_checkpoint()
    if reported is None:  # a first start: the run dir may still hold a previous run's checkpoints
        trainer.resume_if_possible()
    else:
        with reported.as_directory() as folder:
            trainer.restore(checkpoints.load(Path(folder) / checkpoints.STATE, map_location=device))
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                 local_shuffle_buffer_size=config.data.shuffle_buffer or None,
                                 local_shuffle_seed=config.run.seed + trainer.step)
    tracker = Tracker(config.run.dir, config.run.tracking, loop_config["config"]) if rank == 0 else None
    try:
        trainer.fit(batches, report=tracker.log if tracker else None,
                    before_checkpoint=tracker.sync if tracker else None, ledger=loop_config["ledger"])
    finally:
        if tracker is not None:
            sync_command = tracker.close()
            if sync_command:
                print(f"wandb ran offline; upload with: {sync_command}")


def _report_checkpoint(step: int, state: dict | None) -> None:
    """Every rank reports the step; rank 0's report carries the checkpoint, which Ray uploads into
    RUN_DIR/checkpoints/step-N and registers only once it is whole."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="vitrail-checkpoint-") as folder:
        checkpoint = None
        if state is not None:
            checkpoints.write_folder(folder, state)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=checkpoints.folder_name(step))


def _view_dataset(config_tree: dict, workers: int, ledger: RemoteLedger):
    """The views from the latest checkpoint's epoch on. Ray Train calls this at every worker-group
    start, so a group restarted after a failure resumes its data with its checkpoint; every start's
    dataset counts its shards in the run's one `ledger`."""
    config = from_dict(config_tree)
    index = read_index(config.data.shards)
    start_epoch = first_epoch(config, index.num_samples, workers)
    return ray_dataset(index, config.method.views(), config.run.seed, config.data.channels,
                       range(start_epoch, config.optim.epochs), object_store_mb=config.ray.object_store_mb,
                       max_pixels=config.data.max_image_pixels, verify=config.data.verify, ledger=ledger)


def check_resources(settings: RaySection, available: dict, where: str) -> None:
    """Fail with the numbers when the workers cannot all be placed: Ray would wait for them forever."""
    # Ray Data's view tasks take 1 CPU each (map_batches' default) beside the workers' reservations.
    needs = {"CPU": settings.workers * settings.cpus_per_worker + 1, "GPU": settings.workers * settings.gpus_per_worker}
    for resource, key in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
        has = available.get(resource, 0)
        if needs[resource] <= has:
            continue
        if resource == "GPU" and not has:
            raise VitrailError(f"ray.gpus_per_worker={settings.gpus_per_worker:g} but {where} has no GPU visible to Ray; "
                               "set ray.gpus_per_worker=0 (drop --gpus-per-worker)")
        view_task = " + 1 for the view tasks" if resource == "CPU" else ""
        raise VitrailError(f"ray.workers={settings.workers} x ray.{key}={getattr(settings, key):g}{view_task} needs "
                           f"{needs[resource]:g} {resource}s but {where} has {has:g}; lower ray.workers or ray.{key}")


def _worker_runtime_env(settings: RaySection) -> dict | None:
    """The interface the workers' gloo / NCCL sockets bind: loopback on one machine, `ray.interface` on a cluster."""
    if not settings.address:
        return {"env_vars": dict(LOOPBACK_ENV)}
    if settings.interface:
        return {"env_vars": {"GLOO_SOCKET_IFNAME": settings.interface, "NCCL_SOCKET_IFNAME": settings.interface}}
    return None


def pretrain(config: Config, dashboard: bool = True, reset: bool = False) -> str:
    """Run the pretraining in `config` on Ray, holding the run dir's lock; returns the run dir.
    `reset` starts over, moving a previous run in the run dir aside."""
    if config.ray.workers < 1:
        raise VitrailError("ray.workers must be at least 1 for a Ray run; use --local for one process")
    with run_dir_lock(config.run.dir):
        return _pretrain(config, dashboard, reset)


def _pretrain(config: Config, dashboard: bool, reset: bool) -> str:
    index = start_run(config, reset)
    workers = config.ray.workers
    Schedule.of(config, index.num_samples, workers)  # a global batch larger than the data fails here, not in a worker
    if not config.ray.address:
        check_resources(config.ray, {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}, "this machine")
    init_ray(config.ray.address, config.ray.object_store_mb, dashboard)  # before any `ray` import: it sets the loopback mode Ray reads then
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vitrail.launch.process_group import BoundStoreTorchConfig

    if config.ray.address:
        check_resources(config.ray, ray.cluster_resources(), f"the cluster at {config.ray.address}")
    from vitrail.launch.preflight import check_nodes
    check_nodes(storage.join(index.folder, INDEX), config.run.dir)
    resources = {"CPU": config.ray.cpus_per_worker}
    if config.ray.gpus_per_worker:
        resources["GPU"] = config.ray.gpus_per_worker
    run_dir = storage.locate(config.run.dir)
    tree = config.model_dump(mode="json")
    # The workers and the view tasks of every worker-group start share it: the data counts the workers
    # log (once, on rank 0) cover every rank's shards, and a restart reading an epoch again counts it once.
    ledger = RemoteLedger()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": tree, "num_samples": index.num_samples, "ledger": ledger},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.ray.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        torch_config=BoundStoreTorchConfig(backend="nccl" if config.ray.gpus_per_worker else "gloo"),
        run_config=RunConfig(name="checkpoints", storage_path=run_dir.path,
                             storage_filesystem=None if storage.is_local(config.run.dir) else run_dir.filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_last),
                             failure_config=FailureConfig(max_failures=config.ray.max_failures),
                             worker_runtime_env=_worker_runtime_env(config.ray)),
        datasets={"train": partial(_view_dataset, tree, workers, ledger)},
        # Ray Train replaces the dataset's execution options with these: they carry the backpressure budget.
        dataset_config=DataConfig(execution_options=ingest_options(config.ray.object_store_mb)),
    )
    try:
        trainer.fit()
    except Exception as error:
        found = carried_user_error(error)
        if found is None:
            raise
        raise VitrailError(str(found)) from None
    return config.run.dir


def carried_user_error(error: BaseException) -> VitrailError | None:
    """The VitrailError inside a Ray failure (a view task's, a training worker's), found through Ray's
    wrappers: `RayTaskError.cause` is the task's own exception, `WorkerGroupError.worker_failures`
    maps ranks to theirs. None when the failure holds none."""
    from ray.exceptions import RayError

    todo, seen = [error], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, VitrailError) and not isinstance(current, RayError):
            return current
        linked = [getattr(current, "cause", None), current.__cause__, current.__context__,
                  *getattr(current, "worker_failures", {}).values()]
        todo.extend(item for item in linked if isinstance(item, BaseException))
    return None
