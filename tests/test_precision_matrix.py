"""Every backbone family x every method that can train it, a few real steps in bf16 autocast and
in fp32: the GPU's default path (bf16) is exercised on any CPU, whatever `auto` would pick here.

One process for the whole matrix, then two DDP workers with `model.sync_batchnorm` for the
backbones that hold BatchNorm (the Ray path of every multi-GPU run).
"""

import json
import math

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from vitrail import backbones, ssl
from vitrail.config import from_dict
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches
from vitrail.ssl.base import Method

from conftest import tiny_config_tree

# Tiny widths, 32-px global and 16-px local crops of 28-px Fashion-MNIST.
FAMILIES = {
    "vit_tiny": {"patch_size": 4, "img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 3},
    "swin_tiny": {"patch_size": 2, "base_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
    "levit_128s": {"img_size": 32, "stage_dims": [32, 48, 64], "key_dim": 8, "num_heads": [2, 2, 2], "depths": [1, 1, 1]},
    "conformer_tiny": {"base_channels": 16, "trans_dim": 48, "num_heads": 3, "depth": 3},
    "mobileformer_26m": {},
    "resnet18": {"small_images": True},
    "dinov2_vits14": {"patch_size": 4, "img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 3},
}
METHODS = {
    "dino": {"name": "dino", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": 2,
             "global_crop_size": 32, "local_crop_size": 16, "warmup_teacher_temp_epochs": 1},
    "ibot": {"name": "ibot", "out_dim": 64, "patch_out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
             "local_crops_number": 2, "global_crop_size": 32, "local_crop_size": 16, "warmup_teacher_temp_epochs": 1,
             # every other image masked, so both halves of the loss run at every step
             "mask_ratios": [0.0, 0.3], "mask_ratio_vars": [0.0, 0.2]},
    "byol": {"name": "byol", "hidden_dim": 32, "projection_dim": 16, "crop_size": 32},
    "deepcluster": {"name": "deepcluster", "num_clusters": 8, "pca_dim": 8, "kmeans_iterations": 2, "crop_size": 32},
    "rotnet": {"name": "rotnet", "crop_size": 32},
    "dinov2": {"name": "dinov2", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": 2,
               "global_crop_size": 32, "local_crop_size": 16, "warmup_teacher_temp_epochs": 1},
}


def trains_with(method: str, backbone: str) -> bool:
    # DINOv2 trains its own ViTs, which the other methods' rows need not repeat (a ViT is there);
    # iBOT replaces masked patch embeddings by a learned token: the backbones that have one.
    if (method == "dinov2") != backbone.startswith("dinov2"):
        return False
    return method != "ibot" or backbones.supports_masking(backbone)


STEPS = 2
CASES = [(method, backbone) for method in METHODS for backbone in FAMILIES if trains_with(method, backbone)]


def has_batchnorm(backbone: str) -> bool:
    model = backbones.create(backbone, **FAMILIES[backbone])
    return any(isinstance(layer, _BatchNorm) for layer in model.modules())


# ResNet-18 has no width to shrink, and a CPU without bf16 instructions runs its bf16 convolutions
# 20x slower than float32 (1.0 s against 19.4 s per batch of 16 at 32 px on an AVX2-only EPYC):
# it trains on 8-px global and 4-px local crops instead (its last stage still sees a 1 x 1 map).
SMALLER_CROPS = {"resnet18": {"global_crop_size": 8, "local_crop_size": 4, "crop_size": 8}}


def case_tree(shards, run_dir, method: str, backbone: str, precision: str, **model) -> dict:
    tree = tiny_config_tree(shards, run_dir, run={"precision": precision, "log_every": 1, "checkpoint_every": 100},
                            model={"backbone": backbone, "kwargs": FAMILIES[backbone], **model},
                            # no warm-up: at a zero learning rate, step 0 would not move LeViT's zero-initialised
                            # residual BatchNorms, and nothing behind them would get a gradient in step 1
                            optim={"batch_size": 8, "max_steps": STEPS, "warmup_epochs": 0})
    crops = SMALLER_CROPS.get(backbone, {})
    tree["method"] = {**METHODS[method], **{key: size for key, size in crops.items() if key in METHODS[method]}}
    return tree


def train_case(tree: dict, rank: int = 0, world_size: int = 1) -> dict:
    """`STEPS` real steps; the logged losses, and which trainable tensors moved and stayed finite."""
    config = from_dict(tree)
    index = read_index(config.data.shards)
    trainer = Trainer(config, index.num_samples, rank, world_size)
    assert trainer.autocast == (config.run.precision == "bf16")
    initial = {name: p.detach().clone() for name, p in trainer.method.named_parameters() if p.requires_grad}
    # Tensors that hold NaN by design until they are known (DeepCluster's NMI before a second clustering).
    unknown = {name for name, value in trainer.method.state_dict().items()
               if value.is_floating_point() and not torch.isfinite(value).all()}
    losses = []
    batches = local_batches(index, config.method.views(), config.run.seed + rank, config.data.channels,
                            config.optim.batch_size)
    trainer.fit(batches, report=lambda metrics, step, **_: losses.append(metrics["loss"]) if "loss" in metrics else None,
                progress=False)
    final = dict(trainer.method.named_parameters())
    return {
        "steps": trainer.step, "losses": losses,
        "moved": [name for name, before in initial.items() if not torch.equal(before, final[name].detach())],
        "trainable": list(initial),
        "not_finite": [name for name, p in trainer.method.state_dict().items()
                       if p.is_floating_point() and not torch.isfinite(p).all() and name not in unknown],
        "running_stats": {name: value.tolist() for name, value in trainer.method.state_dict().items()
                          if name.endswith(".running_mean")},
    }


def check(result: dict, label: str, logs: bool = True) -> None:
    """`logs`: this rank reported its losses (rank 0 alone does under DDP)."""
    assert result["steps"] == STEPS, label
    if logs:
        assert len(result["losses"]) == STEPS and all(math.isfinite(loss) for loss in result["losses"]), (label, result["losses"])
    assert not result["not_finite"], (label, result["not_finite"][:5])
    # Every trainable tensor takes a step, except those the recipe holds back at first (DINO's and
    # iBOT's last layer in its frozen first epoch; a backbone's parameters a crop this small skips).
    assert len(result["moved"]) >= 0.9 * len(result["trainable"]), (label, sorted(set(result["trainable"]) - set(result["moved"]))[:8])


def test_the_matrix_trains_every_registered_method_through_the_contract():
    assert set(METHODS) == set(ssl.METHODS)
    assert all(issubclass(method, Method) for _, method in ssl.METHODS.values())


# bf16 that a CPU without bf16 instructions emulates at ~20x the cost of fp32 (ResNet-18's and
# Mobile-Former's convolutions: 20-45 s a row on an AVX2-only EPYC) runs for one method per family;
# every method trains these families in fp32, and every family's other bf16 rows are fast.
EMULATED_BF16_ONCE = {"resnet18": "rotnet", "mobileformer_26m": "rotnet"}
PRECISION_CASES = [(method, backbone, precision) for method, backbone in CASES for precision in ("fp32", "bf16")
                   if precision == "fp32" or EMULATED_BF16_ONCE.get(backbone, method) == method]


@pytest.mark.parametrize("method, backbone, precision", PRECISION_CASES, ids=["-".join(case) for case in PRECISION_CASES])
def test_every_method_and_backbone_trains_in_both_precisions(fashion_shards, tmp_path, method, backbone, precision):
    check(train_case(case_tree(fashion_shards, tmp_path / "run", method, backbone, precision)), f"{method}/{backbone}/{precision}")


def test_two_workers_with_sync_batchnorm_in_both_precisions(ray_cluster, fashion_shards, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vitrail import checkpoints

    # The workers cannot import this test module: its functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Every BatchNorm family, each with another method, so that the four methods that train them
    # all run synchronised too (every pair runs in one process above; all 32 pairs under DDP took
    # 3 minutes).
    batchnorm_families = [backbone for backbone in FAMILIES if has_batchnorm(backbone)]
    assert batchnorm_families == ["levit_128s", "conformer_tiny", "mobileformer_26m", "resnet18"]
    methods = [method for method in METHODS if all(trains_with(method, backbone) for backbone in batchnorm_families)]
    # In fp32, and in bf16 where it is not emulated slowly (SyncBatchNorm's bf16 path is one for all).
    cases = [(method, backbone, precision) for method, backbone in zip(methods, batchnorm_families)
             for precision in ("fp32", "bf16") if precision == "fp32" or backbone not in EMULATED_BF16_ONCE]

    def train_all(trees):
        import ray.train

        context = ray.train.get_context()
        rank = context.get_world_rank()
        results = {label: train_case(tree, rank, context.get_world_size()) for label, tree in trees.items()}
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(results))

    trees = {f"{m}/{b}/{p}": case_tree(fashion_shards, tmp_path / f"{m}-{b}-{p}", m, b, p, sync_batchnorm=True)
             for m, b, p in cases}
    # The control: the same ResNet-18 run without model.sync_batchnorm.
    plain = "rotnet/resnet18/fp32 without sync_batchnorm"
    trees[plain] = case_tree(fashion_shards, tmp_path / "plain", "rotnet", "resnet18", "fp32", sync_batchnorm=False)
    TorchTrainer(train_all, train_loop_config=trees,
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for label in trees:
        for rank, results in enumerate(ranks):
            check(results[label], f"{label} rank {rank}", logs=rank == 0)
    for label in [f"{m}/{b}/{p}" for m, b, p in cases]:
        # Each rank saw other images, yet both hold the same BatchNorm statistics: synchronised.
        assert ranks[0][label]["running_stats"] and ranks[0][label]["running_stats"] == ranks[1][label]["running_stats"], label
    # Without it, each rank ends on its own batch's statistics (rank 0's reach the others only at the next forward).
    assert len(ranks[0][plain]["running_stats"]) == 20  # ResNet-18's 20 BN layers
    assert not any(ranks[0][plain]["running_stats"][key] == ranks[1][plain]["running_stats"][key]
                   for key in ranks[0][plain]["running_stats"])
    # The synchronised run's checkpoint loads into the one-process trainer: SyncBatchNorm keeps BatchNorm's keys.
    synced = "rotnet/resnet18/fp32"
    local = Trainer(from_dict(trees[synced]), read_index(trees[synced]["data"]["shards"]).num_samples)
    local.restore(checkpoints.load(trees[synced]["run"]["dir"]))
    restored = {name: value.tolist() for name, value in local.method.state_dict().items() if name.endswith(".running_mean")}
    assert restored == ranks[0][synced]["running_stats"]
