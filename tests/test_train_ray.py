"""The Ray path end to end: Ray Data reads the shards and makes the views, Ray Train trains."""

import json

import torch

from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.loop import Trainer
from vitrail.launch.train import pretrain
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches

from conftest import tiny_config_tree


def test_ray_pretrain_one_worker_then_resume(ray_cluster, fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, optim={"epochs": 2, "batch_size": 32, "max_steps": 8},
                            run={"tracking": "wandb"})
    pretrain(from_dict(tree), dashboard=False)
    assert checkpoints.latest_step(run_dir) == 8
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8]
    assert rows[-1]["data/skipped"] == 0 and rows[-1]["images_per_second"] > 0
    # wandb ran offline into the run dir, with a stable run id for resumes.
    run_id = (run_dir / "wandb_id").read_text()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))

    tree["optim"]["max_steps"] = 12
    pretrain(from_dict(tree), dashboard=False)
    assert checkpoints.latest_step(run_dir) == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]
    assert (run_dir / "wandb_id").read_text() == run_id


def _byol_resnet_tree(fashion_shards, run_dir, sync_batchnorm):
    """BYOL on a ResNet-18: BatchNorm in the backbone (2d) and in the projector and predictor (1d)."""
    tree = tiny_config_tree(fashion_shards, run_dir, model={"backbone": "resnet18", "kwargs": {}, "sync_batchnorm": sync_batchnorm},
                            optim={"batch_size": 8, "max_steps": 3})
    tree["method"] = {"name": "byol", "hidden_dim": 32, "projection_dim": 16, "crop_size": 28}
    return tree


def test_two_workers_share_batchnorm_statistics_only_with_sync_batchnorm(ray_cluster, fashion_shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_and_save_buffers(trees):
        # The real Trainer (conversion, DDP over gloo, steps) on different images per rank;
        # each rank writes the BN buffers it ends with.
        import ray.train

        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        for name, tree in trees.items():
            config = from_dict(tree)
            index = read_index(config.data.shards)
            trainer = Trainer(config, index.num_samples, rank, world_size)
            batches = local_batches(index, config.method.views(), config.run.seed + rank, config.data.channels,
                                    config.optim.batch_size)
            trainer.fit(batches, progress=False)
            buffers = {key: value for key, value in trainer.method.state_dict().items() if ".running_" in key}
            torch.save(buffers, tmp_path / f"{name}-rank{rank}.pt")

    trees = {name: _byol_resnet_tree(fashion_shards, tmp_path / name, sync) for name, sync in (("sync", True), ("plain", False))}
    TorchTrainer(train_and_save_buffers, train_loop_config=trees,
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()

    initial = {key: value for key, value in Trainer(from_dict(trees["sync"]), 640).method.state_dict().items() if ".running_" in key}
    synced = [torch.load(tmp_path / f"sync-rank{rank}.pt") for rank in range(2)]
    plain = [torch.load(tmp_path / f"plain-rank{rank}.pt") for rank in range(2)]
    # BN layers in the online backbone and heads and in the EMA target, all trained.
    assert sum(key.startswith("online.0.") for key in initial) == 2 * 20  # ResNet-18's 20 BN layers
    assert {key.split(".")[0] for key in initial} == {"online", "predictor", "target"}
    assert synced[0].keys() == plain[0].keys() == initial.keys()
    for key in initial:
        assert not torch.equal(synced[0][key], initial[key]), key
        assert torch.equal(synced[0][key], synced[1][key]), key
    # Without it, each rank ends on its own batch's statistics (rank 0's reach the others only at the next forward).
    assert not any(torch.equal(plain[0][key], plain[1][key]) for key in initial)
    # The synchronised run's checkpoint loads into the one-process trainer: SyncBatchNorm keeps BatchNorm's keys.
    local = Trainer(from_dict(trees["sync"]), 640)
    local.restore(checkpoints.load(tmp_path / "sync"))
    assert torch.equal(local.method.state_dict()["online.0.bn1.running_mean"], synced[0]["online.0.bn1.running_mean"])


def test_cli_pretrain_keeps_ray_on_loopback_without_any_env(fashion_shards, tmp_path):
    """`vitrail pretrain` in a fresh process whose environment says nothing about Ray: the node
    it starts must be 127.0.0.1, not the machine's outward address (Ray picks that unless its
    single-machine mode is set before `ray` is first imported), and nothing the run opens (Ray's
    servers, the dashboard, the training worker's torch.distributed store, gloo) listens beyond it."""
    import os
    import subprocess
    import sys

    import psutil
    import yaml

    from listeners import off_loopback, watch_listeners

    config_file = tmp_path / "tiny.yaml"
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", optim={"epochs": 1, "batch_size": 32, "max_steps": 4},
                            run={"precision": "fp32"})
    config_file.write_text(yaml.safe_dump(tree))
    script = ("import sys; from vitrail.launch.cli import main; code = main(sys.argv[1:]); import ray; "
              "print('NODES', sorted(node['NodeManagerAddress'] for node in ray.nodes())); sys.exit(code)")
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME", "MASTER_ADDR")}
    driver = subprocess.Popen([sys.executable, "-c", script, "pretrain", str(config_file)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(driver.pid)
    try:
        with watch_listeners(lambda: [root]) as listeners:
            stdout, stderr = driver.communicate(timeout=900)
    finally:
        driver.kill()  # a no-op once it has ended
    assert driver.returncode == 0, stderr[-3000:]
    assert "NODES ['127.0.0.1']" in stdout
    assert checkpoints.latest_step(tmp_path / "run") == 4
    # The store's process is named after Ray's worker actor; the dashboard ran too (no --no-dashboard).
    names = {name for _, _, name in listeners}
    assert any("RayTrainWorker" in name for name in names) and any("dashboard" in name.lower() for name in names), listeners
    assert not off_loopback(listeners), off_loopback(listeners)
