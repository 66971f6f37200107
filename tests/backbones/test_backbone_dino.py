"""DINO trains with every backbone family: two real optimizer steps through the local launcher."""

import math

import pytest

from vitrail.launch import checkpoints
from vitrail.launch.config import from_dict
from vitrail.launch.local import pretrain

from conftest import tiny_config_tree

# Small-image settings per family (32-px global and 16-px local crops of 28-px Fashion-MNIST).
FAMILIES = [
    ("vit_tiny", {"patch_size": 4, "img_size": 32, "depth": 2}),
    ("swin_tiny", {"patch_size": 2, "depths": [2, 2, 2, 2]}),
    ("levit_128s", {"img_size": 32}),
    ("conformer_tiny", {}),
    ("mobileformer_26m", {}),
    ("resnet18", {"small_images": True}),
]


@pytest.mark.parametrize("backbone, kwargs", FAMILIES, ids=[name for name, _ in FAMILIES])
def test_two_dino_steps(fashion_shards, tmp_path, backbone, kwargs):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"log_every": 1},
                            model={"backbone": backbone, "kwargs": kwargs},
                            method={"global_crop_size": 32, "local_crop_size": 16},
                            optim={"batch_size": 8, "max_steps": 2})
    trainer = pretrain(from_dict(tree), progress=False)
    assert trainer.step == 2 and checkpoints.latest_step(run_dir) == 2
    teacher = trainer.method.backbone_for_eval()
    student = trainer.method.student.backbone
    # The student took optimizer steps and the teacher followed by EMA: they now differ.
    moved = [not (s - t).abs().max().item() == 0 for s, t in zip(student.parameters(), teacher.parameters())]
    assert any(moved)
    assert math.isfinite(trainer.method.loss.center.sum().item())
