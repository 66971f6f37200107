"""DINO per wall-second: vitrail's demo against a timm + lightly reference, same budget, same seeds.

    python benchmarks/reference_dino.py [--seeds 0 1 2] [--precisions fp32 auto]
        [--train-shards data/fashion-mnist/train] [--test-shards data/fashion-mnist/test]

For each seed: vitrail trains `configs/demo.yaml` in this process (`vitrail pretrain --local`,
online k-NN and tracking off) for its 500 steps, in each of `--precisions`; the reference then
trains for the wall time vitrail's fp32 run took, and stops at the first step past it. Both
teachers are scored by the same weighted k-NN (k = 20, T = 0.07; the 60,000 training images are
the bank, the 10,000 test images the queries, 28 px, no crop), vitrail's extraction over the
same shards.

The reference is the demo's recipe built from other people's parts: timm's ViT-Tiny cut to the
demo's shape (image size, patch size, channels and depth from the config), lightly's `DINOTransform`,
`DINOProjectionHead` and `DINOLoss`, and DINO's training loop as main_dino.py runs it (AdamW with
biases and norms undecayed, linear warm-up then cosine learning rate, per-tensor gradient clip,
last layer frozen for the first epoch, cosine teacher momentum). One process, fp32, 2 torch
threads, one DataLoader worker for the views (PIL, as lightly makes them).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time

import numpy as np
import timm
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn

from vitrail.config import load
from vitrail.eval.features import extract
from vitrail.eval.knn import knn_classify
from vitrail.launch.local import pretrain
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform
from vitrail.precision import uses_bf16

CONFIG = "configs/demo.yaml"
THREADS = 2


def knn_top1(backbone: nn.Module, normalization, train_shards: str, test_shards: str) -> float:
    backbone.eval()
    transform = EvalTransform(28, 28)
    bank = extract(backbone, read_index(train_shards), transform, normalization)
    queries = extract(backbone, read_index(test_shards), transform, normalization)
    return knn_classify(*bank, *queries, k=20, temperature=0.07)["top1"]


def train_vitrail(seed: int, precision: str, train_shards: str, overrides: tuple[str, ...] = ()):
    """(teacher backbone, config, wall seconds, steps) of the demo's run, `overrides` on top."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = load(CONFIG, [f"data.shards={train_shards}", f"run.dir={run_dir}", f"run.seed={seed}",
                               f"run.precision={precision}", "run.tracking=none", "eval.knn_every=0", *overrides])
        torch.set_num_threads(THREADS)
        started = time.perf_counter()
        trainer = pretrain(config, progress=False)
        seconds = time.perf_counter() - started
    return trainer.method.backbone_for_eval(), config, seconds, trainer.step


class FashionMNISTViews(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.images, _ = load_fashion_mnist("train")
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index], mode="L"))


def clip_per_tensor(model: nn.Module, clip: float) -> None:
    """DINO's utils.clip_gradients: each parameter's gradient scaled to norm <= clip on its own."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            norm = parameter.grad.norm(2)
            scale = clip / (norm + 1e-6)
            if scale < 1:
                parameter.grad.mul_(scale)


def reference_transform(config) -> DINOTransform:
    """lightly's DINO views with the config's crops, blur and normalisation."""
    method, data = config.method, config.data
    return DINOTransform(global_crop_size=method.global_crop_size, global_crop_scale=tuple(method.global_crops_scale),
                         local_crop_size=method.local_crop_size, local_crop_scale=tuple(method.local_crops_scale),
                         n_local_views=method.local_crops_number, sigmas=tuple(method.blur_sigma),
                         normalize={"mean": list(data.mean), "std": list(data.std)})


def reference_network(config) -> nn.ModuleDict:
    """timm's ViT-Tiny cut to the config's shape (image size, patch size, channels, depth) and lightly's head."""
    shape, method = config.model.kwargs, config.method
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                 img_size=shape["img_size"], patch_size=shape["patch_size"],
                                 in_chans=config.data.channels, depth=shape["depth"],
                                 drop_path_rate=config.model.drop_path_rate, dynamic_img_size=True)
    head = DINOProjectionHead(backbone.embed_dim, method.hidden_dim, method.bottleneck_dim, method.out_dim,
                              batch_norm=False, freeze_last_layer=1, norm_last_layer=True)
    return nn.ModuleDict({"backbone": backbone, "head": head})


