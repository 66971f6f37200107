"""DINOv2: KoLeo and Sinkhorn-Knopp against hand-computed values, Sinkhorn-Knopp over two gloo
workers, the masks and the positions the iBOT loss is taken over, the optimizer's groups, and a
few real training steps through the local launcher."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitrail.errors import VitrailError
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.pipelines.views import Views
from vitrail.ssl.dinov2 import DINOv2, DINOv2Config, KoLeoLoss, sinkhorn_knopp

from conftest import tiny_config_tree

TINY_HEADS = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
              "ibot_out_dim": 48, "ibot_hidden_dim": 32, "ibot_bottleneck_dim": 16}
TINY_VIT = {"in_chans": 1, "patch_size": 4, "img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3}


def tiny_dinov2(**config) -> DINOv2:
    settings = {**TINY_HEADS, "global_crop_size": 28, "local_crop_size": 12, "local_crops_number": 2,
                "warmup_teacher_temp_epochs": 0, **config}
    return DINOv2(DINOv2Config(**settings), "dinov2_vits14", TINY_VIT, steps_per_epoch=4, total_steps=8,
                  drop_path_rate=0.0)


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_neighbour():
    # On the unit circle (the loss normalises (3, 4) to (0.6, 0.8)): the nearest neighbour of
    # (1, 0) is (0.6, 0.8) at sqrt(0.8), and vice versa; that of (-1, 0) is (0.6, 0.8), at sqrt(3.2).
    points = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-1.0, 0.0]])
    expected = -(math.log(math.sqrt(0.8)) * 2 + math.log(math.sqrt(3.2))) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, rel=1e-5)


def test_sinkhorn_knopp_one_iteration_by_hand():
    # Q = exp(logits).T = [[1, 3], [1, 1]] (prototypes x samples), total 6. Prototype rows scaled to
    # 1/2 each: [[1/8, 3/8], [1/4, 1/4]]; sample columns to 1/2 each: [[1/6, 3/10], [1/3, 1/5]];
    # times B = 2, transposed: sample 0 -> (1/3, 2/3), sample 1 -> (3/5, 2/5).
    logits = torch.log(torch.tensor([[1.0, 1.0], [3.0, 1.0]]))
    torch.testing.assert_close(sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=1),
                               torch.tensor([[1 / 3, 2 / 3], [3 / 5, 2 / 5]]))
    # A balanced matrix is left as its row-normalised self, and the temperature sharpens it.
    balanced = torch.log(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(sinkhorn_knopp(balanced, teacher_temp=0.5),
                               torch.tensor([[0.8, 0.2], [0.2, 0.8]]))


def _logits():
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(0))  # B = 12 samples, K = 6 prototypes


def test_sinkhorn_knopp_rows_are_distributions_and_prototypes_share_the_mass():
    targets = sinkhorn_knopp(_logits(), teacher_temp=0.5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(12))
    # Three iterations bring each prototype near B / K = 2, far nearer than the softmax; more converge to it.
    assert torch.allclose(targets.sum(dim=0), torch.full((6,), 2.0), atol=0.25)
    softmax_spread = (torch.softmax(_logits() / 0.5, dim=1).sum(dim=0) - 2).abs().max()
    assert (targets.sum(dim=0) - 2).abs().max() < softmax_spread / 4
    converged = sinkhorn_knopp(_logits(), teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 2.0), rtol=1e-4, atol=1e-4)


def _sinkhorn_rank(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        targets = sinkhorn_knopp(_logits()[rank * 6:rank * 6 + 6], teacher_temp=0.5)
        column_sums = targets.sum(dim=0)
        dist.all_reduce(column_sums)
        torch.save({"targets": targets, "column_sums": column_sums}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_over_two_workers_equals_one_worker_on_the_whole_batch(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Forked, not spawned: a spawned process would spend most of the test importing vitrail.ssl again.
    mp.start_processes(_sinkhorn_rank, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    whole = sinkhorn_knopp(_logits(), teacher_temp=0.5)
    torch.testing.assert_close(torch.cat([rank["targets"] for rank in ranks]), whole)
    torch.testing.assert_close(ranks[0]["targets"].sum(dim=1), torch.ones(6))
    torch.testing.assert_close(ranks[0]["column_sums"], whole.sum(dim=0))
    assert torch.allclose(ranks[0]["column_sums"], torch.full((6,), 2.0), atol=0.25)


def test_masks_cover_half_the_crops_with_ratios_spread_over_the_range():
    model = tiny_dinov2()
    model.mask_grid = 16  # a 224-px crop of 14-px patches
    masks = model.draw_masks(200, step=0)  # (200, 256)
    ratios = masks.float().mean(dim=1)
    masked = ratios[ratios > 0]
    assert masks.shape == (200, 256) and len(masked) == 100
    # Ratio i is drawn from the i-th of 100 equal slices of (0.1, 0.5); blocks stop short rather
    # than overshoot, so each realised ratio is at most its slice's top.
    assert masked.max() <= 0.5 and masked.min() >= 0.04
    assert 0.25 < masked.mean() < 0.31
    assert not torch.equal(masks, model.draw_masks(200, step=1))
    torch.testing.assert_close(masks, model.draw_masks(200, step=0))


def test_the_ibot_loss_is_taken_over_exactly_the_masked_positions():
    model = tiny_dinov2(separate_head=True, centering="sinkhorn_knopp")  # no centre moving between the two calls
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 49, generator=generator) < 0.3
    masks[2] = False  # an unmasked crop
    student = torch.randn(4, 49, 48, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 49, 48, generator=generator)
    loss = model.patch_loss(student, teacher, masks, temperature=0.07)
    loss.backward()
    assert torch.equal(student.grad.abs().sum(dim=-1) > 0, masks)
    # The teacher's tokens at unmasked positions play no part.
    changed = torch.where(masks.unsqueeze(-1), teacher, torch.randn(4, 49, 48, generator=generator))
    assert model.patch_loss(student, changed, masks, temperature=0.07).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("separate_head, centering", [(False, "centering"), (True, "sinkhorn_knopp")])
def test_forward_sums_the_weighted_dino_koleo_and_ibot_terms(separate_head, centering):
    model = tiny_dinov2(separate_head=separate_head, centering=centering)
    views = [torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.randn(3, 1, 12, 12), torch.randn(3, 1, 12, 12)]
    loss, metrics = model(Views(views), step=0)
    loss.backward()
    assert loss.item() == pytest.approx(
        metrics["loss_dino"].item() + 0.1 * metrics["loss_koleo"].item() + metrics["loss_ibot"].item(), rel=1e-5)
    assert metrics["mask_ratio"] > 0 and metrics["loss_ibot"] > 0
    assert model.student.backbone.mask_token.grad is not None
    assert ("ibot_head" in model.student) == separate_head
    # The last layer is frozen in the first epoch (step 0 of 4 per epoch): its gradients are cancelled.
    last_layer = model.student.dino_head.last_layer
    assert last_layer.weight_v.grad is not None and last_layer.weight_g.grad is not None
    model.after_backward(step=0)
    assert last_layer.weight_v.grad is None and last_layer.weight_g.grad is None
    centres_moved = model.cls_center.center.abs().sum() > 0 and model.patch_center.center.abs().sum() > 0
    assert centres_moved == (centering == "centering")


def test_parameter_groups_decay_the_lr_per_block_and_spare_biases_norms_and_gammas():
    model = tiny_dinov2()  # 2 blocks
    multiplier, decays = {}, {}
    for group in model.parameter_groups():
        for parameter in group["params"]:
            multiplier[id(parameter)], decays[id(parameter)] = group["lr_multiplier"], group["decay"]
    named = dict(model.student.named_parameters())
    expected = {"backbone.patch_embed.proj.weight": 0.9**3 * 0.2, "backbone.cls_token": 0.9**3,
                "backbone.blocks.0.attn.qkv.weight": 0.9**2, "backbone.blocks.1.mlp.fc1.weight": 0.9,
                "backbone.norm.weight": 1.0, "dino_head.mlp.0.weight": 1.0, "dino_head.last_layer.weight_v": 1.0}
    for name, value in expected.items():
        assert multiplier[id(named[name])] == pytest.approx(value), name
    for name, parameter in named.items():
        assert decays[id(parameter)] == (not (name.endswith(".bias") or "norm" in name or "gamma" in name)), name
    assert set(multiplier) == {id(p) for p in model.student.parameters()}  # every student parameter, no teacher one
    assert DINOv2Config.paper_optimizer.lr_scaling == "sqrt_1024"


def test_other_backbones_are_refused_naming_the_key():
    with pytest.raises(VitrailError, match="model.backbone='vit_small': DINOv2 trains the DINOv2 ViTs"):
        DINOv2(DINOv2Config(**TINY_HEADS), "vit_small", {}, steps_per_epoch=1, total_steps=1, drop_path_rate=0.0)


def test_local_training_steps_move_the_student_with_per_group_learning_rates(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"precision": "fp32"},
                            model={"backbone": "dinov2_vits14", "drop_path_rate": 0.3, "kwargs": TINY_VIT},
                            optim={"epochs": 1, "batch_size": 32, "max_steps": 6, "lr": 0.004, "warmup_epochs": 0})
    tree["model"]["kwargs"] = {key: value for key, value in TINY_VIT.items() if key != "in_chans"}
    tree["method"] = {"name": "dinov2", **TINY_HEADS, "local_crops_number": 2, "global_crop_size": 28,
                      "local_crop_size": 12, "separate_head": True, "centering": "sinkhorn_knopp",
                      "freeze_last_layer_epochs": 0}
    config = from_dict(tree)
    torch.manual_seed(config.run.seed)  # the trainer's initial weights
    initial = DINOv2(config.method, "dinov2_vits14", {"in_chans": 1, **tree["model"]["kwargs"]}, 20, 20, 0.3).state_dict()
    trainer = pretrain(config, progress=False)
    assert trainer.step == 6
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row[key]) for row in logged for key in ("loss", "loss_dino", "loss_koleo", "loss_ibot"))
    trained = trainer.method.state_dict()
    for key in ("student.backbone.patch_embed.proj.weight", "student.backbone.blocks.1.ls2.gamma",
                "student.ibot_head.last_layer.weight_v", "teacher.backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(initial[key], trained[key]), key
    # Square-root scaling from a batch of 1024, then each group's multiplier.
    peak = 0.004 * math.sqrt(32 / 1024)
    assert logged[0]["lr"] <= peak
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(logged[-1]["lr"] * group["lr_multiplier"])


# dinov2/configs/ssl_default_config.yaml, key by key.
OFFICIAL_DEFAULTS = {
    "out_dim": 65536, "bottleneck_dim": 256, "head_layers": 3, "hidden_dim": 2048, "koleo_loss_weight": 0.1,
    "dino_loss_weight": 1.0, "ibot_loss_weight": 1.0, "mask_probability": 0.5, "mask_ratio_range": (0.1, 0.5),
    "separate_head": False, "ibot_out_dim": 65536, "ibot_bottleneck_dim": 256, "ibot_head_layers": 3,
    "ibot_hidden_dim": 2048, "centering": "centering", "momentum_teacher": 0.992, "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30, "freeze_last_layer_epochs": 1, "layerwise_decay": 0.9,
    "patch_embed_lr_mult": 0.2, "global_crops_scale": (0.32, 1.0), "local_crops_number": 8,
    "local_crops_scale": (0.05, 0.32), "global_crop_size": 224, "local_crop_size": 96,
}


def test_defaults_are_the_official_ones_and_the_recipes_validate():
    defaults = DINOv2Config()
    assert {key: getattr(defaults, key) for key in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    small = load("configs/dinov2_vit_small.yaml")
    assert small.method == DINOv2Config(local_crop_size=98)  # 98: 7 patches of 14 px
    assert (small.model.backbone, small.model.drop_path_rate, small.optim.lr) == ("dinov2_vits14", 0.3, 0.004)
    large = load("configs/dinov2_vit_large.yaml")  # official train/vitl14.yaml
    assert (large.method.centering, large.method.separate_head, large.method.out_dim) == ("sinkhorn_knopp", True, 131072)
    assert (large.model.kwargs["ffn"], large.optim.epochs, large.optim.lr) == ("swiglu", 500, 2e-4)
    demo = load("configs/demo_dinov2.yaml")
    assert demo.method.name == "dinov2" and demo.data.channels == 1
