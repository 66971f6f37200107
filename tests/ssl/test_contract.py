"""The method contract, through the real Trainer: the frozen last layer stays frozen (weight_g and
weight_v), each recipe trains with its paper's optimizer, learning rate and weight decay (the demos
with theirs), and LARS is the update of its paper."""

import pytest
import torch

from vitrail import ssl
from vitrail.config import from_dict, load
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches
from vitrail.ssl.base import Method
from vitrail.ssl.optim import LARS, OptimizerRecipe

from conftest import tiny_config_tree

HEADS = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 1, "global_crop_size": 28,
         "local_crop_size": 12, "warmup_teacher_temp_epochs": 0}
FROZEN_METHODS = {
    "dino": ({"name": "dino", **HEADS}, "vit_tiny"),
    # a patch last layer of its own, so both last layers are checked
    "ibot": ({"name": "ibot", **HEADS, "patch_out_dim": 48, "shared_head": False}, "vit_tiny"),
    "dinov2": ({"name": "dinov2", **HEADS, "separate_head": True, "ibot_out_dim": 48, "ibot_hidden_dim": 32,
                "ibot_bottleneck_dim": 16}, "dinov2_vits14"),
}
TINY_VIT = {"patch_size": 4, "img_size": 28, "depth": 1, "embed_dim": 24, "num_heads": 2}
FROZEN_STEPS, STEPS = 2, 4  # 20 steps per epoch: freeze_last_layer_epochs 0.1 freezes the first 2


def test_every_registered_method_implements_the_contract():
    for name, (config, method) in ssl.METHODS.items():
        assert issubclass(method, Method), name
        assert isinstance(config.paper_optimizer, OptimizerRecipe) and 0 <= config.paper_drop_path_rate < 1, name


def last_layer_parameters(method) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in method.named_parameters()
            if name.startswith("student.") and "last_layer" in name}


@pytest.mark.parametrize("norm_last_layer", [True, False])
@pytest.mark.parametrize("method", FROZEN_METHODS)
def test_every_last_layer_parameter_is_unchanged_through_the_freeze_steps(fashion_shards, tmp_path, method,
                                                                         norm_last_layer):
    section, backbone = FROZEN_METHODS[method]
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", run={"log_every": 1, "checkpoint_every": 100},
                            eval={"images": False},
                            model={"backbone": backbone, "kwargs": TINY_VIT},
                            optim={"batch_size": 32, "max_steps": STEPS, "warmup_epochs": 0})
    tree["method"] = {**section, "norm_last_layer": norm_last_layer, "freeze_last_layer_epochs": FROZEN_STEPS / 20}
    config = from_dict(tree)
    index = read_index(config.data.shards)
    trainer = Trainer(config, index.num_samples)
    initial = last_layer_parameters(trainer.method)
    # weight_g and weight_v of every weight-normalised last layer (iBOT's and DINOv2's two heads).
    assert len(initial) == (2 if method == "dino" else 4)
    snapshots = {}
    trainer.fit(local_batches(index, trainer.views, 0, config.data.channels, 32),
                report=lambda metrics, step, **_: snapshots.setdefault(step, last_layer_parameters(trainer.method)),
                progress=False)
    assert sorted(snapshots) == list(range(1, STEPS + 1))
    for step in range(1, FROZEN_STEPS + 1):
        for name, value in snapshots[step].items():
            assert torch.equal(value, initial[name]), (step, name)
    # Then they learn: weight_v always, weight_g (the norm) only when it is not fixed at 1.
    for name, value in snapshots[STEPS].items():
        assert torch.equal(value, initial[name]) == (name.endswith("weight_g") and norm_last_layer), name


