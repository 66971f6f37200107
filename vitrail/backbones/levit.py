"""LeViT (Graham et al., 2021, "LeViT: a Vision Transformer in ConvNet's Clothing").

State-dict keys follow timm's `Levit` / `LevitDistilled` (`stem.convK.{linear,bn}`,
`stages.i.downsample.{attn_downsample,mlp}`, `stages.i.blocks.j.{attn,mlp}`, optional
`head` and `head_dist`), so timm checkpoints load with `strict=True` (unfused weights).

Attention biases are learned per (head, |dy| * W + |dx|) at the training resolution. For any
other input the bias indices are recomputed for the new grid from that same table, so smaller
crops reuse the trained biases exactly; offsets beyond the trained grid (larger inputs) share
the bias of the farthest trained offset.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.capabilities import Capabilities
from vitrail.backbones.vit import DropPath

# Table 1 of the paper: stage widths, key dim D, heads per stage and depths.
VARIANTS = {
    "levit_128s": dict(stage_dims=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depths=(2, 3, 4)),
    "levit_128": dict(stage_dims=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depths=(4, 4, 4)),
    "levit_192": dict(stage_dims=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depths=(4, 4, 4)),
    "levit_256": dict(stage_dims=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depths=(4, 4, 4)),
    "levit_384": dict(stage_dims=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depths=(4, 4, 4)),
}

_STEM_STRIDE = 16  # four stride-2 3x3 convolutions (Section 4.2)


@lru_cache(maxsize=64)
def attention_bias_index(grid: tuple[int, int], stride: int, table_grid: tuple[int, int]) -> torch.Tensor:
    """(queries, keys) index into a bias table learned on `table_grid`; queries every `stride`."""
    key_y, key_x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    query_y, query_x = key_y[::stride, ::stride].flatten(), key_x[::stride, ::stride].flatten()
    dy = (query_y[:, None] - key_y.flatten()[None, :]).abs().clamp(max=table_grid[0] - 1)
    dx = (query_x[:, None] - key_x.flatten()[None, :]).abs().clamp(max=table_grid[1] - 1)
    return dy * table_grid[1] + dx


class ConvNorm(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """Linear layer followed by BatchNorm over all tokens (Section 4.2: BN instead of LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int, zero_init: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)
        if zero_init:  # residual branches start as identity
            nn.init.zeros_(self.bn.weight)

    def forward(self, x):  # (B, N, C)
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """Classifier: BatchNorm then linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.bn(x))


def _projection(in_dim: int, out_dim: int, zero_init: bool) -> nn.Sequential:
    return nn.Sequential(OrderedDict(act=nn.Hardswish(), ln=LinearNorm(in_dim, out_dim, zero_init)))


class Attention(nn.Module):
    """Multi-head attention with per-head learned position biases added to the logits."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, table_grid):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = int(attn_ratio * key_dim)
        self.table_grid = table_grid
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = _projection(num_heads * self.value_dim, dim, zero_init=True)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, table_grid[0] * table_grid[1]))

    def forward(self, x, grid):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.value_dim], dim=3
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, dim)
        index = attention_bias_index(grid, 1, self.table_grid).to(x.device)
        bias = self.attention_biases[:, index].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))


class QuerySubsample(nn.Module):
    """Queries of the shrink attention: every second token of the grid, then LinearNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.ln = LinearNorm(in_dim, out_dim)

    def forward(self, x, grid):
        batch, _, channels = x.shape
        x = x.view(batch, grid[0], grid[1], channels)[:, ::2, ::2]
        return self.ln(x.reshape(batch, -1, channels))


class AttentionSubsample(nn.Module):
    """Shrink attention between stages (Section 4.2): halves the grid, changes the width."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads, attn_ratio, table_grid):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = int(attn_ratio * key_dim)
        self.table_grid = table_grid
        self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.value_dim))
        self.q = QuerySubsample(in_dim, num_heads * key_dim)
        self.proj = _projection(num_heads * self.value_dim, out_dim, zero_init=False)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, table_grid[0] * table_grid[1]))

    def forward(self, x, grid):
        batch, tokens, _ = x.shape
        k, v = self.kv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.value_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q(x, grid)
        q = q.view(batch, q.shape[1], self.num_heads, self.key_dim).transpose(1, 2)
        index = attention_bias_index(grid, 2, self.table_grid).to(x.device)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attention_biases[:, index].to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(batch, q.shape[2], -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden_dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden_dim, dim, zero_init=True)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


