"""iBOT: image BERT pre-training with online tokenizer (Zhou et al., ICLR 2022, arXiv:2111.07832).

DINO's self-distillation of the CLS token across views, plus masked image modelling in the
same distillation form: the student sees a global crop with blocks of patches replaced by a
mask token and predicts, at each masked position, the teacher's distribution for that patch
of the unmasked crop. The teacher is thus an online tokenizer. Patch outputs get their own
centre and temperature schedule. Defaults are the paper's ViT-S/16 recipe (App. A / official
README: `--shared_head true --norm_last_layer false --out_dim 8192 --pred_ratio 0 0.3
--pred_ratio_var 0 0.2 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.pipelines.views import BlockMasking, Views, sample_generator
from vitrail.ssl.base import Method, cancel_gradients
from vitrail.ssl.dino import DINOConfig, DINOLoss, teacher_entropy, update_centre
from vitrail.ssl.ema import start_teacher, update_teacher
from vitrail.ssl.heads import IBOTHead
from vitrail.ssl.optim import OptimizerRecipe
from vitrail.ssl.schedules import cosine, linear_warmup


class IBOTConfig(DINOConfig):
    """DINO's settings (temperatures, centre, EMA, multi-crop) with iBOT's values, plus its own."""

    name: Literal["ibot"] = "ibot"
    # App. A / official main_ibot.py (ViT-S/16): DINO's optimizer (AdamW, lr 5e-4 x batch/256, 10
    # warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, clip 3.0) and stochastic depth 0.1.
    paper_optimizer: ClassVar[OptimizerRecipe] = DINOConfig.paper_optimizer
    out_dim: int = Field(8192, ge=1)
    norm_last_layer: bool = False
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    # Patch head (Sec. 3.2, Table 9): 8192 prototypes; ViT-S/16 shares the CLS head's last layer.
    patch_out_dim: int = Field(8192, ge=1)
    shared_head: bool = True
    # Patch targets (App. A): their own centre, EMA 0.9; teacher temperature 0.04 -> 0.07 over
    # the same warm-up as the CLS one; both losses weighted 1.
    warmup_teacher_patch_temp: float = Field(0.04, gt=0)
    teacher_patch_temp: float = Field(0.07, gt=0)
    patch_center_momentum: float = Field(0.9, ge=0, le=1)
    cls_loss_weight: float = Field(1.0, ge=0)
    patch_loss_weight: float = Field(1.0, ge=0)
    # Blockwise masks on the global crops (Sec. 3.2, App. A): per image a ratio of 0 or U(0.1, 0.5).
    mask_ratios: tuple[float, ...] = (0.0, 0.3)
    mask_ratio_vars: tuple[float, ...] = (0.0, 0.2)
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)

    @model_validator(mode="after")
    def _masking_and_head_agree(self):
        if len(self.mask_ratios) != len(self.mask_ratio_vars):
            raise ValueError("method.mask_ratios and method.mask_ratio_vars need the same length")
        if any(var > mean for mean, var in zip(self.mask_ratios, self.mask_ratio_vars)):
            raise ValueError("each method.mask_ratio_vars value must not exceed its method.mask_ratios value")
        if self.use_bn_in_head:
            raise ValueError("method.use_bn_in_head is not available for iBOT, whose head also runs on patch tokens")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError("method.shared_head needs method.patch_out_dim equal to method.out_dim")
        return self

    def masking(self) -> BlockMasking:
        return BlockMasking(self.mask_ratios, self.mask_ratio_vars, self.mask_aspect)


class MaskedPatchLoss(nn.Module):
    """Masked image modelling as self-distillation (Eq. 2): for each global view, the
    cross-entropy between the teacher's centred, sharpened patch distribution (unmasked view)
    and the student's (masked view), summed over masked positions and divided by their count
    per image, then averaged over images (an unmasked image counts 0) and over views. The
    centre is an EMA of the teacher's per-image mean patch output."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_patches: list[torch.Tensor], teacher_patches: list[torch.Tensor],
                masks: list[torch.Tensor], teacher_temp: float):
        """Each view: student / teacher (B, N, K) logits, masks (B, N) bool."""
        total = 0.0
        for student, teacher, mask in zip(student_patches, teacher_patches, masks):
            q = F.softmax((teacher.detach().float() - self.center) / teacher_temp, dim=-1)
            per_patch = torch.sum(-q * F.log_softmax(student.float() / self.student_temp, dim=-1), dim=-1)  # (B, N)
            mask = mask.float()
            total = total + (torch.sum(per_patch * mask, dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
        update_centre(self.center, [t.mean(dim=1) for t in teacher_patches], self.center_momentum)
        return total / len(student_patches)


class _MaskedNetwork(nn.Module):
    """Backbone + iBOT head. Global crops (masked for the student) give CLS and patch outputs;
    local crops give CLS outputs only."""

    def __init__(self, backbone: nn.Module, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops: torch.Tensor, masks, local_crops: list[torch.Tensor]):
        """global_crops (V*B, C, G, G), masks (V*B, N) over the backbone's patch-embedding grid or None."""
        tokens = self.backbone.forward_features(global_crops, masks)
        cls, patches = self.head.forward_tokens(tokens["cls"], tokens["patches"])
        if local_crops:
            cls = torch.cat([cls, self.head(self.backbone(torch.cat(local_crops)))])
        return cls, patches


class IBOT(Method):
    """Student and EMA teacher with masked patch distillation; views as `config.views()` makes
    them (two global crops first). Trains any backbone that can mask patches (ViT, Swin)."""

    def __init__(self, config: IBOTConfig, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        if not backbones.supports_masking(backbone):
            raise VitrailError(f"iBOT needs a token backbone with a mask token (ViT or Swin), not {backbone!r}")
        self.student = self.network(backbone, backbone_kwargs, drop_path_rate)
        # The teacher has no stochastic depth (official main_ibot.py) and starts as the student.
        self.teacher = start_teacher(self.student, self.network(backbone, backbone_kwargs, 0.0))
        stride = self.student.backbone.token_stride
        if config.global_crop_size % stride:
            raise VitrailError(f"method.global_crop_size={config.global_crop_size} must be a multiple of the "
                               f"backbone's {stride}-pixel output patches, so that masks cover whole patches")
        self.mask_grid = config.global_crop_size // stride
        # Each output patch spans (upsample x upsample) patch embeddings (1 for ViT, 2^merges for Swin).
        self.mask_upsample = stride // self.student.backbone.patch_size
        self.masking = config.masking()
        self.loss = DINOLoss(config.out_dim, config.student_temp, config.center_momentum)
        self.patch_loss = MaskedPatchLoss(config.patch_out_dim, config.student_temp, config.patch_center_momentum)
        # Masks are drawn from (mask_seed, step, rank), so a resumed run draws the same ones.
        self.register_buffer("mask_seed", torch.randint(0, 2**62, ()))

    def network(self, backbone: str, backbone_kwargs: dict, drop_path: float) -> _MaskedNetwork:
        config = self.config
        trunk = backbones.create(backbone, **backbone_kwargs, mask_token=True, drop_path_rate=drop_path)
        head = IBOTHead(trunk.embed_dim, config.out_dim, config.patch_out_dim, config.shared_head, config.hidden_dim,
                        config.bottleneck_dim, config.head_layers, config.norm_last_layer)
        return _MaskedNetwork(trunk, head)

    def teacher_temp(self, step: int) -> float:
        warmup_steps = int(self.config.warmup_teacher_temp_epochs * self.steps_per_epoch)
        return linear_warmup(step, warmup_steps, self.config.warmup_teacher_temp, self.config.teacher_temp)

    def patch_teacher_temp(self, step: int) -> float:
        warmup_steps = int(self.config.warmup_teacher_temp_epochs * self.steps_per_epoch)
        return linear_warmup(step, warmup_steps, self.config.warmup_teacher_patch_temp, self.config.teacher_patch_temp)

    def draw_masks(self, count: int, step: int) -> torch.Tensor:
        """(count, grid, grid) bool masks over the output patch grid."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = sample_generator(int(self.mask_seed), step, f"rank{rank}")
        return self.masking(count, self.mask_grid, self.mask_grid, generator)

    def training_step(self, views: Views, step: int):
        global_crops, local_crops = views.crops[:2], views.crops[2:]
        batch = len(global_crops[0])
        masks = self.draw_masks(2 * batch, step).to(global_crops[0].device)  # (2B, g, g)
        embedding_masks = masks.repeat_interleave(self.mask_upsample, 1).repeat_interleave(self.mask_upsample, 2)
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher(torch.cat(global_crops), None, [])
        student_cls, student_patches = self.student(torch.cat(global_crops), embedding_masks.flatten(1), local_crops)
        teacher_temp, patch_temp = self.teacher_temp(step), self.patch_teacher_temp(step)
        metrics = {"teacher_entropy": teacher_entropy(teacher_cls, self.loss.center, teacher_temp),
                   "patch_teacher_entropy": teacher_entropy(teacher_patches.flatten(0, 1), self.patch_loss.center, patch_temp)}
        cls_loss = self.loss(list(student_cls.chunk(2 + len(local_crops))), list(teacher_cls.chunk(2)), teacher_temp)
        patch_loss = self.patch_loss(list(student_patches.chunk(2)), list(teacher_patches.chunk(2)),
                                     list(masks.flatten(1).chunk(2)), patch_temp)
        loss = self.config.cls_loss_weight * cls_loss + self.config.patch_loss_weight * patch_loss
        return loss, {
            "loss": loss.detach(), "loss_cls": cls_loss.detach(), "loss_patch": patch_loss.detach(), **metrics,
            "center_norm": self.loss.center.norm(), "patch_center_norm": self.patch_loss.center.norm(),
            "teacher_temp": teacher_temp, "patch_teacher_temp": patch_temp, "mask_ratio": masks.float().mean(),
        }

    def after_backward(self, step: int) -> None:
        # As DINO (official main_ibot.py, cancel_gradients_last_layer): the CLS and patch last
        # layers (weight_g and weight_v) learn nothing in the first epoch(s).
        if step < self.config.freeze_last_layer_epochs * self.steps_per_epoch:
            cancel_gradients(self.student.head.last_layers())

    def after_step(self, step: int) -> dict[str, float]:
        momentum = cosine(step, self.total_steps, self.config.momentum_teacher, 1.0)
        update_teacher(self.student, self.teacher, momentum)
        return {"momentum": momentum}

    def backbone_for_eval(self) -> nn.Module:
        return self.teacher.backbone

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.student.backbone, self.teacher.backbone
