"""Frozen features of a backbone over a shard set, with the eval transform (no augmentation): the one
extraction path of `vitrail eval`, the online k-NN and DeepCluster's re-clustering
(`image_batches` -> `embedded`).

Feature modes, as DINO's evaluations take them (Caron et al. 2021, Sec. 4.1 and App. B;
eval_knn.py / eval_linear.py):
  cls          the backbone's forward features (a ViT's final-normed CLS token): k-NN always uses these
  last4        the final-normed CLS tokens of a ViT's last 4 blocks (all, when fewer), concatenated (4 D): DINO's ViT-S probe
  cls_avgpool  the last CLS token and the mean of the last patch tokens (2 D): DINO's ViT-B probe
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vitrail.errors import VitrailError
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS
from vitrail.pipelines.shards import ShardIndex
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import EvalTransform, Normalization
from vitrail.precision import autocast, float32_norms

FEATURE_MODES = ("cls", "last4", "cls_avgpool")


def default_probe_features(backbone: nn.Module) -> str:
    """DINO's probe features: last4 for ViTs narrower than ViT-B (768), cls_avgpool from ViT-B up;
    other backbones give their forward features (cls)."""
    if not backbone.capabilities.block_cls:
        return "cls"
    return "last4" if backbone.embed_dim < 768 else "cls_avgpool"


def check_mode(backbone: nn.Module, mode: str, name: str = "this backbone") -> None:
    if mode not in FEATURE_MODES:
        raise VitrailError(f"unknown feature mode {mode!r}; expected one of {', '.join(FEATURE_MODES)}")
    if mode == "last4" and not backbone.capabilities.block_cls:
        raise VitrailError(f"feature mode 'last4' needs a ViT (per-block CLS tokens); {name} has none: use cls or cls_avgpool")
    if mode == "cls_avgpool" and not backbone.capabilities.patch_tokens:
        raise VitrailError(f"feature mode 'cls_avgpool' needs a token model (patch tokens); {name} has none: use cls")


def cls_columns(mode: str, embed_dim: int | None = None) -> slice:
    """Where the final CLS token (the k-NN features) sits inside the features of `mode`; `embed_dim`
    is needed for the modes that hold more than it (raw pixels, always `cls`, have none)."""
    if mode == "cls":
        return slice(None)
    return {"last4": slice(-embed_dim, None), "cls_avgpool": slice(0, embed_dim)}[mode]


def frozen_features(backbone: nn.Module, images: torch.Tensor, mode: str = "cls") -> torch.Tensor:
    """(B, F) features of one batch in `mode`."""
    if mode == "last4":
        return backbone.intermediate_cls(images, 4).flatten(1)  # (B, 4 D), last block's CLS last
    if mode == "cls_avgpool":
        tokens = backbone.forward_features(images)
        return torch.cat([tokens["cls"], tokens["patches"].mean(dim=1)], dim=1)  # (B, 2 D)
    return backbone(images)


def embed_images(backbone: nn.Module, images: torch.Tensor, normalization: Normalization, device="cpu",
                 mode: str = "cls") -> torch.Tensor:
    """(B, F) float32 CPU features of uint8 images (B, C, S, S): normalised on `device`, bf16 autocast on CUDA."""
    device = torch.device(device)
    float32_norms(backbone)
    with autocast(device, device.type == "cuda"):
        return frozen_features(backbone, normalization(images.to(device)), mode).float().cpu()


def image_batches(index: ShardIndex, transform: EvalTransform, channels: int, batch_size: int = 256,
                  limit: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """uint8 eval crops {"image" (B, C, S, S), "label" (B,), "key" (B,)} in shard order: the first
    `limit` samples, or all."""
    seen = 0
    for batch in local_batches(index, transform, seed=0, channels=channels, batch_size=batch_size,
                               shuffle=False, epochs=1, drop_last=False, max_pixels=max_pixels):
        keep = len(batch["label"]) if limit is None else min(len(batch["label"]), limit - seen)
        yield {column: batch[column][:keep] for column in ("image", "label", "key")}
        seen += keep
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def embedded(backbone: nn.Module, batches: Iterable[dict], normalization: Normalization, device="cpu",
             mode: str = "cls", total: int | None = None, progress: str | None = None):
    """(features (B, F) float32, labels (B,) int64, keys) numpy batches of uint8 image batches, in
    order; with `progress`, a bar of that name counts the images (`total` of them)."""
    backbone.eval().to(device)
    with tqdm(total=total, desc=progress, unit="img", disable=progress is None, mininterval=2.0,
              dynamic_ncols=True) as bar:
        for batch in batches:
            features = embed_images(backbone, torch.as_tensor(batch["image"]), normalization, device, mode).numpy()
            yield features, np.asarray(batch["label"]), [str(key) for key in batch["key"]]
            bar.update(len(features))


def feature_batches(backbone: nn.Module, index: ShardIndex, transform: EvalTransform, normalization: Normalization,
                    batch_size: int = 256, device="cpu", limit: int | None = None, mode: str = "cls",
                    max_pixels: int = MAX_IMAGE_PIXELS, progress: str | None = None):
    """The features of a shard set's first `limit` samples (or all), batch by batch: `embedded` of `image_batches`."""
    total = index.num_samples if limit is None else min(index.num_samples, limit)
    return embedded(backbone, image_batches(index, transform, normalization.channels, batch_size, limit, max_pixels),
                    normalization, device, mode, total, progress)


def extract(backbone: nn.Module, index: ShardIndex, transform: EvalTransform, normalization: Normalization,
            batch_size: int = 256, device="cpu", limit: int | None = None, return_keys: bool = False,
            mode: str = "cls", max_pixels: int = MAX_IMAGE_PIXELS, progress: str | None = None):
    """(features (N, F) float32, labels (N,) int64) in shard order, and the N sample keys after
    them with `return_keys`; `limit` keeps the first N samples."""
    return gathered(feature_batches(backbone, index, transform, normalization, batch_size, device, limit, mode,
                                    max_pixels, progress), index.folder, return_keys)


def gathered(batches, source, return_keys: bool = False):
    """`embedded`'s batches concatenated: (features, labels) and, with `return_keys`, the keys."""
    features, labels, keys = [], [], []
    for batch_features, batch_labels, batch_keys in batches:
        features.append(batch_features)
        labels.append(batch_labels)
        keys.extend(batch_keys)
    if not features:
        raise VitrailError(f"no readable samples in {source}")
    features, labels = np.concatenate(features), np.concatenate(labels)
    return (features, labels, keys) if return_keys else (features, labels)
