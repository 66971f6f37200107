"""Self-supervised methods, one file each. `build(config, ...)` makes the method named in
`config.method.name`; every method has the same interface:

    config.method.views()                 # the view recipe (vitrail.pipelines.views) it trains on
    loss, metrics = method(views, step)   # one forward
    method.after_step(step)               # after the optimizer step: EMA teacher, schedules
    method.backbone_for_eval()            # the module whose frozen features are evaluated
    method.parameter_groups(), method.clip_gradients(max_norm), method.lr_scaling
                                          # the optimizer's view (vitrail.ssl.base.Method: DINO's by default)
    student, teacher = method.backbone_pair()  # the trained backbone and its EMA copy (the same
                                          # module for single-network methods): init_from, export

and optionally `method.on_epoch_start(epoch, training_set_features)`, which the training loop
calls before each epoch's first step (DeepCluster re-clusters the whole training set there).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field
from torch import nn

from vitrail.ssl.byol import BYOL, BYOLConfig
from vitrail.ssl.deepcluster import DeepCluster, DeepClusterConfig
from vitrail.ssl.dino import DINO, DINOConfig
from vitrail.ssl.dinov2 import DINOv2, DINOv2Config
from vitrail.ssl.ibot import IBOT, IBOTConfig
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
    return getattr(method_config, "global_crop_size", None) or method_config.crop_size


def build(config, steps_per_epoch: int, total_steps: int) -> nn.Module:
    _, method = METHODS[config.method.name]
    backbone_kwargs = {"in_chans": config.data.channels, **config.model.kwargs, "compiled": config.run.compile}
    return method(config.method, config.model.backbone, backbone_kwargs, steps_per_epoch,
                  total_steps, drop_path_rate=config.model.drop_path_rate)
