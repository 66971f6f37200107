"""The contract between a method and the trainer: the trainer calls these and nothing else.

    views = method.views()                      # the view recipe (vitrail.pipelines.views) it trains on
    optimizer = method.optimizer(recipe)        # its paper's optimizer over its parameter groups
    per step:
        values = method.schedules(recipe, step, global_batch); apply(optimizer, **values)
        loss, metrics = method(views.to_device(...), step)   # forward = training_step, so DDP sees it
        loss.backward()
        method.clip_gradients(recipe.clip_grad)  # when clip_grad > 0
        method.after_backward(step)              # e.g. the frozen last layer's gradients cancelled
        optimizer.step()
        method.after_step(step)                  # EMA teacher, momentum schedules
    method.on_epoch_start(epoch, features_of)    # before each epoch's first step
    method.backbone_for_eval(), method.backbone_pair()

A method reads what a backbone can do from what the backbone declares (`patch_size`,
`token_stride`, `capabilities`, a `mask_token` argument), never by probing its type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch
from torch import nn

from vitrail.pipelines.views import EvalTransform, Views
from vitrail.ssl.optim import OptimizerRecipe, build_optimizer

# What `on_epoch_start` gets: (backbone, eval transform) -> (features (N, D) float32 of every
# training sample, their keys), from the trainer's one feature-extraction path.
FeaturesOf = Callable[[nn.Module, EvalTransform], tuple[np.ndarray, list[str]]]


class Method(nn.Module, ABC):
    def __init__(self, config, steps_per_epoch: int, total_steps: int):
        super().__init__()
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps

    # -- data -----------------------------------------------------------------------------------
    def views(self):
        """The view recipe whose `to_device` makes this method's `Views`."""
        return self.config.views()

    # -- one step -------------------------------------------------------------------------------
    @abstractmethod
    def training_step(self, views: Views, step: int) -> tuple[torch.Tensor, dict]:
        """The loss of one batch and the metrics to log."""

    def forward(self, views: Views, step: int) -> tuple[torch.Tensor, dict]:
        return self.training_step(views, step)

    def after_backward(self, step: int) -> None:
        """Between backward and the optimizer step (gradients are there to change)."""

    @abstractmethod
    def after_step(self, step: int) -> dict[str, float]:
        """After the optimizer step (EMA teacher, schedules); returns values to log."""

    def on_epoch_start(self, epoch: int, features_of: FeaturesOf) -> None:
        """Before the first step of each epoch."""

    # -- optimizer ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Groups of the trained parameters, each with `decay` (weight decay follows the schedule,
        else 0) and `lr_multiplier`. Default, DINO's utils.get_params_groups (and BYOL's
        exclusion, App. C): no weight decay on biases and norm parameters."""
        decayed, plain = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (plain if parameter.ndim <= 1 or name.endswith(".bias") else decayed).append(parameter)
        return [{"params": decayed, "decay": True, "lr_multiplier": 1.0},
                {"params": plain, "decay": False, "lr_multiplier": 1.0}]

    def optimizer(self, recipe: OptimizerRecipe) -> torch.optim.Optimizer:
        return build_optimizer(recipe, self.parameter_groups())

    def schedules(self, recipe: OptimizerRecipe, step: int, global_batch: int) -> dict[str, float]:
        """Learning rate and weight decay at `step` (the recipe's warm-up, cosine or steps)."""
        return recipe.at(step, self.steps_per_epoch, self.total_steps, global_batch)

    def clip_gradients(self, max_norm: float) -> None:
        """Default, DINO's utils.clip_gradients: each parameter's gradient clipped to `max_norm` separately."""
        for parameter in self.parameters():
            if parameter.grad is not None:
                norm = parameter.grad.norm()
                parameter.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))

    # -- what is kept ---------------------------------------------------------------------------
    @abstractmethod
    def backbone_for_eval(self) -> nn.Module:
        """The backbone whose frozen features are evaluated."""

    @abstractmethod
    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        """(trained backbone, its EMA copy); the same module twice for single-network methods."""


def cancel_gradients(modules: list[nn.Module]) -> None:
    """Drop every gradient of `modules`' parameters, so the optimizer skips them (no update, no
    weight decay): DINO's and iBOT's `cancel_gradients_last_layer`."""
    for module in modules:
        for parameter in module.parameters():
            parameter.grad = None
