"""Projection heads shared by the self-distillation methods (DINO, iBOT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output unit (Salimans & Kingma 2016).

    Keys `weight_g` (out, 1) and `weight_v` (out, in) match DINO's checkpoints. With `fix_norm`
    the norm g stays 1 (DINO's `norm_last_layer=True`), which the paper finds stabilises training.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x, frozen: bool = False):
        # Frozen: no gradient reaches g or v, as DINO's cancel_gradients_last_layer drops every
        # `last_layer` gradient and DINOv2 zeroes the last layer's learning rate.
        weight_g, weight_v = (self.weight_g.detach(), self.weight_v.detach()) if frozen else (self.weight_g, self.weight_v)
        weight = weight_g * weight_v / weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and App. C): a `num_layers` MLP
    (hidden 2048, GELU) to a 256-d bottleneck, l2-normalisation, then a weight-normalised
    linear layer to `out_dim` prototypes. `forward(x, freeze_last_layer)` keeps the last
    layer's weights out of the gradient, as the paper does for the first epoch.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        layers, width = [], in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x, freeze_last_layer: bool = False):
        # The l2-normalisation in float32, as CUDA autocast runs `norm` (CPU autocast would keep bf16).
        x = F.normalize(self.mlp(x).float(), dim=-1, p=2)
        return self.last_layer(x, frozen=freeze_last_layer)


class IBOTHead(DINOHead):
    """iBOT's head (Zhou et al. 2022, Sec. 3.2 / official iBOTHead): DINO's head on the CLS token
    and, through the same MLP, on every patch token. Patch tokens get their own last layer of
    `patch_out_dim` prototypes unless `shared_head`, in which case they share the CLS one.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, shared_head: bool, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers, False, norm_last_layer)
        self.patch_last_layer = None if shared_head else WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer)

    def forward_tokens(self, cls: torch.Tensor, patches: torch.Tensor, freeze_last_layer: bool = False):
        """cls (B, D), patches (B, N, D) -> (B, out_dim), (B, N, patch_out_dim)."""
        patches = F.normalize(self.mlp(patches).float(), dim=-1, p=2)
        last_layer = self.patch_last_layer or self.last_layer
        return self(cls, freeze_last_layer), last_layer(patches, frozen=freeze_last_layer)
