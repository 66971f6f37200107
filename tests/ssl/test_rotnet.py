"""RotNet: the rotation views, the loss against its formula, a local run that resumes."""

import numpy as np
import pytest
import torch

from vitrail import checkpoints
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.pipelines.views import Normalization, Rotations
from vitrail.ssl.rotnet import rotation_loss

from conftest import resumed_trainer, tiny_config_tree


def tiny_tree(shards, run_dir, **optim):
    tree = tiny_config_tree(shards, run_dir, optim=optim)
    tree["method"] = {"name": "rotnet", "crop_size": 28, "crop_scale": [0.6, 1.0]}
    return tree


def test_rotation_views_are_the_four_rotations_with_labels():
    images = [torch.arange(2 * 6 * 6, dtype=torch.uint8).view(2, 6, 6)[:1] * k for k in (1, 2)]
    recipe = Rotations(size=6, scale=(1.0, 1.0))
    columns = recipe(images, ["a", "b"], seed=0, epoch=0)
    columns["key"] = np.array(["a", "b"], dtype=object)
    views = recipe.to_device(columns, "cpu", Normalization(1, (0.0,), (1 / 255,)))
    (rotated,) = views.crops
    assert rotated.shape == (8, 1, 6, 6)
    assert views.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    upright = rotated[:2]
    for quarter in range(4):
        torch.testing.assert_close(rotated[2 * quarter:2 * quarter + 2], torch.rot90(upright, quarter, (-2, -1)))


def test_loss_is_cross_entropy_over_rotations():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=generator)
    labels = torch.arange(4).repeat_interleave(3)
    loss, accuracy = rotation_loss(logits, labels)
    expected = -np.mean([logits[i].log_softmax(0)[labels[i]].item() for i in range(12)])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == pytest.approx(np.mean([logits[i].argmax().item() == labels[i].item() for i in range(12)]))


def test_local_run_logs_accuracy_and_resumes(fashion_shards, tmp_path):
    tree = tiny_tree(fashion_shards, tmp_path / "run", epochs=2, batch_size=32, max_steps=6)
    trained = pretrain(from_dict(tree), progress=False)
    assert checkpoints.latest_step(tmp_path / "run") == 6
    assert resumed_trainer(tree, trained).step == 6
    row = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"rotation_accuracy"' in row


def test_paper_and_demo_recipes_validate():
    paper = load("configs/rotnet_resnet18.yaml")
    assert paper.method.crop_scale == (0.08, 1.0) and paper.model.backbone == "resnet18"
    assert load("configs/demo_rotnet.yaml").method.crop_size == 28