# A recipe's numbers, written out from the paper (or, for a demo, its config): the optimizer, peak
# learning rate for the global batch, warm-up epochs, final learning rate, weight decay start and end.
PAPER = {
    # DINO Sec. 4 / App.: AdamW, 5e-4 x 1024/256, 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4.
    "configs/dino_vit_small.yaml": (torch.optim.AdamW, 5e-4 * 1024 / 256, 10, 1e-6, 0.04, 0.4),
    # iBOT App. A: DINO's optimizer.
    "configs/ibot_vit_small.yaml": (torch.optim.AdamW, 5e-4 * 1024 / 256, 10, 1e-6, 0.04, 0.4),
    # DINOv2 ssl_default_config.yaml: base_lr 0.004 x sqrt(1024 / 1024).
    "configs/dinov2_vit_small.yaml": (torch.optim.AdamW, 0.004, 10, 1e-6, 0.04, 0.4),
    # BYOL App. C: LARS, 0.2 x 4096/256, 10 warm-up epochs, cosine to 0, weight decay 1.5e-6.
    "configs/byol_resnet50.yaml": (LARS, 0.2 * 4096 / 256, 10, 0.0, 1.5e-6, 1.5e-6),
    # RotNet (official ImageNet config): SGD, 0.01 for 15 epochs (then / 10), weight decay 5e-4.
    "configs/rotnet_resnet18.yaml": (torch.optim.SGD, 0.01, 0, 0.01 * 0.1**3, 5e-4, 5e-4),
    # DeepCluster main.py: SGD, 0.05 constant, weight decay 1e-5.
    "configs/deepcluster_resnet50.yaml": (torch.optim.SGD, 0.05, 0, 0.05, 1e-5, 1e-5),
}
DEMO = {  # every demo: AdamW, 0.002 per 256 images (DINOv2's: per 1024, square root), 0.1 warm-up epochs
    path: (torch.optim.AdamW, peak, 0.1, 1e-6, 0.04, 0.04)
    for path, peak in [("configs/demo.yaml", 0.002 / 4), ("configs/demo_ibot.yaml", 0.002 / 4),
                       ("configs/demo_dinov2.yaml", 0.002 * (64 / 1024) ** 0.5), ("configs/demo_byol.yaml", 0.002 / 4),
                       ("configs/demo_rotnet.yaml", 0.002 / 2), ("configs/demo_deepcluster.yaml", 0.002 / 2)]
}
TINY = {"dinov2": ["model.kwargs={patch_size: 4, img_size: 28, depth: 2, embed_dim: 24, num_heads: 2}"]}
SHRINK = {"dino": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
          "ibot": ["method.out_dim=64", "method.patch_out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
          "dinov2": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
          "byol": ["method.hidden_dim=32", "method.projection_dim=16"],
          "deepcluster": ["method.num_clusters=16"], "rotnet": []}


@pytest.mark.parametrize("path", list(PAPER) + list(DEMO))
def test_each_recipe_trains_with_its_optimizer_learning_rate_and_weight_decay(tmp_path, path):
    optimizer_class, peak, warmup_epochs, final_lr, weight_decay, weight_decay_end = {**PAPER, **DEMO}[path]
    method = load(path).method.name
    # The optimizer and its schedules as the recipe sets them, on a tiny network of the same method.
    tiny_model = TINY.get(method, ["model.backbone=vit_tiny", "model.kwargs={patch_size: 4, img_size: 28, depth: 1, "
                                   "embed_dim: 24, num_heads: 2}"])
    config = load(path, [f"run.dir={tmp_path}", "model.sync_batchnorm=false", *tiny_model, *SHRINK[method]])
    workers = config.ray.workers
    trainer = Trainer(config, num_samples=1_281_167 if path in PAPER else 60_000, world_size=workers)
    assert type(trainer.optimizer) is optimizer_class
    steps = trainer.schedule
    warmup = int(warmup_epochs * steps.steps_per_epoch)

    def at(step):
        trainer.step = step
        logged = trainer.set_schedules()
        groups = trainer.optimizer.param_groups
        for group in groups:
            assert group["lr"] == pytest.approx(logged["lr"] * group["lr_multiplier"], rel=1e-9, abs=1e-15)
            assert group["weight_decay"] == (pytest.approx(logged["weight_decay"]) if group["decay"] else 0.0)
        return logged["lr"], logged["weight_decay"]

    assert at(0) == (pytest.approx(0.0 if warmup else peak), pytest.approx(weight_decay))
    if warmup:
        assert at(warmup // 2)[0] == pytest.approx(peak * (warmup // 2) / warmup)
    assert at(warmup)[0] == pytest.approx(peak)
    assert at(steps.total_steps) == (pytest.approx(final_lr), pytest.approx(weight_decay_end))
    groups = trainer.optimizer.param_groups
    if optimizer_class is LARS:  # BYOL's: momentum 0.9, trust coefficient 1e-3; biases and norms neither decayed nor adapted
        assert all(g["momentum"] == 0.9 and g["trust_coefficient"] == 1e-3 for g in groups)
        assert sorted(g["decay"] for g in groups) == [False, True]
    if optimizer_class is torch.optim.SGD:  # every parameter decayed, as the official code's SGD
        assert all(group["decay"] for group in groups)
        assert [g["nesterov"] for g in groups] == [method == "rotnet"] * len(groups)
        # DeepCluster's classifier has its own SGD without momentum (official main.py).
        assert [g["momentum"] for g in groups] == {"rotnet": [0.9], "deepcluster": [0.9, 0.0]}[method]
    if optimizer_class is torch.optim.SGD and method == "rotnet":
        per_epoch = steps.steps_per_epoch
        assert [at(epoch * per_epoch)[0] for epoch in (14, 15, 30, 45)] == pytest.approx([0.01, 1e-3, 1e-4, 1e-5])


def test_lars_scales_each_decayed_tensor_by_its_trust_ratio_and_leaves_the_others_plain():
    weight, bias = torch.nn.Parameter(torch.tensor([[3.0, 4.0]])), torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [weight], "decay": True, "weight_decay": 0.1},
                      {"params": [bias], "decay": False, "weight_decay": 0.0}], lr=0.5, momentum=0.9,
                     trust_coefficient=1e-3)
    for step in range(2):
        weight.grad, bias.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
        before = weight.detach().clone()
        optimizer.step()
    # By hand: g = grad + 0.1 w; ratio = 1e-3 ||w|| / ||g||; v <- 0.9 v + ratio g; w <- w - 0.5 v.
    w, v = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    b, u = torch.tensor([1.0]), torch.zeros(1)
    for step in range(2):
        g = torch.tensor([[1.0, 0.0]]) + 0.1 * w
        v = 0.9 * v + 1e-3 * w.norm() / g.norm() * g
        w = w - 0.5 * v
        u = 0.9 * u + torch.tensor([2.0])
        b = b - 0.5 * u
    torch.testing.assert_close(weight.detach(), w)
    torch.testing.assert_close(bias.detach(), b)
    assert not torch.equal(weight.detach(), before)
