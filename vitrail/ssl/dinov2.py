"""DINOv2: learning robust visual features without supervision (Oquab et al., TMLR 2024, arXiv:2304.07193).

DINO's self-distillation of the CLS token across views (Sec. 4, "image-level objective") plus
iBOT's masked patch distillation (the student's masked global crops predict, at each masked
position, the teacher's distribution for that patch of the unmasked crop), with the teacher's
targets centred either by DINO's EMA centre or by three Sinkhorn-Knopp iterations (SwAV), a
KoLeo regulariser spreading the student's CLS features within a batch, and the optimizer
details of the official code (layer-wise lr decay, a patch-embedding lr multiplier, sqrt lr
scaling, clipping by module norm). Defaults are the official `ssl_default_config.yaml`; where
the paper and the code differ, the code's. Trains the `dinov2_*` backbones (vitrail.backbones.dinov2).
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vitrail import backbones
from vitrail.backbones.dinov2 import VARIANTS as DINOV2_BACKBONES
from vitrail.errors import VitrailError
from vitrail.pipelines.augment import _uniform
from vitrail.pipelines.views import Views, blocks_mask, sample_generator
from vitrail.ssl.base import Method, cancel_gradients
from vitrail.ssl.dino import Centre, DINOConfig, multi_view_cross_entropy
from vitrail.ssl.ema import start_teacher, update_teacher
from vitrail.ssl.heads import DINOHead
from vitrail.ssl.optim import OptimizerRecipe
from vitrail.ssl.schedules import cosine, linear_warmup


class DINOv2Config(DINOConfig):
    """DINO's settings with DINOv2's values (ssl_default_config.yaml), plus its own."""

    name: Literal["dinov2"] = "dinov2"
    # optim (ssl_default_config.yaml): AdamW (betas 0.9, 0.999), base_lr 0.004 x sqrt(batch / 1024)
    # (scaling_rule sqrt_wrt_1024), 10 warm-up epochs, cosine to 1e-6; weight decay cosine 0.04 ->
    # 0.4; clip_grad 3.0 (by module norm); student.drop_path_rate 0.3.
    paper_optimizer: ClassVar[OptimizerRecipe] = OptimizerRecipe(
        name="adamw", lr=4e-3, lr_scaling="sqrt_1024", warmup_epochs=10, min_lr=1e-6,
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0)
    paper_drop_path_rate: ClassVar[float] = 0.3
    # dino: 65536 prototypes, bottleneck 256, 3 layers, hidden 2048 (DINOConfig's); the official head's
    # weight-normalised last layer starts at norm 1 and trains (DINOHead, no norm_last_layer).
    norm_last_layer: bool = False
    # teacher: momentum 0.992 -> 1 (cosine); temperature 0.04 -> 0.07 over 30 epochs (DINOConfig's).
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    # crops: 2 x 224 of scale (0.32, 1), 8 x 96 of (0.05, 0.32). 96 is a multiple of the default
    # config's 16-px patches; the official /14 recipes (train/vitl14.yaml) use 98.
    local_crops_number: int = Field(8, ge=0)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    # train.centering: DINO's EMA centre ("centering") or Sinkhorn-Knopp ("sinkhorn_knopp", 3 iterations).
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    # Loss weights (dino.loss_weight, dino.koleo_loss_weight, ibot.loss_weight).
    dino_loss_weight: float = Field(1.0, ge=0)
    koleo_loss_weight: float = Field(0.1, ge=0)
    ibot_loss_weight: float = Field(1.0, ge=0)
    # ibot.separate_head false: patches go through the DINO head. A separate iBOT head has its own
    # ibot.head_* sizes (the official defaults equal the DINO head's).
    separate_head: bool = False
    ibot_out_dim: int = Field(65536, ge=1)
    ibot_hidden_dim: int = Field(2048, ge=1)
    ibot_bottleneck_dim: int = Field(256, ge=1)
    ibot_head_layers: int = Field(3, ge=1)
    # ibot.mask_sample_probability 0.5 of the global crops masked, their ratios spread evenly over
    # ibot.mask_ratio_min_max (0.1, 0.5); MaskingGenerator's blocks: at least 4 patches, at most half
    # the grid, aspect 0.3 to 1/0.3 (train.py / data/masking.py).
    mask_probability: float = Field(0.5, ge=0, le=1)
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = Field(4, ge=1)
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    # optim.layerwise_decay and optim.patch_embed_lr_mult (utils/param_groups.py).
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)

    @model_validator(mode="after")
    def _supported(self):
        if self.use_bn_in_head:
            raise ValueError("method.use_bn_in_head is not available for DINOv2 (the official code refuses BatchNorm)")
        low, high = self.mask_ratio_range
        if not 0 <= low <= high <= 1:
            raise ValueError("method.mask_ratio_range must be (low, high) with 0 <= low <= high <= 1, "
                             f"got {self.mask_ratio_range}")
        return self


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2019; DINOv2 Sec. 4): minus the
    mean log distance of each l2-normalised feature to its nearest neighbour in the batch."""

    def forward(self, student_cls: torch.Tensor) -> torch.Tensor:
        """student_cls (B, D) -> scalar."""
        with torch.autocast(student_cls.device.type, enabled=False):  # float32 distances, as the official
            features = F.normalize(student_cls.float(), p=2, dim=-1, eps=1e-8)
            similarities = features @ features.t()
            similarities.fill_diagonal_(-1.0)  # a point is not its own neighbour (cosines are >= -1)
            neighbours = similarities.argmax(dim=1)
            distances = F.pairwise_distance(features, features[neighbours], p=2, eps=1e-8)
            return -torch.log(distances + 1e-8).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets (B, K), each row a distribution, from logits (B, K) by Sinkhorn-Knopp
    (SwAV, Caron et al. 2020, App. A; DINOv2 Sec. 4): Q = exp(logits / T) is scaled alternately so
    that every prototype holds 1/K of the mass and every sample 1/B. Under torch.distributed the
    sums run over every worker's rows, B being their total. The last scaling is the samples', so
    rows sum to 1 exactly and each prototype's column sums to about B/K."""
    logits = teacher_logits.float() / teacher_temp
    distributed = dist.is_available() and dist.is_initialized()
    # The global maximum is subtracted before exp (the official code does not): the same Q after the
    # first normalisation, without overflow.
    peak = logits.max()
    count = torch.tensor(float(logits.shape[0]), device=logits.device)
    if distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(count)
    q = torch.exp(logits - peak).t()  # (K, B)
    num_prototypes = q.shape[0]
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        q /= per_prototype * num_prototypes
        q /= q.sum(dim=0, keepdim=True) * count
    return (q * count).t()


