"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

State-dict keys follow the official DINO / timm ViT (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
optional `head`), so released DINO backbones load with `strict=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.capabilities import Capabilities

VARIANTS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def queries_keys_values(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.queries_keys_values(x)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))

    def weights(self, x) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)): (B, heads, N, N), spelled out since SDPA never returns it."""
        q, k, _ = self.queries_keys_values(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # (B, D, H/p, W/p)


def resample_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + n*n, D) embeddings of a square n x n grid -> (1, 1 + grid_h * grid_w, D), patch positions
    resized bicubically; the CLS position is kept as is."""
    stored = pos_embed.shape[1] - 1
    if stored == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(stored))
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone whose features are the final-norm CLS token.

    `img_size` only sets the stored position-embedding grid; any input whose sides are at
    least one patch runs, with the patch position embeddings interpolated bicubically
    (the CLS position is kept as is).
    """

    capabilities = Capabilities(patch_tokens=True, block_cls=True, cls_attention=True)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # Only iBOT-style training needs it; leaving it out keeps DINO checkpoints strict-loadable.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: buildable on the meta device
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a (grid_h, grid_w) patch grid: (1, 1 + grid_h * grid_w, D)."""
        return resample_pos_embed(self.pos_embed, grid_h, grid_w)

    def prepare_tokens(self, x, masks=None):
        """Patchify, replace masked patches by the mask token, add CLS and positions: (B, 1+N, D)."""
        x = self.patch_embed(x)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this ViT was built without a mask token; pass mask_token=True")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.interpolate_pos_embed(grid_h, grid_w)

    @property
    def token_stride(self) -> int:
        """Input pixels per side of one output patch token."""
        return self.patch_size

    def forward_features(self, x, masks=None) -> dict[str, torch.Tensor]:
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return {"cls": x[:, 0], "patches": x[:, 1:]}

    def get_intermediate_layers(self, x, n: int = 1) -> list[torch.Tensor]:
        """Final-normed tokens (B, 1+N, D) of the last `n` blocks, as DINO's linear probe uses."""
        x = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def intermediate_cls(self, x, n: int = 4) -> torch.Tensor:
        """(B, n, D) final-normed CLS tokens of the last `n` blocks, oldest first (DINO's ViT-S linear probe: n=4)."""
        return torch.stack([tokens[:, 0] for tokens in self.get_intermediate_layers(x, n)], dim=1)

    def last_self_attention(self, x) -> torch.Tensor:
        """The last block's attention weights (B, heads, 1+N, 1+N); row 0 is the CLS token's (DINO's maps)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))

    def forward(self, x):
        cls = self.forward_features(x)["cls"]
        return self.head(cls) if self.head is not None else cls
