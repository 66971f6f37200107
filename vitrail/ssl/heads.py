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

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and App. C): a `num_layers` MLP
    (hidden 2048, GELU) to a 256-d bottleneck, l2-normalisation, then a weight-normalised
    linear layer to `out_dim` prototypes. The methods keep `last_layer` frozen for the first
    epoch by cancelling its gradients after backward (`Method.after_backward`).
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

    def forward(self, x):
        # The l2-normalisation in float32, as CUDA autocast runs `norm` (CPU autocast would keep bf16).
        return self.last_layer(F.normalize(self.mlp(x).float(), dim=-1, p=2))

    def last_layers(self) -> list[nn.Module]:
        """The weight-normalised layers frozen in the first epoch."""
        return [self.last_layer]


class IBOTHead(DINOHead):
    """iBOT's head (Zhou et al. 2022, Sec. 3.2 / official iBOTHead): DINO's head on the CLS token
    and, through the same MLP, on every patch token. Patch tokens get their own last layer of
    `patch_out_dim` prototypes unless `shared_head`, in which case they share the CLS one.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, shared_head: bool, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers, False, norm_last_layer)
        self.patch_last_layer = None if shared_head else WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer)

    def forward_tokens(self, cls: torch.Tensor, patches: torch.Tensor):
        """cls (B, D), patches (B, N, D) -> (B, out_dim), (B, N, patch_out_dim)."""
        patches = F.normalize(self.mlp(patches).float(), dim=-1, p=2)
        last_layer = self.patch_last_layer or self.last_layer
        return self(cls), last_layer(patches)

    def last_layers(self) -> list[nn.Module]:
        return [self.last_layer] + ([self.patch_last_layer] if self.patch_last_layer is not None else [])
