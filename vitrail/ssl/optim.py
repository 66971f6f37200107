"""Each method's optimizer as its paper sets it: the optimizer, its schedules, and LARS.

An `OptimizerRecipe` is what a method's config declares as its paper's (`paper_optimizer`) and
what `optim.*` keys override. Parameter groups carry `decay` (weight decay follows the schedule,
else 0) and `lr_multiplier` (the group's learning rate is the scheduled one times it); LARS also
leaves the `decay: False` groups out of its trust-ratio adaptation, as BYOL does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

import torch

from vitrail.ssl.schedules import cosine

OptimizerName = Literal["adamw", "sgd", "lars"]
# How the recipe's `lr` scales with the global batch: DINO's linear rule lr x batch / 256 (Caron
# et al. 2021, Sec. 4; BYOL's App. C too), DINOv2's lr x sqrt(batch / 1024) (official
# optim.scaling_rule: sqrt_wrt_1024), or none: the lr is the paper's at the paper's batch (RotNet, DeepCluster).
LrScaling = Literal["linear_256", "sqrt_1024", "none"]
# The settings that only some optimizers read.
OPTIMIZER_SETTINGS = {"adamw": (), "sgd": ("momentum", "nesterov"), "lars": ("momentum", "trust_coefficient")}


@dataclass(frozen=True)
class OptimizerRecipe:
    name: OptimizerName
    lr: float                       # peak learning rate at the reference batch of `lr_scaling`
    lr_scaling: LrScaling
    warmup_epochs: float            # linear warm-up from 0
    weight_decay: float             # cosine from weight_decay to weight_decay_end
    weight_decay_end: float
    clip_grad: float                # 0: no clipping
    # After the warm-up: half a cosine from lr to min_lr, or steps: lr times lr_gamma at each of
    # lr_milestones (epochs), constant without milestones.
    lr_schedule: Literal["cosine", "steps"] = "cosine"
    min_lr: float = 0.0
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    momentum: float | None = None   # sgd, lars
    nesterov: bool | None = None    # sgd
    trust_coefficient: float | None = None  # lars: eta of You et al. 2017

    def settings(self) -> dict:
        """The recipe as `optim.*` keys: the optimizer-specific ones only for its own optimizer."""
        others = {key for keys in OPTIMIZER_SETTINGS.values() for key in keys} - set(OPTIMIZER_SETTINGS[self.name])
        return {key: value for key, value in self.__dict__.items() if key not in others}

    def peak_lr(self, global_batch: int) -> float:
        scale = {"linear_256": global_batch / 256, "sqrt_1024": math.sqrt(global_batch / 1024), "none": 1.0}
        return self.lr * scale[self.lr_scaling]

    def at(self, step: int, steps_per_epoch: int, total_steps: int, global_batch: int) -> dict[str, float]:
        """The learning rate and weight decay at `step`: linear warm-up, then the lr schedule;
        weight decay on its own cosine."""
        peak, warmup = self.peak_lr(global_batch), int(self.warmup_epochs * steps_per_epoch)
        if self.lr_schedule == "steps" and step >= warmup:
            passed = bisect.bisect_right([int(epoch * steps_per_epoch) for epoch in self.lr_milestones], step)
            lr = peak * self.lr_gamma ** passed
        else:
            lr = cosine(step, total_steps, peak, self.min_lr, warmup_steps=warmup)
        return {"lr": lr, "weight_decay": cosine(step, total_steps, self.weight_decay, self.weight_decay_end)}


def build_optimizer(recipe: OptimizerRecipe, groups: list[dict]) -> torch.optim.Optimizer:
    """The recipe's optimizer over `groups`; learning rates and weight decays are set per step by `apply`."""
    if recipe.name == "adamw":
        return torch.optim.AdamW(groups)
    if recipe.name == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return LARS(groups, lr=recipe.lr, momentum=recipe.momentum, trust_coefficient=recipe.trust_coefficient)


def apply(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's learning rate (times its multiplier) and, where it decays, its weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = weight_decay if group["decay"] else 0.0


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888), as BYOL
    uses it (Grill et al. 2020, App. C; official byol/utils/optimizers.py): per parameter tensor,
    g <- g + wd p, then g <- g * eta ||p|| / ||g|| (1 where either norm is 0), then SGD momentum
    v <- m v + g, p <- p - lr v. Groups with `decay: False` (biases, BatchNorm) get neither
    weight decay nor the adaptation: plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, trust_coefficient: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, trust_coefficient=trust_coefficient,
                                      weight_decay=weight_decay, decay=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = param.norm(), grad.norm()
                    ratio = torch.where((param_norm > 0) & (grad_norm > 0),
                                        group["trust_coefficient"] * param_norm / grad_norm, torch.ones_like(param_norm))
                    grad = grad * ratio
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                velocity = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                param.add_(velocity, alpha=-group["lr"])
        return loss
