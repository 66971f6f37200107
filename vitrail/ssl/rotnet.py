"""RotNet: unsupervised representation learning by predicting image rotations
(Gidaris, Singh & Komodakis, ICLR 2018, arXiv:1803.07728).

Every image is shown in four rotations (0, 90, 180, 270 degrees) and the network classifies
which one it sees. Recognising an object's canonical orientation requires recognising the
object, so the backbone learns semantic features. The paper trains NIN on CIFAR-10 and
AlexNet on ImageNet; here any backbone of the registry takes their place, followed by a
linear 4-way classifier on its pooled features.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitrail import backbones
from vitrail.pipelines.views import Rotations, Views
from vitrail.ssl.base import Method
from vitrail.ssl.optim import OptimizerRecipe

NUM_ROTATIONS = 4


class RotNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["rotnet"] = "rotnet"
    # Official config/ImageNet_RotNet_AlexNet.py: SGD, momentum 0.9, Nesterov, weight decay 5e-4 on
    # every parameter, batch 192, 50 epochs; its LUT_lr runs 0.01 until epoch 15, then x 0.1 at
    # epochs 15, 30 and 45 (the `lr: 0.1` beside it is overwritten by the LUT before the first step;
    # Sec. 3.2 of the paper says 0.01 too, dropped at 10 and 20 of 30 epochs). No warm-up, no scaling.
    paper_optimizer: ClassVar[OptimizerRecipe] = OptimizerRecipe(
        name="sgd", lr=0.01, lr_scaling="none", warmup_epochs=0, lr_schedule="steps", lr_milestones=(15, 30, 45),
        lr_gamma=0.1, weight_decay=5e-4, weight_decay_end=5e-4, clip_grad=0.0, momentum=0.9, nesterov=True)
    paper_drop_path_rate: ClassVar[float] = 0.0  # AlexNet / NIN: no stochastic depth
    # ImageNet recipe (official config/ImageNet_RotNet_AlexNet.py, `random_sized_crop`): random
    # resized 224 crops and horizontal flips; all four rotations of an image in the same batch
    # (Sec. 2.2 / 3, which finds this better than one random rotation per image).
    crop_size: int = Field(224, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def trained_crop_size(self) -> int:
        return self.crop_size

    def views(self) -> Rotations:
        return Rotations(self.crop_size, self.crop_scale)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of (4B, 4) rotation logits against labels (4B,), and the accuracy in [0, 1]."""
    return F.cross_entropy(logits.float(), labels), (logits.argmax(dim=1) == labels).float().mean()


class RotNet(Method):
    """Backbone + linear rotation classifier."""

    def __init__(self, config: RotNetConfig, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        self.backbone = backbones.create(backbone, **backbone_kwargs,
                                         drop_path_rate=drop_path_rate)
        self.head = nn.Linear(self.backbone.embed_dim, NUM_ROTATIONS)

    def training_step(self, views: Views, step: int):
        loss, accuracy = rotation_loss(self.head(self.backbone(views.crops[0])), views.labels)
        return loss, {"loss": loss.detach(), "rotation_accuracy": accuracy}

    def parameter_groups(self) -> list[dict]:
        """One group: the official code's SGD decays every parameter, biases and BatchNorm included."""
        trained = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return [{"params": trained, "decay": True, "lr_multiplier": 1.0}]

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def backbone_for_eval(self) -> nn.Module:
        return self.backbone

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.backbone, self.backbone  # one network: it is student and teacher
