"""Shared fixtures: real Fashion-MNIST shards in a temp dir, a tiny DINO config, a local Ray cluster."""

from __future__ import annotations

import os

import pytest
import torch

from vitrail.config import from_dict
from vitrail.pipelines.sources import shard_fashion_mnist

# Ray's loopback-only mode is read when `ray` is first imported, so it is set before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory):
    """The first 640 train and 640 test images of the real Fashion-MNIST, as shards of 128."""
    out = tmp_path_factory.mktemp("fashion")
    shard_fashion_mnist(out, shard_size=128, limit=640, log=lambda message: None)
    return out


def tiny_config_tree(shards, run_dir, **sections) -> dict:
    """A DINO recipe small enough for seconds on a CPU; keyword sections update it."""
    tree = {
        # fp32 pinned: `auto` would pick bf16 on a CPU with AMX (tests/test_precision_matrix.py runs both).
        "run": {"dir": str(run_dir), "checkpoint_every": 4, "log_every": 2, "tracking": "none", "precision": "fp32"},
        "data": {"shards": str(shards / "train"), "eval_train_shards": str(shards / "train"),
                 "eval_test_shards": str(shards / "test"), "channels": 1, "mean": [0.286], "std": [0.353]},
        "model": {"backbone": "vit_tiny", "drop_path_rate": 0.1,
                  "kwargs": {"patch_size": 7, "img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3}},
        "method": {"name": "dino", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": 2,
                   "global_crop_size": 28, "local_crop_size": 14, "warmup_teacher_temp_epochs": 1},
        "optim": {"epochs": 2, "batch_size": 32, "warmup_epochs": 1},
        "ray": {"cpus_per_worker": 1},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


def resumed_trainer(tree: dict, trained, num_samples: int = 640, changing_keys=()):
    """A fresh Trainer resumed from the run dir of `tree`, checked to hold the method state of
    `trained` tensor for tensor (`changing_keys` may legitimately differ)."""
    from vitrail.launch.loop import Trainer

    fresh = Trainer(from_dict(tree), num_samples=num_samples)
    fresh.resume_if_possible()
    restored = fresh.method.state_dict()
    for key, value in trained.method.state_dict().items():
        assert torch.equal(value, restored[key]) or key in changing_keys, key
    return fresh


@pytest.fixture
def tiny_config(fashion_shards, tmp_path):
    return from_dict(tiny_config_tree(fashion_shards, tmp_path / "run"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real one-node Ray cluster on 127.0.0.1 (dashboard on 127.0.0.1), shut down after the test
    file: idle, a cluster takes 6.6 s of CPU a minute, and a start ~9 s (BENCHMARKS.md, "The
    suite's wall time"), so one idling through the other files would cost more than a start per file."""
    import ray

    from vitrail.cluster import init_ray

    init_ray(object_store_mb=512, dashboard=True)
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3 server (moto's, authentication on) on 127.0.0.1 with a bucket `vitrail`; this process's
    AWS variables point at it for the session, as a user's environment would point at their store."""
    from object_storage import s3_server

    with s3_server() as server:
        saved = {key: os.environ.get(key) for key in server.environment()}
        os.environ.update(server.environment())
        server.client().create_bucket(Bucket="vitrail")
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# `make test` runs two test files at a time (pytest-xdist, `--dist loadfile --no-loadscope-reorder`),
# handing files out in collection order. The longest go first, so that none starts near the end
# and leaves the other worker idle (their seconds: BENCHMARKS.md, "The suite's wall time").
LONGEST_FILES = ["test_multinode.py", "test_precision_matrix.py", "test_bad_data.py", "test_jobs.py",
                 "test_train_ray.py", "test_gpu_benchmark.py", "test_methods_ray.py"]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES))
