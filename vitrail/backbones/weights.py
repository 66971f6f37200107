"""Fit weights written for another network into a backbone: released DINO / iBOT / timm files,
another vitrail run's backbone (`model.init_from`), `vitrail eval --checkpoint FILE`.

Key names must match (vitrail's ViT, Swin and LeViT use timm's, ResNet torchvision's). A ViT's
position embeddings are resized when the file was trained on another patch grid; every other
difference in shape is a mismatch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitrail.backbones.vit import resample_pos_embed
from vitrail.errors import VitrailError

# Tensors a pretraining or timm file holds beside the backbone's (projection and classifier heads,
# LeViT's distillation head, iBOT's mask embedding): never loaded, never reported as unexpected.
NOT_BACKBONE = ("head.", "head_dist.", "dino_head.", "ibot_head.", "masked_embed", "mask_token")
# A backbone's own tensors that only a method's training uses (iBOT's mask token): a released
# backbone file lacks them, so they keep their initial values instead of counting as missing.
TRAINING_ONLY = ("mask_token",)
_SHOWN = 5  # keys named per kind of problem in an error message


def fit(backbone: nn.Module, weights: dict[str, torch.Tensor], source: str, strict: bool = True,
        hint: str = "") -> list[str]:
    """Load `weights` into `backbone` and return the keys it skipped, each with the reason.

    `strict`: any missing, unexpected or wrongly shaped key raises a VitrailError naming them
    (and `hint`, what the user can do), before anything is loaded.
    """
    expected = backbone.state_dict()
    weights = _resized_positions(weights, expected)
    missing = [key for key in expected if key not in weights and not key.startswith(TRAINING_ONLY)]
    mismatched = [key for key, value in expected.items() if key in weights and weights[key].shape != value.shape]
    unexpected = [key for key in weights if key not in expected and not key.startswith(NOT_BACKBONE)]
    if strict and (missing or mismatched or unexpected):
        shapes = [f"{key} {tuple(weights[key].shape)} (expected {tuple(expected[key].shape)})" for key in mismatched]
        problems = [f"{label}: {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''} ({len(keys)} in all)"
                    for label, keys in (("missing", missing), ("wrong shape", shapes), ("unexpected", unexpected)) if keys]
        name = getattr(backbone, "registry_name", type(backbone).__name__)
        raise VitrailError(f"{source} does not hold {name} weights; " + "; ".join(problems) + hint)
    backbone.load_state_dict({key: weights[key] for key in expected if key in weights and key not in mismatched},
                             strict=False)
    return ([f"{key}: not in {source}" for key in missing]
            + [f"{key}: {tuple(weights[key].shape)} in {source}, {tuple(expected[key].shape)} in the backbone"
               for key in mismatched]
            + [f"{key}: in {source}, not in the backbone" for key in unexpected])


def _resized_positions(weights: dict, expected: dict) -> dict:
    """`pos_embed` resampled to the backbone's grid when only the number of patch positions differs."""
    source, target = weights.get("pos_embed"), expected.get("pos_embed")
    if source is None or target is None or source.shape == target.shape or source.ndim != 3 or target.ndim != 3:
        return weights
    source_side, target_side = math.isqrt(source.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    if source.shape[2] != target.shape[2] or source_side**2 != source.shape[1] - 1:
        return weights  # another width or not a square grid: left to the shape check
    return {**weights, "pos_embed": resample_pos_embed(source, target_side, target_side)}
