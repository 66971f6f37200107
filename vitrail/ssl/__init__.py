"""Self-supervised methods, one file each, and the registry `METHODS` (name -> (config, method)).
Every method implements the contract of `vitrail.ssl.base.Method`, which is all the trainer calls;
its config section declares the view recipe (`views()`) and the paper's optimizer
(`paper_optimizer`, `paper_drop_path_rate`), which `optim.*` and `model.drop_path_rate` override.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from vitrail.ssl.byol import BYOL, BYOLConfig
from vitrail.ssl.deepcluster import DeepCluster, DeepClusterConfig
from vitrail.ssl.dino import DINO, DINOConfig
from vitrail.ssl.dinov2 import DINOv2, DINOv2Config
from vitrail.ssl.ibot import IBOT, IBOTConfig
from vitrail.ssl.base import Method
from vitrail.ssl.rotnet import RotNet, RotNetConfig

METHODS = {
    "byol": (BYOLConfig, BYOL),
    "deepcluster": (DeepClusterConfig, DeepCluster),
    "dino": (DINOConfig, DINO),
    "dinov2": (DINOv2Config, DINOv2),
    "ibot": (IBOTConfig, IBOT),
    "rotnet": (RotNetConfig, RotNet),
}

# `method.name` picks the section's schema, so each method's keys are checked against its own config.
MethodConfig = Annotated[Union[tuple(config for config, _ in METHODS.values())], Field(discriminator="name")]


def names() -> list[str]:
    return sorted(METHODS)


def trained_crop_size(method_config) -> int:
    """The image size a method's backbone trained at: DINO/iBOT's global crops, the others' single crop."""
    return method_config.trained_crop_size


def build(config, steps_per_epoch: int, total_steps: int) -> Method:
    _, method = METHODS[config.method.name]
    backbone_kwargs = {"in_chans": config.data.channels, **config.model.kwargs, "compiled": config.run.compile}
    return method(config.method, config.model.backbone, backbone_kwargs, steps_per_epoch,
                  total_steps, drop_path_rate=config.model.drop_path_rate)
