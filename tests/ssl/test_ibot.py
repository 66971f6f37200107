"""iBOT: the masked patch loss against its formula, the mask ratio distribution, ViT and Swin
forwards, a local run that resumes with both centres."""

import pytest
import torch

from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.pipelines.views import BlockMasking, Views
from vitrail.ssl.ibot import IBOT, IBOTConfig, MaskedPatchLoss

from conftest import resumed_trainer, tiny_config_tree

TINY_HEAD = {"out_dim": 64, "patch_out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32}


def tiny_tree(shards, run_dir, **optim):
    tree = tiny_config_tree(shards, run_dir, optim=optim)
    tree["method"] = {"name": "ibot", **TINY_HEAD, "local_crops_number": 2, "global_crop_size": 28,
                      "local_crop_size": 14, "warmup_teacher_temp_epochs": 1}
    return tree


def test_patch_loss_is_masked_cross_entropy_averaged_per_image():
    generator = torch.Generator().manual_seed(0)
    loss_fn = MaskedPatchLoss(8, student_temp=0.1, center_momentum=0.9)
    center = torch.randn(1, 8, generator=generator)
    loss_fn.center.copy_(center)
    student = [torch.randn(3, 5, 8, generator=generator) for _ in range(2)]
    teacher = [torch.randn(3, 5, 8, generator=generator) for _ in range(2)]
    masks = [torch.rand(3, 5, generator=generator) < 0.5 for _ in range(2)]
    masks[0][1] = False  # an unmasked image contributes 0 to its view's mean
    views = []
    for s, t, m in zip(student, teacher, masks):
        per_image = []
        for b in range(3):
            terms = [-(torch.softmax((t[b, n] - center[0]) / 0.04, 0) * torch.log_softmax(s[b, n] / 0.1, 0)).sum()
                     for n in range(5) if m[b, n]]
            per_image.append(sum(terms) / max(1, len(terms)) if terms else torch.tensor(0.0))
        views.append(torch.stack(per_image).mean())
    torch.testing.assert_close(loss_fn(student, teacher, masks, teacher_temp=0.04), torch.stack(views).mean())
    patch_mean = torch.cat([t.mean(dim=1) for t in teacher]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * patch_mean)


def test_masks_follow_the_requested_ratio_distribution():
    masks = BlockMasking()(1000, 14, 14, torch.Generator().manual_seed(0))
    ratios = masks.float().mean(dim=(1, 2))
    masked = ratios[ratios > 0]
    # Half the images unmasked, the other half with a ratio drawn from U(0.1, 0.5); blocks stop
    # short of the drawn ratio rather than pass it, so the realised ones sit a little lower.
    assert 0.45 < (ratios == 0).float().mean() < 0.55
    assert masked.max() <= 0.5 and masked.min() >= 0.05
    assert 0.26 < masked.mean() < 0.31
    assert 0.08 < masked.std() < 0.13  # U(0.1, 0.5) has std 0.115


@pytest.mark.parametrize("backbone, kwargs, crop", [
    ("vit_tiny", {"patch_size": 4, "img_size": 16, "depth": 1, "embed_dim": 24, "num_heads": 2}, 16),
    ("swin_tiny", {"patch_size": 2, "base_dim": 8, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}, 16),
])
def test_forward_on_vit_and_swin_adds_cls_and_patch_losses(backbone, kwargs, crop):
    config = IBOTConfig(**TINY_HEAD, shared_head=False, global_crop_size=crop, local_crops_number=1,
                        warmup_teacher_temp_epochs=0, mask_ratios=(0.3,), mask_ratio_vars=(0.2,))
    ibot = IBOT(config, backbone, {"in_chans": 1, **kwargs}, steps_per_epoch=4, total_steps=8, drop_path_rate=0.0)
    views = [torch.randn(3, 1, crop, crop), torch.randn(3, 1, crop, crop), torch.randn(3, 1, 8, 8)]
    loss, metrics = ibot(Views(views), step=0)
    loss.backward()
    assert loss.item() == pytest.approx(metrics["loss_cls"].item() + metrics["loss_patch"].item(), rel=1e-5)
    assert metrics["loss_patch"] > 0 and metrics["mask_ratio"] > 0
    assert ibot.student.backbone.mask_token.grad is not None
    assert ibot.patch_loss.center.abs().sum() > 0 and ibot.loss.center.abs().sum() > 0


def test_backbones_without_a_mask_token_are_refused():
    with pytest.raises(VitrailError, match="iBOT needs a token backbone"):
        IBOT(IBOTConfig(**TINY_HEAD), "resnet18", {"in_chans": 1}, steps_per_epoch=1, total_steps=1, drop_path_rate=0.0)


def test_local_run_resumes_with_centres_and_mask_seed(fashion_shards, tmp_path):
    tree = tiny_tree(fashion_shards, tmp_path / "run", epochs=2, batch_size=32, max_steps=6)
    trained = pretrain(from_dict(tree), progress=False)
    assert checkpoints.latest_step(tmp_path / "run") == 6
    state = checkpoints.load(tmp_path / "run")["method"]
    assert state["patch_loss.center"].abs().sum() > 0 and "mask_seed" in state
    fresh = resumed_trainer(tree, trained)
    torch.testing.assert_close(fresh.method.draw_masks(4, step=7), trained.method.draw_masks(4, step=7))


def test_paper_and_demo_recipes_validate():
    paper = load("configs/ibot_vit_small.yaml")
    assert paper.method == IBOTConfig()  # every paper value is the default
    assert load("configs/demo_ibot.yaml").method.global_crop_size == 28
