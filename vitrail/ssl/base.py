"""What every method gives the training loop's optimizer, with DINO's choices as the defaults.

A method overrides these when its paper optimizes differently (DINOv2: layer-wise learning-rate
decay, a patch-embedding multiplier, square-root scaling, clipping by module norm).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn


class Method(nn.Module):
    # How optim.lr scales with the global batch: DINO's linear rule, lr x batch / 256 (Caron et al.
    # 2021, Sec. 4), or DINOv2's lr x sqrt(batch / 1024) (official optim.scaling_rule: sqrt_wrt_1024).
    lr_scaling: ClassVar[Literal["linear_256", "sqrt_1024"]] = "linear_256"

    def parameter_groups(self) -> list[dict]:
        """AdamW groups of the trained parameters. Each has `decay` (weight decay follows the
        schedule, else 0) and `lr_multiplier` (its learning rate is the scheduled one times it).
        Default, DINO's utils.get_params_groups: no decay on biases and norm parameters."""
        decayed, plain = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (plain if parameter.ndim <= 1 or name.endswith(".bias") else decayed).append(parameter)
        return [{"params": decayed, "decay": True, "lr_multiplier": 1.0},
                {"params": plain, "decay": False, "weight_decay": 0.0, "lr_multiplier": 1.0}]

    def clip_gradients(self, max_norm: float) -> None:
        """Default, DINO's utils.clip_gradients: each parameter's gradient clipped to `max_norm` separately."""
        for parameter in self.parameters():
            if parameter.grad is not None:
                norm = parameter.grad.norm()
                parameter.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
