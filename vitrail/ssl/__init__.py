"""Self-supervised methods, one file each. `build(config, ...)` makes the method named in
`config.method.name`; every method has the same interface:

    config.method.views()                 # the view recipe (vitrail.pipelines.views) it trains on
    loss, metrics = method(views, step)   # one forward
    method.after_step(step)               # after the optimizer step: EMA teacher, schedules
    method.backbone_for_eval()            # the module whose frozen features are evaluated
"""

from __future__ import annotations

from torch import nn

from vitrail.ssl.dino import DINO, DINOConfig

METHODS = {
    "dino": (DINOConfig, DINO),
}

MethodConfig = DINOConfig


def names() -> list[str]:
    return sorted(METHODS)


def build(config, steps_per_epoch: int, total_steps: int) -> nn.Module:
    _, method = METHODS[config.method.name]
    backbone_kwargs = {"in_chans": config.data.channels, **config.model.kwargs}
    return method(config.method, config.model.backbone, backbone_kwargs, steps_per_epoch,
                  total_steps, drop_path_rate=config.model.drop_path_rate)
