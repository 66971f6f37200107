"""Where vitrail's DINO and the timm + lightly reference (benchmarks/reference_dino.py) could part,
factor by factor, without training: the same inputs through both sides of each.

    python benchmarks/dino_ablations.py [--images 2048]

- loss numerics: vitrail's DINOLoss and lightly's on the same student and teacher outputs
  (the demo's 2 + 4 views, batch 64, K = 1024), 50 steps, centre carried along;
- schedules: learning rate, weight decay and teacher momentum at every step of the demo's run,
  vitrail's against the reference's (DINO's formulas as main_dino.py writes them, lightly's
  `cosine_schedule` for the momentum);
- initialisation: each parameter family's standard deviation in vitrail's ViT and DINO head
  against timm's ViT and lightly's DINOProjectionHead, both built to the demo's shape;
- views: `--images` Fashion-MNIST images through vitrail's MultiCrop and lightly's
  DINOTransform with the demo's crops: per view slot the mean and spread of the normalised
  pixels, and how far apart the two global views of one image are (the task's difficulty).

The EMA order needs no run: both step the optimizer, then move the teacher with the step's
momentum (vitrail's `Trainer`: `optimizer.step()` then `method.after_step`; main_dino.py and the
reference alike).
"""

from __future__ import annotations

import argparse
import numpy as np
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from reference_dino import reference_lr, reference_network, reference_transform

from vitrail import backbones
from vitrail.config import load
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.ssl.dino import DINOLoss
from vitrail.ssl.heads import DINOHead
from vitrail.ssl.schedules import cosine

CONFIG = "configs/demo.yaml"


def loss_numerics(method) -> None:
    torch.manual_seed(0)
    ours = DINOLoss(method.out_dim, method.student_temp, method.center_momentum)
    theirs = LightlyDINOLoss(output_dim=method.out_dim, warmup_teacher_temp=method.teacher_temp,
                             teacher_temp=method.teacher_temp, warmup_teacher_temp_epochs=0,
                             student_temp=method.student_temp, center_momentum=method.center_momentum)
    worst_loss = worst_grad = worst_centre = 0.0
    for _ in range(50):
        views = 2 + method.local_crops_number
        student = [torch.randn(64, method.out_dim, requires_grad=True) for _ in range(views)]
        teacher = [torch.randn(64, method.out_dim) * 3 + 1 for _ in range(2)]
        loss_ours = ours(student, teacher, method.teacher_temp)
        grads_ours = torch.autograd.grad(loss_ours, student)
        loss_theirs = theirs(teacher_out=teacher, student_out=student, epoch=0)
        grads_theirs = torch.autograd.grad(loss_theirs, student)
        worst_loss = max(worst_loss, abs(loss_ours.item() - loss_theirs.item()))
        worst_grad = max(worst_grad, max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_theirs)))
        worst_centre = max(worst_centre, (ours.center.flatten() - theirs.center.flatten()).abs().max().item())
    print(f"loss numerics, 50 steps: |loss diff| <= {worst_loss:.2e}, |grad diff| <= {worst_grad:.2e}, "
          f"|centre diff| <= {worst_centre:.2e}")


def schedules(config, num_samples: int = 60000) -> None:
    optim, method = config.optim, config.method
    steps_per_epoch = num_samples // optim.batch_size
    total = steps_per_epoch * optim.epochs
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    recipe = optim.recipe()
    lr = optim.lr * optim.batch_size / 256
    worst_lr = worst_decay = worst_momentum = 0.0
    for step in range(total):
        ours = recipe.at(step, steps_per_epoch, total, optim.batch_size)
        worst_lr = max(worst_lr, abs(ours["lr"] - reference_lr(step, lr, optim.min_lr, warmup, total)) / lr)
        worst_decay = max(worst_decay, abs(ours["weight_decay"] - optim.weight_decay))
        worst_momentum = max(worst_momentum, abs(cosine(step, total, method.momentum_teacher, 1.0)
                                                 - cosine_schedule(step, total, method.momentum_teacher, 1.0)))
    print(f"schedules over {total} steps: lr relative diff <= {worst_lr:.2e}; weight decay diff <= {worst_decay:.2e}; "
          f"teacher momentum diff <= {worst_momentum:.2e} (lightly divides by total - 1, DINO by total)")


def _std_by_family(named: dict[str, torch.Tensor]) -> dict[str, float]:
    families: dict[str, list[torch.Tensor]] = {}
    for name, tensor in named.items():
        for family in ("cls_token", "pos_embed", "patch_embed.proj.weight", "qkv.weight", "attn.proj.weight",
                       "fc1.weight", "fc2.weight", "norm1.weight", "layers.0.weight", "last_layer"):
            if family in name or (family == "layers.0.weight" and name.endswith("mlp.0.weight")):
                families.setdefault(family, []).append(tensor.detach().flatten())
    return {family: torch.cat(values).float().std().item() for family, values in families.items()}


def initialisation(config) -> None:
    torch.manual_seed(0)
    shape, method = config.model.kwargs, config.method
    ours = backbones.create(config.model.backbone, **shape, in_chans=config.data.channels)
    head_ours = DINOHead(ours.embed_dim, method.out_dim, method.hidden_dim, method.bottleneck_dim)
    left = _std_by_family({**dict(ours.named_parameters()), **{f"head.{k}": v for k, v in head_ours.named_parameters()}})
    right = _std_by_family(dict(reference_network(config).named_parameters()))
    print("\n| parameter family | vitrail std | reference std |\n|---|---|---|")
    for family in sorted(set(left) | set(right)):
        print(f"| {family} | {left.get(family, float('nan')):.4f} | {right.get(family, float('nan')):.4f} |")


def views(config, count: int) -> None:
    method, data = config.method, config.data
    images, _ = load_fashion_mnist("train")
    images = images[:count]
    ours = method.views()(list(torch.from_numpy(images[:, None].copy())), [f"{i:07d}" for i in range(count)], seed=0, epoch=0)
    scale = np.array(data.std) * 255.0
    ours = {slot: (ours[column][:, index].astype(np.float32) - np.array(data.mean) * 255.0) / scale
            for column, width in (("global", 2), ("local", method.local_crops_number))
            for index, slot in enumerate(f"{column} {i}" for i in range(width))}
    transform = reference_transform(config)
    torch.manual_seed(0)
    crops = [transform(Image.fromarray(image, mode="L")) for image in images]
    names = [f"global {i}" for i in range(2)] + [f"local {i}" for i in range(method.local_crops_number)]
    theirs = {slot: torch.stack([sample[index] for sample in crops]).numpy() for index, slot in enumerate(names)}
    print(f"\n| view slot ({count} images) | vitrail mean / std | reference mean / std |\n|---|---|---|")
    for slot in names:
        print(f"| {slot} | {ours[slot].mean():.3f} / {ours[slot].std():.3f} | {theirs[slot].mean():.3f} / {theirs[slot].std():.3f} |")
    gap_ours = np.abs(ours["global 0"] - ours["global 1"]).mean()
    gap_theirs = np.abs(theirs["global 0"] - theirs["global 1"]).mean()
    print(f"| mean abs difference global 0 - global 1 | {gap_ours:.3f} | {gap_theirs:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load(CONFIG)
    loss_numerics(config.method)
    schedules(config)
    initialisation(config)
    views(config, args.images)


if __name__ == "__main__":
    main()
