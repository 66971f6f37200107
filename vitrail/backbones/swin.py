"""Swin Transformer (Liu et al., 2021, "Hierarchical Vision Transformer using Shifted Windows").

State-dict keys follow timm's `SwinTransformer` (`patch_embed.{proj,norm}`,
`layers.i.downsample.{norm,reduction}`, `layers.i.blocks.j.{norm1,attn,norm2,mlp}`, `norm`,
optional `head.fc`), so timm / official checkpoints load with `strict=True`.

Any input size runs: each block pads its feature map to a multiple of the window and masks
the padding out of attention (with the same -100 mask as the shifted-window regions), so at
224 px nothing changes and smaller crops (96 px local crops, 28/32 px images) never attend
to padding. A feature map that fits in one window is neither shifted nor split, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.capabilities import Capabilities
from vitrail.backbones.vit import DropPath, Mlp

# Table 1 / Section 3.3 of the paper: C, layer numbers and heads (head dim 32), window 7.
VARIANTS = {
    "swin_tiny": dict(base_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(base_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(base_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

_MASKED = -100.0  # the paper's value for pairs of tokens that must not attend to each other


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the ((2w-1)², heads) relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (2, w², w²), >= 0
    return relative[0] * (2 * window - 1) + relative[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * windows, window², C)."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * windows, window², C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def _axis_labels(padded: int, size: int, window: int, shift: int) -> torch.Tensor:
    """Region label of each position along one axis of the padded, cyclically shifted map.

    Positions that wrapped around in the shift (or sit in the last window next to them) get
    their own labels, as in the paper's mask; padding gets labels no real position shares.
    """
    labels = torch.zeros(padded, dtype=torch.long)
    if shift:
        labels[padded - window : padded - shift] = 1
        labels[padded - shift :] = 2
    source = (torch.arange(padded) + shift) % padded  # where each position came from before the roll
    return labels + 3 * (source >= size)


def attention_mask(size: tuple[int, int], padded: tuple[int, int], window: int, shift: tuple[int, int], device):
    """(windows, window², window²) additive mask, or None when every pair may attend."""
    if not any(shift) and size == padded:
        return None
    rows = _axis_labels(padded[0], size[0], window, shift[0])
    cols = _axis_labels(padded[1], size[1], window, shift[1])
    labels = (rows[:, None] * 6 + cols[None, :]).to(device)  # (Hp, Wp)
    labels = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (windows, window²)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Not saved: it is a function of the window size (timm does the same).
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        """x (B * windows, window², C); mask (windows, window², window²) or None."""
        batch_windows, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B * windows, heads, window², head_dim)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            bias = (bias + mask.unsqueeze(1)).repeat(batch_windows // mask.shape[0], 1, 1, 1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(batch_windows, tokens, dim))


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window, shifted, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.window = window
        self.shift = window // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def _window_attention(self, x):
        batch, height, width, channels = x.shape
        window = self.window
        padded = (-(-height // window) * window, -(-width // window) * window)
        x = F.pad(x, (0, 0, 0, padded[1] - width, 0, padded[0] - height))
        # An axis that fits in one window gains nothing from shifting.
        shift = tuple(self.shift if size > window else 0 for size in (height, width))
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = attention_mask((height, width), padded, window, shift, x.device)
        windows = self.attn(window_partition(x, window), mask)
        x = window_reverse(windows, window, *padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width]

    def forward(self, x):  # (B, H, W, C)
        x = x + self.drop_path1(self._window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood (4C) and projects it to 2C (Section 3.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        batch, height, width, channels = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        height, width = x.shape[1:3]
        # Channel order (0,0), (1,0), (0,1), (1,1) of each neighbourhood, as the checkpoints expect.
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window, downsample, mlp_ratio, qkv_bias, drop_paths):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                SwinBlock(dim, num_heads, window, index % 2 == 1, mlp_ratio, qkv_bias, drop_paths[index])
                for index in range(depth)
            )
        )

    def forward(self, x):
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, C, H, W) -> (B, H/p, W/p, D)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClassifierHead(nn.Module):
    """Holds the linear layer under timm's `head.fc` key."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(x)


class SwinTransformer(nn.Module):
    """Swin backbone whose features are the mean of the final-normed last-stage tokens.

    `base_dim` is the paper's C (stage-1 width); `embed_dim` (the feature width) is 8C.
    """

    capabilities = Capabilities(patch_tokens=True)

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        base_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = base_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(patch_size, in_chans, base_dim)
        # Only iBOT-style training needs it; leaving it out keeps timm checkpoints strict-loadable.
        self.mask_token = nn.Parameter(torch.zeros(1, base_dim)) if mask_token else None
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))  # cpu: buildable on meta
        self.layers = nn.Sequential(
            *(
                SwinStage(
                    base_dim * 2**index, depth, heads, window_size, index > 0, mlp_ratio, qkv_bias, rate.tolist()
                )
                for index, (depth, heads, rate) in enumerate(zip(depths, num_heads, rates))
            )
        )
        self.norm = nn.LayerNorm(self.embed_dim)
        self.head = ClassifierHead(self.embed_dim, num_classes) if num_classes > 0 else None
        self._init_weights()

    def _init_weights(self):
        for name, param in self.named_parameters():
            if name.endswith("relative_position_bias_table") or name == "mask_token":
                nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def token_stride(self) -> int:
        """Input pixels per side of one output patch token: the patch size, doubled by each stage's merge."""
        return self.patch_size * 2 ** (len(self.layers) - 1)

    def forward_features(self, x, masks=None) -> dict[str, torch.Tensor]:
        """masks (B, H/4 * W/4) bool over the patch-embedding grid; "patches" are the last stage's."""
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this Swin was built without a mask token; pass mask_token=True")
            masks = masks.view(x.shape[:3]).unsqueeze(-1)
            x = torch.where(masks, self.mask_token.to(x.dtype), x)
        x = self.norm(self.layers(x)).flatten(1, 2)  # (B, N, D)
        return {"cls": x.mean(dim=1), "patches": x}

    def forward(self, x):
        features = self.forward_features(x)["cls"]
        return self.head(features) if self.head is not None else features
