"""DeepCluster: reproducible clustering, the weighted loss against its formula, the size check,
a local run that re-clusters at the epoch boundary and resumes with its assignment."""

import json

import numpy as np
import pytest
import torch

from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.pipelines.views import Views, key_ids
from vitrail.ssl.deepcluster import DeepCluster, DeepClusterConfig, pca_whiten

from conftest import resumed_trainer, tiny_config_tree

TINY_VIT = {"patch_size": 7, "img_size": 28, "depth": 1, "embed_dim": 24, "num_heads": 2}


def tiny_tree(shards, run_dir, **optim):
    tree = tiny_config_tree(shards, run_dir, optim=optim)
    tree["method"] = {"name": "deepcluster", "num_clusters": 10, "pca_dim": 16, "crop_size": 28}
    return tree


def _method(num_clusters=5, seed=0):
    torch.manual_seed(seed)
    config = DeepClusterConfig(num_clusters=num_clusters, pca_dim=8, crop_size=28)
    return DeepCluster(config, "vit_tiny", {"in_chans": 1, **TINY_VIT}, steps_per_epoch=1, total_steps=1, drop_path_rate=0.0)


def _blobs(count=300, dim=12):
    generator = np.random.default_rng(0)
    centres = generator.normal(size=(6, dim)) * 4
    return (centres[generator.integers(0, 6, count)] + generator.normal(size=(count, dim))).astype(np.float32)


def test_assignments_reproduce_with_the_same_seed():
    features, keys = _blobs(), [f"s{i}" for i in range(300)]
    first, second = _method(seed=1), _method(seed=1)
    first.assign(features, keys, epoch=0)
    second.assign(features, keys, epoch=0)
    assert torch.equal(first.assigned_clusters, second.assigned_clusters)
    assert torch.equal(first.assigned_keys, torch.from_numpy(np.sort(key_ids(keys))))
    assert first.cluster_sizes.sum() == 300 and first.kmeans_seed(0) != first.kmeans_seed(1)
    assert torch.isnan(first.nmi_previous)
    first.assign(features, keys, epoch=1)  # a new seed, the same data: a finite NMI to the previous epoch
    assert 0.5 < first.nmi_previous <= 1.0


def test_pca_whitening_gives_unit_norm_rows():
    whitened = pca_whiten(_blobs(), 8)
    assert whitened.shape == (300, 8)
    np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, rtol=1e-5)


def test_more_clusters_than_samples_is_refused():
    with pytest.raises(VitrailError, match="num_clusters=500 is larger than the 300 training samples"):
        _method(num_clusters=500).assign(_blobs(), [f"s{i}" for i in range(300)], epoch=0)


def test_loss_weights_each_sample_by_its_inverse_cluster_size():
    method = _method(num_clusters=5)
    keys = [f"s{i}" for i in range(300)]
    method.assign(_blobs(), keys, epoch=0)
    images = torch.randn(6, 1, 28, 28)
    ids = torch.from_numpy(key_ids(keys[:6]))
    loss, metrics = method(Views([images], key_ids=ids), step=0)
    labels = method.pseudo_labels(ids)
    logits = method.classifier(method.backbone(images))
    weights = 1.0 / method.cluster_sizes[labels].float()
    per_sample = -logits.log_softmax(dim=1)[torch.arange(6), labels]
    torch.testing.assert_close(loss, (weights * per_sample).sum() / weights.sum())
    assert metrics["clusters/nonempty"] == 5 and metrics["clusters/largest"] >= metrics["clusters/smallest"]
    with pytest.raises(VitrailError, match="not in the last clustering"):
        method.pseudo_labels(torch.from_numpy(key_ids(["unseen"])))


def test_local_run_reclusters_each_epoch_and_resumes(fashion_shards, tmp_path):
    tree = tiny_tree(fashion_shards, tmp_path / "run", epochs=2, batch_size=32, max_steps=22)
    tree["model"]["kwargs"] = TINY_VIT
    tree["run"]["checkpoint_every"] = 11
    trained = pretrain(from_dict(tree), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 640 samples / 32 = 20 steps per epoch: clustered at step 0 (no NMI yet) and step 20.
    assert np.isnan(rows[0]["clusters/nmi_previous"]) and 0 < rows[-1]["clusters/nmi_previous"] <= 1
    assert trained.method.assigned_keys.numel() == 640
    assert resumed_trainer(tree, trained, changing_keys=("nmi_previous",)).step == 22
    assert checkpoints.latest_step(tmp_path / "run") == 22


def test_paper_and_demo_recipes_validate():
    paper = load("configs/deepcluster_resnet50.yaml")
    assert paper.method == DeepClusterConfig()  # every paper value is the default
    assert load("configs/demo_deepcluster.yaml").method.num_clusters == 100
