"""BYOL: the regression loss against its formula, the EMA target, a local run that resumes."""

import pytest
import torch

from vitrail import checkpoints
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.pipelines.views import Views
from vitrail.ssl.byol import BYOL, BYOLConfig, regression_loss

from conftest import resumed_trainer, tiny_config_tree


def tiny_tree(shards, run_dir, **optim):
    tree = tiny_config_tree(shards, run_dir, optim=optim)
    tree["method"] = {"name": "byol", "hidden_dim": 64, "projection_dim": 16, "crop_size": 28}
    return tree


def test_regression_loss_is_two_minus_twice_the_cosine():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 6, 16, generator=generator)
    expected = torch.stack([2 - 2 * (p @ z) / (p.norm() * z.norm()) for p, z in zip(prediction, target)]).mean()
    torch.testing.assert_close(regression_loss(prediction, target), expected)


def test_loss_is_symmetrised_and_target_follows_the_ema():
    config = BYOLConfig(hidden_dim=32, projection_dim=8, momentum_target=0.9)
    byol = BYOL(config, "resnet18", {"in_chans": 1, "small_images": True}, steps_per_epoch=10, total_steps=10, drop_path_rate=0.0)
    generator = torch.Generator().manual_seed(0)
    views = list(torch.randn(2, 4, 1, 8, 8, generator=generator))
    loss, metrics = byol(Views(views), step=0)
    both = torch.cat(views)
    with torch.no_grad():
        p1, p2 = byol.predictor(byol.online(both)).chunk(2)
        z1, z2 = byol.target(both).chunk(2)
    expected = regression_loss(p1, z2) + regression_loss(p2, z1)
    torch.testing.assert_close(loss, expected)
    assert metrics["cosine_similarity"].item() == pytest.approx(1 - expected.item() / 4)

    online_before = [p.detach().clone() for p in byol.online.parameters()]
    target_before = [p.detach().clone() for p in byol.target.parameters()]
    for parameter in byol.online.parameters():
        parameter.data.add_(1.0)
    assert byol.after_step(0)["momentum"] == pytest.approx(0.9)
    for target, old_target, old_online in zip(byol.target.parameters(), target_before, online_before):
        torch.testing.assert_close(target, 0.9 * old_target + 0.1 * (old_online + 1.0))
    assert byol.backbone_for_eval() is byol.online[0]


def test_local_run_resumes_with_target_and_optimizer(fashion_shards, tmp_path):
    tree = tiny_tree(fashion_shards, tmp_path / "run", epochs=2, batch_size=32, max_steps=6)
    trained = pretrain(from_dict(tree), progress=False)
    assert checkpoints.latest_step(tmp_path / "run") == 6
    resumed_trainer(tree, trained)
    assert not torch.equal(trained.method.online[0].pos_embed, trained.method.target[0].pos_embed)
    row = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"cosine_similarity"' in row and '"momentum"' in row


def test_paper_and_demo_recipes_validate():
    paper = load("configs/byol_resnet50.yaml")
    assert (paper.method.hidden_dim, paper.method.projection_dim, paper.method.momentum_target) == (4096, 256, 0.99)
    assert paper.method == BYOLConfig()  # every paper value is the default
    assert load("configs/demo_byol.yaml").method.crop_size == 28
