"""How a vitrail backbone reads as a timm model: architecture name, constructor arguments, weights.

ViT, Swin and LeViT keep timm's key names and ResNet torchvision's, which timm's ResNet shares,
so the weights go over as they are; what changes is how the network is described. timm is not
imported here: an export needs only these facts (checked against timm in tests/test_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitrail import backbones
from vitrail.backbones.vit import resample_pos_embed
from vitrail.errors import VitrailError


@dataclass
class TimmModel:
    architecture: str
    model_args: dict  # timm constructor arguments, num_classes 0 (features only)
    weights: dict[str, torch.Tensor]
    input_size: int  # the square input the model takes
    fixed_input_size: bool  # timm's ViT and Swin take only `input_size`
    first_conv: str


def _vit(architecture: str, name: str, args: dict, weights: dict, image_size: int) -> TimmModel:
    # vitrail resamples the position table to each input's grid at run time; timm's ViT takes one
    # fixed size, so the table is resampled once here, to the evaluated grid (the same numbers).
    grid = image_size // args["patch_size"]
    weights["pos_embed"] = resample_pos_embed(weights["pos_embed"], grid, grid)
    model_args = {key: args[key] for key in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                             "mlp_ratio", "qkv_bias")}
    return TimmModel(architecture, {"img_size": image_size, **model_args, "num_classes": 0}, weights,
                     image_size, True, "patch_embed.proj")


def _swin(architecture: str, name: str, args: dict, weights: dict, image_size: int) -> TimmModel:
    model_args = {"img_size": image_size, "patch_size": args["patch_size"], "in_chans": args["in_chans"],
                  "embed_dim": args["base_dim"], "depths": list(args["depths"]), "num_heads": list(args["num_heads"]),
                  "window_size": args["window_size"], "mlp_ratio": args["mlp_ratio"], "qkv_bias": args["qkv_bias"],
                  "num_classes": 0}
    return TimmModel(architecture, model_args, weights, image_size, True, "patch_embed.proj")


def _levit(architecture: str, name: str, args: dict, weights: dict, image_size: int) -> TimmModel:
    # The attention-bias tables are learned on img_size's grid; timm's LeViT runs at that size.
    model_args = {"img_size": args["img_size"], "in_chans": args["in_chans"], "embed_dim": list(args["stage_dims"]),
                  "key_dim": args["key_dim"], "depth": list(args["depths"]), "num_heads": list(args["num_heads"]),
                  "attn_ratio": args["attn_ratio"], "mlp_ratio": args["mlp_ratio"], "num_classes": 0}
    return TimmModel(architecture, model_args, weights, args["img_size"], False, "stem.conv1.linear")


def _resnet(architecture: str, name: str, args: dict, weights: dict, image_size: int) -> TimmModel:
    if args["small_images"]:
        raise VitrailError(f"{name} with small_images=True (a 3x3 stride-1 stem) has no timm equivalent; "
                           "export it with --format torch")
    return TimmModel(architecture, {"in_chans": args["in_chans"], "num_classes": 0}, weights, image_size, False, "conv1")


# The timm architecture each registry variant is, and how its constructor arguments translate.
_ARCHITECTURES = {
    "vit_tiny": ("vit_tiny_patch16_224", _vit), "vit_small": ("vit_small_patch16_224", _vit),
    "vit_base": ("vit_base_patch16_224", _vit),
    "swin_tiny": ("swin_tiny_patch4_window7_224", _swin), "swin_small": ("swin_small_patch4_window7_224", _swin),
    "swin_base": ("swin_base_patch4_window7_224", _swin),
    "levit_128s": ("levit_128s", _levit), "levit_128": ("levit_128", _levit), "levit_192": ("levit_192", _levit),
    "levit_256": ("levit_256", _levit), "levit_384": ("levit_384", _levit),
    "resnet18": ("resnet18", _resnet), "resnet50": ("resnet50", _resnet),
}


def describe(backbone: nn.Module, weights: dict[str, torch.Tensor], image_size: int) -> TimmModel:
    """The timm model equal to `backbone` evaluated on `image_size` inputs; a VitrailError names a
    backbone timm cannot express."""
    name = backbone.registry_name
    if name not in _ARCHITECTURES:
        raise VitrailError(f"backbone {name} has no timm counterpart (timm format: ViT, Swin, LeViT, ResNet); "
                           "export it with --format torch")
    architecture, translate = _ARCHITECTURES[name]
    # iBOT's mask token is training-only; timm's networks have none.
    weights = {key: value for key, value in weights.items() if key != "mask_token"}
    return translate(architecture, name, backbones.all_arguments(name, backbone.registry_kwargs), weights, image_size)