class Block(nn.Module):
    def __init__(self, dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_grid, drop_path):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, table_grid)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x, grid):
        x = x + self.drop_path1(self.attn(x, grid))
        return x + self.drop_path2(self.mlp(x))


class Downsample(nn.Module):
    """Shrink attention followed by a residual MLP; heads = in_dim / D, ratios 4 and 2 (Section 4.2)."""

    def __init__(self, in_dim, out_dim, key_dim, table_grid, drop_path):
        super().__init__()
        self.attn_downsample = AttentionSubsample(in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, table_grid)
        self.mlp = Mlp(out_dim, 2 * out_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, grid):
        x = self.attn_downsample(x, grid)
        return x + self.drop_path(self.mlp(x))


def _halve(grid: tuple[int, int]) -> tuple[int, int]:
    return ((grid[0] + 1) // 2, (grid[1] + 1) // 2)


class Stage(nn.Module):
    def __init__(self, in_dim, dim, key_dim, depth, num_heads, attn_ratio, mlp_ratio, table_grid, downsample, drop_path):
        super().__init__()
        self.downsample = Downsample(in_dim, dim, key_dim, table_grid, drop_path) if downsample else None
        table_grid = _halve(table_grid) if downsample else table_grid
        self.blocks = nn.ModuleList(
            Block(dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_grid, drop_path) for _ in range(depth)
        )

    def forward(self, x, grid):
        if self.downsample is not None:
            x = self.downsample(x, grid)
            grid = _halve(grid)
        for block in self.blocks:
            x = block(x, grid)
        return x, grid


class LeViT(nn.Module):
    """LeViT backbone whose features are the mean of the last stage's tokens (heads dropped).

    `img_size` sets the grid the attention-bias tables are learned on (224 -> 14x14).
    With `num_classes`, both the class head and the distillation head are built and `forward`
    returns their mean, the paper's inference rule.
    """

    capabilities = Capabilities()

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        stage_dims: tuple[int, ...] = (128, 256, 384),
        key_dim: int = 16,
        num_heads: tuple[int, ...] = (4, 6, 8),
        depths: tuple[int, ...] = (2, 3, 4),
        attn_ratio: float = 2.0,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        self.embed_dim = stage_dims[-1]
        width = stage_dims[0]
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=ConvNorm(in_chans, width // 8), act1=nn.Hardswish(),
                conv2=ConvNorm(width // 8, width // 4), act2=nn.Hardswish(),
                conv3=ConvNorm(width // 4, width // 2), act3=nn.Hardswish(),
                conv4=ConvNorm(width // 2, width),
            )
        )  # fmt: skip
        table_grid = (img_size // _STEM_STRIDE, img_size // _STEM_STRIDE)
        self.stages = nn.ModuleList()
        in_dim = width
        for index, (dim, depth, heads) in enumerate(zip(stage_dims, depths, num_heads)):
            self.stages.append(
                Stage(in_dim, dim, key_dim, depth, heads, attn_ratio, mlp_ratio, table_grid, index > 0, drop_path_rate)
            )
            table_grid = _halve(table_grid) if index > 0 else table_grid
            in_dim = dim
        self.head = NormLinear(self.embed_dim, num_classes) if num_classes > 0 else None
        self.head_dist = NormLinear(self.embed_dim, num_classes) if num_classes > 0 else None

    def forward_tokens(self, x) -> torch.Tensor:
        """Last-stage tokens (B, N, D)."""
        x = self.stem(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return x

    def forward(self, x):
        features = self.forward_tokens(x).mean(dim=1)
        if self.head is None:
            return features
        return (self.head(features) + self.head_dist(features)) / 2
