"""Linear probe on frozen, cached features.

DINO's linear evaluation (Caron et al. 2021, Sec. 4.1 and App.; eval_linear.py): a plain
nn.Linear on the features (no BatchNorm), weights ~ N(0, 0.01), bias 0, cross-entropy, SGD with
momentum 0.9 and no weight decay, learning rate scaled by batch_size / 256 and annealed with a
cosine schedule. As in DINOv2 (Oquab et al. 2023, linear evaluation), a grid of learning rates is
trained at once: one stacked weight tensor, one matmul per batch for every head, and the best
learning rate is picked on held-out data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitrail.errors import VitrailError
from vitrail.eval.knn import checked_features, checked_labels

# DINOv2's learning-rate grid (for batch size 256; scaled linearly with the batch size).
DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def linear_probe(train_features, train_labels, test_features, test_labels, epochs=100,
                 lrs=DINOV2_LEARNING_RATES, batch_size=1024, val_fraction=0.1, standardize=False,
                 seed=0, device="cpu"):
    """Train one linear head per learning rate in `lrs`, report the best one's test accuracy.

    A seeded `val_fraction` of the train set is held out; every head trains on the rest for
    `epochs` epochs, the head with the best held-out top-1 is chosen, and that same head (no
    retraining on the full train set) is scored on the test set. `standardize=True` centres and
    scales every input dimension with the mean / std of the training part, as raw pixels need;
    the default (False) feeds features unchanged, as DINO does with backbone features.

    Returns {"top1": %, "top5": %, "best_lr": lr, "val_top1_per_lr": {lr: %}}; top-5 counts at
    most as many guesses as there are classes.
    """
    train_features = checked_features(train_features, "train")
    train_labels = checked_labels(train_labels, len(train_features), "train")
    test_features = checked_features(test_features, "test")
    test_labels = checked_labels(test_labels, len(test_features), "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise VitrailError(f"train features have dimension {train_features.shape[1]} but test features "
                           f"{test_features.shape[1]}; both must come from the same backbone")
    num_val = round(val_fraction * len(train_features))
    if not 0 < num_val < len(train_features):
        raise VitrailError(f"val_fraction={val_fraction} of {len(train_features)} train samples leaves an "
                           "empty train or validation split; expected a fraction in (0, 1)")
    if not lrs or min(lrs) <= 0 or epochs < 1 or batch_size < 1:
        raise VitrailError(f"linear probe needs positive lrs, epochs >= 1 and batch_size >= 1, "
                           f"got lrs={lrs}, epochs={epochs}, batch_size={batch_size}")

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_features), generator=generator)
    val_index, fit_index = order[:num_val], order[num_val:]
    if standardize:
        mean, std = train_features[fit_index].mean(dim=0), train_features[fit_index].std(dim=0)
        std[std == 0] = 1.0  # constant dimensions are only centred, as sklearn's StandardScaler does
        train_features, test_features = (train_features - mean) / std, (test_features - mean) / std

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    heads = _train_heads(train_features[fit_index].to(device), train_labels[fit_index].to(device), num_classes,
                         epochs, lrs, batch_size, generator)
    val_top1 = _accuracy(heads, train_features[val_index], train_labels[val_index], device, top=1)[0]
    best = int(val_top1.argmax())
    top1, top5 = _accuracy(heads, test_features, test_labels, device, top=min(5, num_classes))[:, best]
    return {"top1": top1.item(), "top5": top5.item(), "best_lr": lrs[best],
            "val_top1_per_lr": {lr: accuracy.item() for lr, accuracy in zip(lrs, val_top1)}}


def _train_heads(features, labels, num_classes, epochs, lrs, batch_size, generator):
    """(D + 1, H, C) weights (last row: biases) of one linear head per learning rate, trained together."""
    dim, num_heads = features.shape[1], len(lrs)
    heads = torch.zeros(dim + 1, num_heads, num_classes)
    heads[:dim].normal_(0.0, 0.01, generator=generator)
    heads = heads.to(features.device)
    momentum_buffer = torch.zeros_like(heads)
    base_lrs = torch.tensor(lrs, device=features.device)[:, None] * batch_size / 256  # (H, 1), linear scaling rule
    steps_per_epoch = math.ceil(len(features) / batch_size)
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for step, batch in enumerate(order.split(batch_size)):
            inputs = F.pad(features[batch], (0, 1), value=1.0)  # (B, D + 1): a constant 1 feeds the bias
            logits = (inputs @ heads.view(dim + 1, -1)).view(len(batch), num_heads, num_classes)
            # Cross-entropy gradient w.r.t. the logits is softmax - one_hot (averaged over the
            # batch); no autograd graph is needed for a linear model.
            error = logits.softmax(dim=2) - F.one_hot(labels[batch], num_classes)[:, None, :]
            gradient = (inputs.T @ error.view(len(batch), -1)).view_as(heads) / len(batch)
            # SGD with momentum 0.9 as torch.optim.SGD does it; cosine lr from base to 0 per step.
            progress = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
            momentum_buffer.mul_(0.9).add_(gradient)
            heads.sub_(base_lrs * 0.5 * (1 + math.cos(math.pi * progress)) * momentum_buffer)
    return heads


@torch.no_grad()
def _accuracy(heads, features, labels, device, top, batch_size=8192):
    """(2, H) percent of samples whose label is each head's first guess / among its `top` guesses."""
    hits = torch.zeros(2, heads.shape[1], device=device)
    for inputs, targets in zip(features.split(batch_size), labels.split(batch_size)):
        inputs, targets = F.pad(inputs.to(device), (0, 1), value=1.0), targets.to(device)
        logits = (inputs @ heads.view(heads.shape[0], -1)).view(len(inputs), heads.shape[1], -1)  # (B, H, C)
        correct = logits.topk(top, dim=2).indices == targets[:, None, None]
        hits += torch.stack([correct[:, :, 0].sum(0), correct.any(dim=2).sum(0)])
    return 100.0 * hits.cpu() / len(features)
