"""Backbones from DINO's and iBOT's released checkpoint layouts, and `vitrail eval` on one."""

import argparse
import json

import pytest
import torch

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import open_checkpoint
from vitrail.eval.features import extract
from vitrail.eval.knn import knn_classify_multi_k
from vitrail.launch.cli import main
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform, Normalization


def released_vit():
    """A ViT-Ti/16 whose state dict carries DINO's key names (ours are DINO's), 32 px position grid."""
    torch.manual_seed(1)  # not the seed of the random-init baseline
    return backbones.create("vit_tiny", patch_size=16, img_size=32).eval()


def layouts(weights):
    head = {"mlp.0.weight": torch.randn(8, 192), "last_layer.weight_g": torch.ones(16, 1)}
    return {
        "plain": weights,
        "dino_training": {
            "teacher": {**{f"backbone.{k}": v for k, v in weights.items()}, **{f"head.{k}": v for k, v in head.items()}},
            "student": {**{f"module.backbone.{k}": v + 1 for k, v in weights.items()},
                        **{f"module.head.{k}": v for k, v in head.items()}},
            "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
        },
        "ibot_released": {"state_dict": {**weights, "masked_embed": torch.zeros(1, 192)}},
    }


@pytest.mark.parametrize("layout", ["plain", "dino_training", "ibot_released"])
def test_released_layouts_load_the_teacher_backbone(tmp_path, layout):
    model = released_vit()
    path = tmp_path / f"{layout}.pth"
    torch.save(layouts(model.state_dict())[layout], path)
    loaded = open_checkpoint(path, arch="vit_tiny", patch_size=16)
    assert loaded.step is None and loaded.crop_size == 224 and loaded.data.channels == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.eval()(images), model(images))
    assert not torch.equal(loaded.build_random().cls_token, model.cls_token)


def test_released_checkpoint_errors_say_what_is_needed(tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(released_vit().state_dict(), path)
    with pytest.raises(VitrailError, match=r"stores no config.*pass --arch \(one of .*vit_small.*\) and, for a ViT, --patch-size"):
        open_checkpoint(path)
    with pytest.raises(VitrailError, match="--patch-size 8 does not match .* 16x16"):
        open_checkpoint(path, arch="vit_tiny", patch_size=8)
    with pytest.raises(VitrailError, match=r"does not hold vit_small weights; wrong shape: cls_token \(1, 1, 192\) \(expected \(1, 1, 384\)\)"):
        open_checkpoint(path, arch="vit_small", patch_size=16)
    shallow = {k: v for k, v in released_vit().state_dict().items() if not k.startswith("blocks.11.")}
    torch.save({**shallow, "fc.weight": torch.zeros(2)}, path)
    with pytest.raises(VitrailError, match=r"missing: blocks\.11\.norm1\.weight.*unexpected: fc\.weight \(1 in all\)"):
        open_checkpoint(path, arch="vit_tiny")
    torch.save({"teacher": {"epoch": 3}}, path)
    with pytest.raises(VitrailError, match="holds no backbone weights"):
        open_checkpoint(path, arch="vit_tiny")


def test_eval_knn_on_released_dino_weights(fashion_shards, tmp_path, capsys):
    model = released_vit()
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(model.state_dict(), path)
    code = main(["eval", "knn", "--checkpoint", str(path), "--arch", "vit_tiny", "--patch-size", "16",
                 "--data", str(fashion_shards), "--crop-size", "32", "--limit", "320",
                 "--knn-memory-mb", "1"])  # the cached memmaps searched in two chunks of queries
    assert code == 0, capsys.readouterr().err
    assert "| pretrained (dino_vittiny16_pretrain.pth) | 192 | 200 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["knn"]
    assert [row["k"] for row in rows] == [10, 20, 100, 200]
    # The same protocol computed here, on features of the model we saved, with ImageNet statistics (DINO's).
    transform, stats = EvalTransform.at(32), Normalization(3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train, test = (extract(model, read_index(fashion_shards / split), transform, stats, limit=320) for split in ("train", "test"))
    expected = knn_classify_multi_k(*train, *test)
    for row in rows:
        assert (row["top1"], row["top5"]) == (expected[row["k"]]["top1"], expected[row["k"]]["top5"])
        assert row["dim"] == 192 and row["samples_train"] == row["samples_test"] == 320
    assert expected[20]["top1"] > 30.0  # random ViT features of real Fashion-MNIST beat 10 % chance
    assert len(list((tmp_path / "features").iterdir())) == 2
