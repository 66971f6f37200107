"""Frozen features of a backbone over a shard set, with the eval transform (no augmentation)."""

from __future__ import annotations

import torch
from torch import nn

from vitrail.pipelines.shards import ShardIndex
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import EvalTransform, normalize


@torch.no_grad()
def extract(backbone: nn.Module, index: ShardIndex, transform: EvalTransform, channels: int,
            mean, std, batch_size: int = 256, device="cpu", limit: int | None = None, return_keys: bool = False):
    """(features (N, D) float32, labels (N,) int64) in shard order, and the N sample keys after
    them with `return_keys`; `limit` keeps the first N samples."""
    backbone.eval().to(device)
    features, labels, keys, seen = [], [], [], 0
    for batch in local_batches(index, transform, seed=0, channels=channels, batch_size=batch_size,
                               shuffle=False, epochs=1, drop_last=False):
        images = normalize(torch.as_tensor(batch["image"]).to(device), mean, std)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            features.append(backbone(images).float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        keys.extend(batch["key"])
        seen += len(images)
        if limit is not None and seen >= limit:
            break
    features, labels = torch.cat(features)[:limit], torch.cat(labels)[:limit]
    if return_keys:
        return features.numpy(), labels.numpy(), [str(key) for key in keys[:limit]]
    return features.numpy(), labels.numpy()
