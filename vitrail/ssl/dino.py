"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294).

A student network is trained to match, through a cross-entropy, the output distribution of
a teacher network whose weights are an exponential moving average of the student's. The
teacher sees only the two global crops; the student sees every crop. Collapse is avoided by
centring (subtracting a running mean of the teacher outputs) and sharpening (a low teacher
temperature) the teacher's distribution. Defaults are the paper's ViT-S/16 recipe.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitrail import backbones
from vitrail.pipelines.views import MultiCrop
from vitrail.pipelines.views import Views
from vitrail.ssl.base import Method, cancel_gradients
from vitrail.ssl.ema import start_teacher, update_teacher
from vitrail.ssl.heads import DINOHead
from vitrail.ssl.optim import OptimizerRecipe
from vitrail.ssl.schedules import cosine, linear_warmup


class DINOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["dino"] = "dino"
    # Sec. 4 / App. (ViT-S/16 recipe, official main_dino.py): AdamW, lr 5e-4 x batch/256 with 10
    # warm-up epochs and a cosine to 1e-6; weight decay cosine 0.04 -> 0.4; per-parameter gradient
    # clipping at 3.0. Stochastic depth 0.1 in the student.
    paper_optimizer: ClassVar[OptimizerRecipe] = OptimizerRecipe(
        name="adamw", lr=5e-4, lr_scaling="linear_256", warmup_epochs=10, min_lr=1e-6,
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0)
    paper_drop_path_rate: ClassVar[float] = 0.1
    # Head (Sec. 3.1, App. C): 3-layer MLP, hidden 2048, bottleneck 256, K = 65536 prototypes.
    out_dim: int = Field(65536, ge=1)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    # Temperatures (Sec. 3.1, App. D): student 0.1; teacher 0.04 -> 0.07 over the first 30 epochs.
    student_temp: float = Field(0.1, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    # Teacher EMA momentum, cosine from 0.996 to 1 over training (Sec. 3.1).
    momentum_teacher: float = Field(0.996, ge=0, le=1)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    # Multi-crop (Sec. 3.1): 2 global 224 crops of scale (0.4, 1), 10 local 96 crops of (0.05, 0.4).
    global_crop_size: int = Field(224, ge=1)
    local_crop_size: int = Field(96, ge=1)
    local_crops_number: int = Field(10, ge=0)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def trained_crop_size(self) -> int:
        return self.global_crop_size

    def views(self) -> MultiCrop:
        return MultiCrop(self.global_crop_size, self.local_crop_size, self.local_crops_number,
                         self.global_crops_scale, self.local_crops_scale, self.blur_sigma)


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax and the student log-softmax,
    over every (teacher global view, student view) pair except a view with itself (Eq. 3),
    averaged over pairs. The centre is an EMA of the teacher's batch mean (Eq. 4)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], teacher_temp: float):
        teacher_probs = [F.softmax((t.detach().float() - self.center) / teacher_temp, dim=-1) for t in teacher_out]
        loss = multi_view_cross_entropy(student_out, teacher_probs, self.student_temp)
        self.update_center(teacher_out)
        return loss

    def update_center(self, teacher_out: list[torch.Tensor]) -> None:
        update_centre(self.center, teacher_out, self.center_momentum)


class Centre(nn.Module):
    """A centre (1, K) of teacher outputs on its own, with Eq. 4's update (DINOv2's two)."""

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def update(self, teacher_out: list[torch.Tensor]) -> None:
        update_centre(self.center, teacher_out, self.momentum)


@torch.no_grad()
def update_centre(center: torch.Tensor, teacher_out: list[torch.Tensor], momentum: float) -> None:
    """Eq. 4: center (1, K) <- momentum center + (1 - momentum) mean of the teacher outputs (n, K)
    of every view, the mean taken over every worker's batch."""
    outputs = torch.cat([t.detach().float() for t in teacher_out])
    batch_sum = outputs.sum(dim=0, keepdim=True)
    count = torch.tensor(float(outputs.shape[0]), device=outputs.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)


def multi_view_cross_entropy(student_out: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                             student_temp: float) -> torch.Tensor:
    """Eq. 3: cross-entropy between each teacher view's target distribution (B, K) and the
    student's softmax at `student_temp` for every other view, averaged over batch and pairs.
    The first len(teacher_probs) student views are the teacher's views, in the same order."""
    student_log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    total, pairs = 0.0, 0
    for teacher_view, q in enumerate(teacher_probs):
        for student_view, log_p in enumerate(student_log_probs):
            if student_view == teacher_view:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def teacher_entropy(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean entropy of the teacher's targets: ln(out_dim) means collapse to uniform, 0 to one prototype."""
    probs = F.softmax((logits.float() - center) / temperature, dim=-1)
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


class _Network(nn.Module):
    """Backbone + head applied to crops grouped by resolution (one backbone pass per size)."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return list(self.head(torch.cat(features)).chunk(len(crops)))


class DINO(Method):
    """Student and EMA teacher, each backbone + DINO head; views as `config.views()` makes them."""

    def __init__(self, config: DINOConfig, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        self.student = self.network(backbone, backbone_kwargs, drop_path_rate)
        # The teacher has no stochastic depth (official main_dino.py) and starts as the student.
        self.teacher = start_teacher(self.student, self.network(backbone, backbone_kwargs, 0.0))
        self.loss = DINOLoss(config.out_dim, config.student_temp, config.center_momentum)

    def network(self, backbone: str, backbone_kwargs: dict, drop_path: float) -> _Network:
        config = self.config
        trunk = backbones.create(backbone, **backbone_kwargs, drop_path_rate=drop_path)
        head = DINOHead(trunk.embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                        config.head_layers, config.use_bn_in_head, config.norm_last_layer)
        return _Network(trunk, head)

    def teacher_temp(self, step: int) -> float:
        warmup_steps = int(self.config.warmup_teacher_temp_epochs * self.steps_per_epoch)
        return linear_warmup(step, warmup_steps, self.config.warmup_teacher_temp, self.config.teacher_temp)

    def momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.config.momentum_teacher, 1.0)

    def training_step(self, views: Views, step: int):
        with torch.no_grad():
            teacher_out = self.teacher(views.crops[:2])
        student_out = self.student(views.crops)
        teacher_temp = self.teacher_temp(step)
        with torch.no_grad():
            entropy = teacher_entropy(teacher_out[0], self.loss.center, teacher_temp)
        loss = self.loss(student_out, teacher_out, teacher_temp)
        return loss, {
            "loss": loss.detach(),
            "teacher_entropy": entropy,
            "center_norm": self.loss.center.norm(),
            "teacher_temp": teacher_temp,
        }

    def after_backward(self, step: int) -> None:
        # The last layer learns nothing in the first epoch(s) (Sec. 3.1, App.; official
        # cancel_gradients_last_layer): weight_g and weight_v keep their initial values.
        if step < self.config.freeze_last_layer_epochs * self.steps_per_epoch:
            cancel_gradients(self.student.head.last_layers())

    def after_step(self, step: int) -> dict[str, float]:
        momentum = self.momentum(step)
        update_teacher(self.student, self.teacher, momentum)
        return {"momentum": momentum}

    def backbone_for_eval(self) -> nn.Module:
        return self.teacher.backbone

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.student.backbone, self.teacher.backbone