def reference_lr(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """main_dino.py's learning rate: linear warm-up from 0, then a cosine from `lr` to `min_lr`."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def train_reference(seed: int, budget_seconds: float, config):
    """(teacher backbone, wall seconds, steps) of the reference trained for `budget_seconds`."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    method, optim = config.method, config.optim
    views = torch.utils.data.DataLoader(FashionMNISTViews(reference_transform(config)), batch_size=optim.batch_size, shuffle=True,
                                        drop_last=True, num_workers=1, persistent_workers=True,
                                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(views)
    total_steps = steps_per_epoch * optim.epochs
    warmup_steps = int(optim.warmup_epochs * steps_per_epoch)
    lr = optim.lr * optim.batch_size / 256

    student = reference_network(config)
    # A second build, not a deepcopy: torch cannot deepcopy the head's weight-normed last layer.
    teacher = reference_network(config).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    criterion = DINOLoss(output_dim=method.out_dim, warmup_teacher_temp=method.teacher_temp,
                         teacher_temp=method.teacher_temp, warmup_teacher_temp_epochs=0, student_temp=method.student_temp,
                         center_momentum=method.center_momentum)
    decayed = [p for p in student.parameters() if p.ndim > 1]
    undecayed = [p for p in student.parameters() if p.ndim <= 1]  # biases and norms, as main_dino.py
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": optim.weight_decay},
                                   {"params": undecayed, "weight_decay": 0.0}], lr=lr)

    def embed(network, crops):
        # Crops of one size go through the backbone together, as DINO's MultiCropWrapper does.
        outputs = []
        for size in dict.fromkeys(crop.shape[-1] for crop in crops):
            same = [crop for crop in crops if crop.shape[-1] == size]
            outputs.extend(network["head"](network["backbone"](torch.cat(same))).chunk(len(same)))
        return outputs

    step, epoch = 0, 0
    while time.perf_counter() - started < budget_seconds:
        for crops in views:
            if time.perf_counter() - started >= budget_seconds:
                break
            step_lr = reference_lr(step, lr, optim.min_lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            with torch.no_grad():
                teacher_out = embed(teacher, crops[:2])
            loss = criterion(teacher_out=teacher_out, student_out=embed(student, crops), epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_per_tensor(student, optim.clip_grad)
            student["head"].cancel_last_layer_gradients(epoch)
            optimizer.step()
            update_momentum(student, teacher, cosine_schedule(step, total_steps, method.momentum_teacher, 1.0))
            step += 1
        epoch += 1
    return teacher["backbone"], time.perf_counter() - started, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--train-shards", default="data/fashion-mnist/train")
    parser.add_argument("--test-shards", default="data/fashion-mnist/test")
    args = parser.parse_args()
    # `auto` is fp32 on a CPU without AMX: then the fp32 runs are also the default-precision runs.
    precisions = list(dict.fromkeys("bf16" if p == "auto" and uses_bf16("auto", torch.device("cpu")) else
                                    "fp32" if p == "auto" else p for p in args.precisions))
    print(f"precisions run: {precisions} (auto = {'bf16' if 'bf16' in precisions else 'fp32'} on this CPU)")
    scores: dict[str, list[float]] = {}
    for seed in args.seeds:
        budget = None
        for precision in precisions:
            backbone, config, seconds, steps = train_vitrail(seed, precision, args.train_shards)
            top1 = knn_top1(backbone, config.data.normalization, args.train_shards, args.test_shards)
            scores.setdefault(f"vitrail {precision}", []).append(top1)
            budget = seconds if precision == "fp32" else budget
            print(f"seed {seed} vitrail {precision}: {steps} steps in {seconds:.0f} s, k-NN {top1:.2f}", flush=True)
        backbone, seconds, steps = train_reference(seed, budget or seconds, config)
        top1 = knn_top1(backbone, config.data.normalization, args.train_shards, args.test_shards)
        scores.setdefault("reference (timm + lightly), fp32", []).append(top1)
        print(f"seed {seed} reference: {steps} steps in {seconds:.0f} s, k-NN {top1:.2f}", flush=True)

    print("\n| run | seeds | k-NN top-1 (k=20), mean ± std | per seed |\n|---|---|---|---|")
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {len(values)} | {statistics.mean(values):.2f} ± {spread:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
