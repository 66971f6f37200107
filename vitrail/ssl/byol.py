"""BYOL: bootstrap your own latent (Grill et al., NeurIPS 2020, arXiv:2006.07733).

An online network (backbone, projector, predictor) regresses, through the predictor, the
projection that a target network (backbone, projector) gives of another view of the same
image. The target's weights are an exponential moving average of the online ones and it
receives no gradient; the predictor and the slow target are what keep the representation
from collapsing without negative pairs. The online backbone is the one kept (Sec. 3.1).
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitrail import backbones
from vitrail.pipelines.views import MultiCrop, Views
from vitrail.ssl.base import Method
from vitrail.ssl.ema import update_teacher
from vitrail.ssl.optim import OptimizerRecipe
from vitrail.ssl.schedules import cosine


class BYOLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["byol"] = "byol"
    # App. C: LARS (momentum 0.9, trust coefficient 1e-3, official optimizers.py), lr 0.2 x batch/256
    # with 10 warm-up epochs and a cosine decay to 0, weight decay 1.5e-6; biases and BatchNorm
    # parameters have neither weight decay nor LARS adaptation (Method.parameter_groups). No clipping.
    paper_optimizer: ClassVar[OptimizerRecipe] = OptimizerRecipe(
        name="lars", lr=0.2, lr_scaling="linear_256", warmup_epochs=10, min_lr=0.0,
        weight_decay=1.5e-6, weight_decay_end=1.5e-6, clip_grad=0.0, momentum=0.9, trust_coefficient=1e-3)
    paper_drop_path_rate: ClassVar[float] = 0.0  # ResNet-50: no stochastic depth
    # Projector and predictor (Sec. 3.3): Linear 4096, BN, ReLU, Linear 256.
    hidden_dim: int = Field(4096, ge=1)
    projection_dim: int = Field(256, ge=1)
    # Target EMA rate, cosine from its base to 1 (Sec. 3.3). 0.99 is the base of the shorter
    # (300-epoch) schedule; the 1000-epoch runs use 0.996.
    momentum_target: float = Field(0.99, ge=0, le=1)
    # Augmentations (App. B, Table 6): 224 crops of scale (0.08, 1); blur 1.0 / 0.1 and
    # solarisation 0 / 0.2 on view 1 / 2; colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8; grey 0.2.
    crop_size: int = Field(224, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def trained_crop_size(self) -> int:
        return self.crop_size

    def views(self) -> MultiCrop:
        # DINO adopted BYOL's asymmetric pair for its two global crops, so that recipe without
        # local crops is exactly BYOL's.
        return MultiCrop(self.crop_size, num_local=0, global_scale=self.crop_scale, blur_sigma=self.blur_sigma)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear, BatchNorm, ReLU, Linear (Sec. 3.3)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target) per sample (Eq. 2), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()


class BYOL(Method):
    """Online and EMA target networks, trained on two views of each image."""

    def __init__(self, config: BYOLConfig, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        trunk = backbones.create(backbone, **backbone_kwargs, drop_path_rate=drop_path_rate)
        self.online = nn.Sequential(trunk, mlp(trunk.embed_dim, config.hidden_dim, config.projection_dim))
        self.predictor = mlp(config.projection_dim, config.hidden_dim, config.projection_dim)
        self.target = copy.deepcopy(self.online)
        for parameter in self.target.parameters():
            parameter.requires_grad = False

    def momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.config.momentum_target, 1.0)

    def training_step(self, views: Views, step: int):
        both = torch.cat(views.crops[:2])
        predictions = self.predictor(self.online(both)).chunk(2)
        with torch.no_grad():
            targets = self.target(both).chunk(2)
        # Symmetrised (Sec. 3.1): each view's prediction regresses the other view's target.
        loss_12 = regression_loss(predictions[0], targets[1])
        loss_21 = regression_loss(predictions[1], targets[0])
        loss = loss_12 + loss_21
        with torch.no_grad():
            # Near 1 with a collapsed or trivially matched target; it should rise from ~0 gradually.
            cosine_similarity = 1 - loss.detach() / 4
            # Collapse to a constant shows as the target projections' per-dimension std -> 0.
            target_std = F.normalize(torch.cat(targets).float(), dim=-1).std(dim=0).mean()
        return loss, {"loss": loss.detach(), "loss_12": loss_12.detach(), "loss_21": loss_21.detach(),
                      "cosine_similarity": cosine_similarity, "target_std": target_std}

    def after_step(self, step: int) -> dict[str, float]:
        momentum = self.momentum(step)
        update_teacher(self.online, self.target, momentum)
        return {"momentum": momentum}

    def backbone_for_eval(self) -> nn.Module:
        return self.online[0]

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.online[0], self.target[0]
