"""Feature modes, the memory-mapped feature cache and Ray extraction, on real Fashion-MNIST shards."""

import numpy as np
import pytest
import torch

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.eval import cache
from vitrail.eval.distributed import ray_feature_batches, shard_groups
from vitrail.eval.features import check_mode, cls_columns, default_probe_features, extract, feature_batches, frozen_features
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform, Normalization

STATS = Normalization(1, (0.286,), (0.353,))


def tiny_vit(depth=5):
    torch.manual_seed(0)
    return backbones.create("vit_tiny", depth=depth, embed_dim=48, num_heads=3, patch_size=7, img_size=28, in_chans=1).eval()


@torch.no_grad()
def test_last4_is_the_normed_cls_of_the_last_four_blocks():
    model, images = tiny_vit(depth=5), torch.randn(3, 1, 28, 28)
    tokens, manual = model.prepare_tokens(images), []
    for block in model.blocks:
        tokens = block(tokens)
        manual.append(model.norm(tokens)[:, 0])
    assert model.intermediate_cls(images, 4).shape == (3, 4, 48)
    last4 = frozen_features(model, images, "last4")
    assert last4.shape == (3, 192)
    torch.testing.assert_close(last4, torch.cat(manual[1:], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(last4[:, cls_columns("last4", 48)], model(images), rtol=0, atol=0)

    avgpool = frozen_features(model, images, "cls_avgpool")
    assert avgpool.shape == (3, 96)
    torch.testing.assert_close(avgpool[:, cls_columns("cls_avgpool", 48)], model(images), rtol=0, atol=0)
    torch.testing.assert_close(avgpool[:, 48:], model.norm(tokens)[:, 1:].mean(dim=1), rtol=1e-6, atol=1e-6)


def test_default_probe_features_follow_dino_and_bad_modes_are_named():
    assert default_probe_features(backbones.create("vit_small", depth=1)) == "last4"
    assert default_probe_features(backbones.create("vit_base", depth=1)) == "cls_avgpool"
    resnet = backbones.create("resnet18")
    assert default_probe_features(resnet) == "cls"
    with pytest.raises(VitrailError, match="'last4' needs a ViT.*random init has none"):
        check_mode(resnet, "last4", "random init")
    with pytest.raises(VitrailError, match="'cls_avgpool' needs a token model"):
        check_mode(resnet, "cls_avgpool")
    with pytest.raises(VitrailError, match="unknown feature mode 'cls4'"):
        check_mode(resnet, "cls4")


def test_cache_stores_memory_mapped_features_equal_to_extraction(fashion_shards, tmp_path):
    model, index, transform = tiny_vit(depth=4), read_index(fashion_shards / "test"), EvalTransform(28, 28)
    features, labels, keys = extract(model, index, transform, STATS, limit=200, return_keys=True, mode="last4")
    folder = cache.entry(tmp_path, "test", {"case": 1})
    assert cache.load(folder) is None
    # A capacity above what arrives is what skipped (undecodable) samples leave: the file is cut to size.
    stored = cache.store(folder, feature_batches(model, index, transform, STATS, batch_size=64, limit=200, mode="last4"),
                         capacity=index.num_samples, identity={"case": 1})
    assert isinstance(stored.features, np.memmap) and stored.features.shape == (200, 192)
    np.testing.assert_array_equal(stored.features, features)
    np.testing.assert_array_equal(stored.labels, labels)
    assert list(stored.keys) == keys
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder.name]  # no temporary left behind
    again = cache.load(folder)
    np.testing.assert_array_equal(again.features, features)
    assert cache.entry(tmp_path, "test", {"case": 2}) != folder


def test_ray_extraction_equals_in_process(fashion_shards, ray_cluster):
    model, index, transform = tiny_vit(depth=2), read_index(fashion_shards / "train"), EvalTransform(28, 28)
    assert [len(group.shards) for group in shard_groups(index, 2)] == [3, 2]
    assert [len(group.shards) for group in shard_groups(index, 4, limit=300)] == [1, 1, 1]
    expected = extract(model, index, transform, STATS, limit=600, return_keys=True)
    parts = list(ray_feature_batches(model, index, transform, STATS, workers=2, limit=600))
    assert len(parts) == 2
    features, labels, keys = (np.concatenate([part[i] for part in parts]) for i in range(3))
    np.testing.assert_allclose(features, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, expected[1])
    assert list(keys) == expected[2]
    assert ray_cluster.is_initialized()  # a cluster it did not start is left running
