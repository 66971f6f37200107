"""Online monitoring during pretraining: k-NN on fixed subsets, view grids, attention maps."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitrail import backbones, ssl
from vitrail.errors import VitrailError
from vitrail.eval.features import extract
from vitrail.eval.images import MIN_CELL_PIXELS, view_grid
from vitrail.eval.knn import knn_classify
from vitrail.eval.online import OnlineMonitor, eval_transform
from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import MultiCrop, Normalization, Rotations, SingleCrop

FASHION = Normalization(1, (0.286,), (0.353,))  # Fashion-MNIST statistics

from conftest import tiny_config_tree

ONLINE = {"knn_every": 4, "knn_train_samples": 256, "knn_test_samples": 128}


def _rows(run_dir, key):
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in row]


def test_online_knn_logs_at_its_steps_equals_an_offline_evaluation_and_survives_resume(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, optim={"max_steps": 8})
    tree["eval"] = dict(ONLINE)
    pretrain(from_dict(tree), progress=False)

    knn = _rows(run_dir, "knn/top1")
    assert [row["step"] for row in knn] == [4, 8]
    assert all(0 <= row["knn/top1"] <= row["knn/top5"] <= 100 for row in knn)
    # The same protocol run offline on the step-8 checkpoint's eval backbone gives the logged numbers.
    state = checkpoints.load(run_dir)
    assert state["step"] == 8
    config = from_dict(state["config"])
    method = ssl.build(config, steps_per_epoch=1, total_steps=1)
    method.load_state_dict(state["method"])
    backbone = method.backbone_for_eval()
    transform = eval_transform(config)
    train = extract(backbone, read_index(fashion_shards / "train"), transform, FASHION, limit=256)
    test = extract(backbone, read_index(fashion_shards / "test"), transform, FASHION, limit=128)
    offline = knn_classify(*train, *test, k=20, temperature=0.07)
    assert knn[-1]["knn/top1"] == pytest.approx(offline["top1"]) and knn[-1]["knn/top5"] == pytest.approx(offline["top5"])
    # Far above the 10 % of chance: the monitor classifies real features of real images.
    assert knn[-1]["knn/top1"] > 30

    # Resumed to a last step off the interval: the monitor evaluates there too, and logs pictures again.
    tree["optim"]["max_steps"] = 10
    pretrain(from_dict(tree), progress=False)
    assert [row["step"] for row in _rows(run_dir, "knn/top1")] == [4, 8, 10]
    assert [row["step"] for row in _rows(run_dir, "loss")] == [2, 4, 6, 8, 10]
    assert sorted(path.name for path in (run_dir / "images").iterdir()) == [
        "attention_step10.png", "attention_step2.png", "attention_step4.png", "attention_step8.png",
        "views_step10.png", "views_step2.png"]
    # 4 images x (the image + 3 heads), 28-px cells enlarged to >= MIN_CELL_PIXELS.
    attention = np.asarray(Image.open(run_dir / "images" / "attention_step8.png"))
    cell = 28 * -(-MIN_CELL_PIXELS // 28)
    assert attention.shape == (4 * (cell + 2) + 2, 4 * (cell + 2) + 2, 3)


def test_online_knn_without_eval_shards_is_a_config_error(fashion_shards, tmp_path):
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", data={"eval_test_shards": None})
    tree["eval"] = dict(ONLINE)
    with pytest.raises(VitrailError, match="eval.knn_every needs data.eval_train_shards and data.eval_test_shards"):
        from_dict(tree)
    tree["eval"] = {"knn_train_samples": 10, "k": 20}
    with pytest.raises(VitrailError, match=r"eval.k \(20\) exceeds eval.knn_train_samples \(10\)"):
        from_dict(tree)
    # Shards that are not there stop the run before its first step, not at the first k-NN.
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", data={"eval_test_shards": str(tmp_path / "absent")})
    tree["eval"] = dict(ONLINE)
    with pytest.raises(VitrailError, match=str(tmp_path / "absent")):
        pretrain(from_dict(tree), progress=False)
    assert not checkpoints.list_checkpoints(tmp_path / "run")


def test_last_self_attention_is_the_softmax_sdpa_applies():
    vit = backbones.create("vit_tiny", img_size=28, patch_size=7, depth=2, embed_dim=48, num_heads=3).eval()
    x = torch.randn(2, 3, 28, 28)
    attention = vit.last_self_attention(x)
    assert attention.shape == (2, 3, 17, 17)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 17))
    # The same weights applied to the values give the block's scaled_dot_product_attention output.
    tokens = vit.prepare_tokens(x)
    tokens = vit.blocks[0](tokens)
    last = vit.blocks[-1].attn
    q, k, v = last.queries_keys_values(vit.blocks[-1].norm1(tokens))
    torch.testing.assert_close(attention @ v, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe, views_per_sample", [
    (MultiCrop(28, 12, num_local=3), 5), (SingleCrop(20), 1), (Rotations(20), 4)])
def test_view_grid_shows_every_view_of_every_recipe_de_normalised(fashion_shards, recipe, views_per_sample):
    batch = next(local_batches(read_index(fashion_shards / "train"), recipe, seed=0, channels=1, batch_size=6))
    views = recipe.to_device(batch, "cpu", FASHION)
    grid = view_grid(views, 6, FASHION, samples=4)
    size = 28 if isinstance(recipe, MultiCrop) else 20
    scale = -(-MIN_CELL_PIXELS // size)
    step = size * scale + 2
    assert grid.shape == (4 * step + 2, views_per_sample * step + 2, 3)
    # Row 1, column 0 is sample 1's first view, back in the uint8 the recipe made (up to rounding).
    first = batch["global"][1, 0, 0] if isinstance(recipe, MultiCrop) else batch["image"][1, 0]
    cell = grid[step + 2:step + 2 + size * scale:scale, 2:2 + size * scale:scale, 0]
    assert np.abs(cell.astype(int) - first.astype(int)).max() <= 1


def test_backbones_without_cls_attention_are_skipped_with_one_log_line(tiny_config, caplog):
    monitor = OnlineMonitor(tiny_config, "cpu", report=None, stop_step=8)
    resnet = backbones.create("resnet18")
    with caplog.at_level(logging.WARNING, logger="vitrail.monitor"):
        assert not monitor.has_attention(resnet) and not monitor.has_attention(resnet)
    assert [record.getMessage() for record in caplog.records] == [
        "no attention maps: the ResNet backbone has no CLS-token attention"]
    assert monitor.has_attention(backbones.create("vit_tiny"))