def masked_patch_loss(student_logits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """iBOT's loss as the official iBOTPatchLoss.forward_masked: student logits and teacher targets
    (M, K) at the M masked positions of `masks` (n, N) in row-major order; the cross-entropy of each
    image is averaged over its masked patches, then summed over images and divided by all n images
    (an unmasked image counts 0)."""
    per_patch = torch.sum(-targets * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)  # (M,)
    weights = (1.0 / masks.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
    return torch.sum(per_patch * weights) / masks.shape[0]


def lr_layer(name: str, depth: int) -> int:
    """The official get_vit_lr_decay_rate's layer of a backbone parameter: 0 for the embeddings and
    the CLS / mask tokens, i + 1 for block i, depth + 1 for the rest (final norm, and the register
    tokens, which the official rule leaves undecayed too)."""
    if name.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class DINOv2(Method):
    """Student and EMA teacher, each `backbone`, `dino_head` and (separate_head) `ibot_head` as the
    official SSLMetaArch; views as `config.views()` makes them."""

    def __init__(self, config: DINOv2Config, backbone: str, backbone_kwargs: dict,
                 steps_per_epoch: int, total_steps: int, drop_path_rate: float):
        super().__init__(config, steps_per_epoch, total_steps)
        if backbone not in DINOV2_BACKBONES:
            raise VitrailError(f"model.backbone={backbone!r}: DINOv2 trains the DINOv2 ViTs, one of "
                               f"{', '.join(DINOV2_BACKBONES)}")
        self.student = self.network(backbone, backbone_kwargs, drop_path_rate)
        # The teacher has no stochastic depth and starts as the student (official ssl_meta_arch.py).
        self.teacher = start_teacher(self.student, self.network(backbone, backbone_kwargs, 0.0))
        patch = self.student.backbone.patch_size
        if config.global_crop_size % patch:
            raise VitrailError(f"method.global_crop_size={config.global_crop_size} must be a multiple of the "
                               f"backbone's {patch}-pixel patches, so that masks cover whole patches")
        self.mask_grid = config.global_crop_size // patch
        # The CLS and the masked patches' targets each have their own centre (centering: "centering").
        self.cls_center = Centre(config.out_dim, config.center_momentum)
        self.patch_center = Centre(config.ibot_out_dim if config.separate_head else config.out_dim, config.center_momentum)
        self.koleo = KoLeoLoss()
        # Masks are drawn from (mask_seed, step, rank), so a resumed run draws the same ones.
        self.register_buffer("mask_seed", torch.randint(0, 2**62, ()))

    def network(self, backbone: str, backbone_kwargs: dict, drop_path: float) -> nn.ModuleDict:
        config = self.config
        parts = {"backbone": backbones.create(backbone, **backbone_kwargs, drop_path_rate=drop_path)}
        width = parts["backbone"].embed_dim
        parts["dino_head"] = DINOHead(width, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                                      config.head_layers, norm_last_layer=config.norm_last_layer)
        if config.separate_head:
            parts["ibot_head"] = DINOHead(width, config.ibot_out_dim, config.ibot_hidden_dim, config.ibot_bottleneck_dim,
                                          config.ibot_head_layers, norm_last_layer=config.norm_last_layer)
        return nn.ModuleDict(parts)

    def patch_head(self, network: nn.ModuleDict) -> nn.Module:
        return network["ibot_head"] if self.config.separate_head else network["dino_head"]

    def teacher_temp(self, step: int) -> float:
        warmup_steps = int(self.config.warmup_teacher_temp_epochs * self.steps_per_epoch)
        return linear_warmup(step, warmup_steps, self.config.warmup_teacher_temp, self.config.teacher_temp)

    # -- optimizer (official utils/param_groups.py and train/train.py) ----------------------------
    def parameter_groups(self) -> list[dict]:
        """Backbone learning rates decay by `layerwise_decay` per block from the last (the patch
        embedding's is further multiplied by `patch_embed_lr_mult`); heads at the full rate. No
        weight decay on biases, norms and LayerScale gammas."""
        depth = len(self.student.backbone.blocks)
        groups = defaultdict(list)
        for name, parameter in self.student.named_parameters():
            if not parameter.requires_grad:
                continue
            multiplier = 1.0
            if name.startswith("backbone."):
                name = name.removeprefix("backbone.")
                multiplier = self.config.layerwise_decay ** (depth + 1 - lr_layer(name, depth))
                if name.startswith("patch_embed"):
                    multiplier *= self.config.patch_embed_lr_mult
            decay = not (name.endswith(".bias") or "norm" in name or "gamma" in name)
            groups[multiplier, decay].append(parameter)
        return [{"params": params, "lr_multiplier": multiplier, "decay": decay, "weight_decay": 0.0}
                for (multiplier, decay), params in groups.items()]

    def clip_gradients(self, max_norm: float) -> None:
        """The official clip: the gradient norm of each student part (backbone, heads) as a whole."""
        for part in self.student.values():
            nn.utils.clip_grad_norm_(part.parameters(), max_norm)

    # -- training step --------------------------------------------------------------------------
    def draw_masks(self, count: int, step: int) -> torch.Tensor:
        """(count, N) bool masks over the patch grid, as the official collate_data_and_cast: the
        first int(count x mask_probability) get ratios drawn from consecutive equal slices of
        `mask_ratio_range`, the rest none, in a shuffled order."""
        config = self.config
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = sample_generator(int(self.mask_seed), step, f"rank{rank}")
        grid, patches = self.mask_grid, self.mask_grid ** 2
        masked = int(count * config.mask_probability)
        edges = torch.linspace(*config.mask_ratio_range, masked + 1).tolist()
        masks = [blocks_mask(grid, grid, int(patches * _uniform(generator, edges[i], edges[i + 1])),
                             config.mask_min_patches, 0.5 * patches, config.mask_aspect, generator)
                 for i in range(masked)]
        masks += [torch.zeros(grid, grid, dtype=torch.bool)] * (count - masked)
        return torch.stack(masks)[torch.randperm(count, generator=generator)].flatten(1)

    def targets(self, logits: torch.Tensor, temperature: float, centre: Centre) -> torch.Tensor:
        """Teacher targets (n, K) from logits (n, K): Sinkhorn-Knopp, or the softmax of the logits
        minus `centre`'s EMA, which is then updated with them."""
        if self.config.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature)
        probs = F.softmax((logits.float() - centre.center) / temperature, dim=-1)
        centre.update([logits])
        return probs

    def patch_loss(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor, masks: torch.Tensor,
                   temperature: float) -> torch.Tensor:
        """iBOT term from backbone patch tokens (n, N, D) of the student (masked crops) and the
        teacher (unmasked crops): both heads run on the masked positions only."""
        with torch.no_grad():
            targets = self.targets(self.patch_head(self.teacher)(teacher_patches[masks]), temperature, self.patch_center)
        student = self.patch_head(self.student)(student_patches[masks])
        return masked_patch_loss(student, targets, masks, self.config.student_temp)

    def training_step(self, views: Views, step: int):
        config = self.config
        global_crops, local_crops = torch.cat(views.crops[:2]), views.crops[2:]  # (2B, C, G, G): crop 0 of every image, then crop 1
        masks = self.draw_masks(len(global_crops), step).to(global_crops.device)  # (2B, N)
        temperature = self.teacher_temp(step)
        with torch.no_grad():
            teacher = self.teacher.backbone.forward_features(global_crops)
            cls_targets = self.targets(self.teacher.dino_head(teacher["cls"]), temperature, self.cls_center)  # (2B, K)
        student = self.student.backbone.forward_features(global_crops, masks)
        student_cls = [self.student.dino_head(student["cls"])]
        if local_crops:
            student_cls.append(self.student.dino_head(self.student.backbone(torch.cat(local_crops))))
        # Every (teacher global crop, other student crop) pair, as the official global + local DINO terms.
        dino_loss = multi_view_cross_entropy(list(torch.cat(student_cls).chunk(2 + len(local_crops))),
                                             list(cls_targets.chunk(2)), config.student_temp)
        # KoLeo within each global crop's batch, never between two crops of one image; the two summed.
        koleo_loss = sum(self.koleo(cls) for cls in student["cls"].chunk(2))
        ibot_loss = self.patch_loss(student["patches"], teacher["patches"], masks, temperature)
        loss = (config.dino_loss_weight * dino_loss + config.koleo_loss_weight * koleo_loss
                + config.ibot_loss_weight * ibot_loss)
        return loss, {
            "loss": loss.detach(), "loss_dino": dino_loss.detach(), "loss_koleo": koleo_loss.detach(),
            "loss_ibot": ibot_loss.detach(), "teacher_temp": temperature, "mask_ratio": masks.float().mean(),
            "teacher_entropy": -(cls_targets * cls_targets.clamp_min(1e-12).log()).sum(-1).mean(),
        }

    def after_backward(self, step: int) -> None:
        # freeze_last_layer_epochs: the official code sets the last layers' learning rate to 0 for
        # those epochs; vitrail cancels their gradients as DINO does, so AdamW leaves them and their
        # moments untouched (the official moments keep accumulating the frozen layers' gradients).
        if step < self.config.freeze_last_layer_epochs * self.steps_per_epoch:
            cancel_gradients([head.last_layer for name, head in self.student.items() if name != "backbone"])

    def after_step(self, step: int) -> dict[str, float]:
        momentum = cosine(step, self.total_steps, self.config.momentum_teacher, 1.0)
        update_teacher(self.student, self.teacher, momentum)
        return {"momentum": momentum}

    def backbone_for_eval(self) -> nn.Module:
        return self.teacher.backbone

    def backbone_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.student.backbone, self.teacher.backbone
