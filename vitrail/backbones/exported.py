"""A backbone as a folder other code loads: `model.safetensors` + `config.json`, no pickle.

Two formats:
  - `timm` (ViT, Swin, LeViT, ResNet): config.json in timm's hub layout (`architecture`,
    `model_args`, `pretrained_cfg`), so timm builds the network and loads the weights itself;
  - `torch` (every backbone): vitrail's registry name and constructor arguments, rebuilt by
    `load_exported(folder)`.
Both also carry a `vitrail` section (registry name, arguments, where the weights came from), so
`load_exported` and `model.init_from` read either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save
from torch import nn

from vitrail import backbones, storage
from vitrail.backbones import timm_layout
from vitrail.errors import VitrailError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMATS = ("timm", "torch")


def export(backbone: nn.Module, folder: str | Path, fmt: str, image_size: int, mean: list[float], std: list[float],
           provenance: dict) -> str:
    """Write `backbone` (built by `backbones.create`) to `folder` (a path or URL) in format `fmt`; returns the folder.

    `image_size`, `mean`, `std`: the inputs its features are evaluated on (timm's pretrained_cfg).
    """
    if fmt not in FORMATS:
        raise VitrailError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    # iBOT's mask token, built on request (`mask_token=True`), is a training-only tensor: the exported
    # network is built without it. DINOv2's always exists (its released files hold it) and stays.
    requested_mask_token = backbone.registry_kwargs.get("mask_token", False)
    kwargs = {key: value for key, value in backbone.registry_kwargs.items() if key != "mask_token"}
    weights = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()
               if not (requested_mask_token and key == "mask_token")}
    config = {}
    if fmt == "timm":
        timm = timm_layout.describe(backbone, weights, image_size)
        weights = timm.weights
        if "img_size" in backbones.arguments(backbone.registry_name):
            kwargs["img_size"] = timm.model_args["img_size"]  # a ViT's position table is resampled to it
        channels = timm.model_args.get("in_chans", 3)
        config = {
            "architecture": timm.architecture,
            "num_classes": 0,
            "num_features": backbone.embed_dim,
            "model_args": timm.model_args,
            "pretrained_cfg": {
                "input_size": [channels, timm.input_size, timm.input_size],
                "fixed_input_size": timm.fixed_input_size,
                # vitrail evaluates centre crops of images resized by DINO's 256/224 ratio, bicubic.
                "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                "mean": list(mean), "std": list(std),
                "num_classes": 0, "first_conv": timm.first_conv,
            },
        }
    config["vitrail"] = {"backbone": backbone.registry_name, "kwargs": kwargs, "embed_dim": backbone.embed_dim,
                         "format": fmt, **provenance}
    folder = str(folder)
    storage.write_bytes(storage.join(folder, WEIGHTS_FILE), save(weights, metadata={"format": "pt"}))
    storage.write_text(storage.join(folder, CONFIG_FILE), json.dumps(config, indent=2) + "\n")
    return folder


def load_exported(folder: str | Path) -> nn.Module:
    """The backbone a `vitrail export` folder holds (either format), weights loaded strictly, in eval mode."""
    folder = Path(folder)
    try:
        described = json.loads((folder / CONFIG_FILE).read_text())["vitrail"]
        name, kwargs = described["backbone"], described["kwargs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VitrailError(f"{folder} is not a vitrail export: cannot read 'vitrail.backbone' and 'vitrail.kwargs' "
                           f"from {CONFIG_FILE} ({type(error).__name__}: {error})") from None
    if name not in backbones.names():
        raise VitrailError(f"{folder / CONFIG_FILE} names backbone {name!r}, unknown to this vitrail; "
                           f"known: {', '.join(backbones.names())}")
    backbone = backbones.create(name, **kwargs)
    weights = read_safetensors(folder / WEIGHTS_FILE)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        raise VitrailError(f"{folder / WEIGHTS_FILE} does not fit {name} {kwargs}: "
                           f"{str(error).splitlines()[0]}") from None
    return backbone.eval()


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local file (mapped, not copied) or a URL."""
    if not storage.exists(file) or storage.is_dir(file):
        raise VitrailError(f"{file} does not exist")
    try:
        return load_file(str(storage.local_path(file))) if storage.is_local(file) else load(storage.read_bytes(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise VitrailError(f"cannot read {file} as safetensors (truncated or another format): {error}") from None
