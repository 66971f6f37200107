"""DINOv2's Vision Transformer (Oquab et al., 2023; registers: Darcet et al., ICLR 2024).

vitrail's ViT (vit.py) with what the official `dinov2/models/vision_transformer.py` adds:
LayerScale on both residual branches, a SwiGLU feed-forward for ViT-g/14, optional register
tokens, a mask token always present, and its position-embedding interpolation (scale factor
(grid + 0.1) / stored grid, or, for the register models, the exact output size with
antialiasing). State-dict keys are the official ones (`cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.i.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}`, `norm`), so the released hub
checkpoints (`dinov2_vits14_pretrain.pth`, `dinov2_vits14_reg4_pretrain.pth`, ...) load with
`strict=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.vit import Attention, DropPath, Mlp, VisionTransformer

# dinov2/hub/backbones.py: patch 14 on a 518 grid (37 x 37 positions) for every released model;
# ViT-g/14 is the official `vit_giant2` (1536 wide, 24 heads of 64) with the SwiGLU feed-forward.
# The register models interpolate positions with antialiasing and no offset.
_SIZES = {
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
_REGISTERS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
VARIANTS = {
    f"dinov2_vit{size}14{suffix}": dict(img_size=518, patch_size=14, **shape, **registers)
    for size, shape in _SIZES.items()
    for suffix, registers in (("", {}), ("_reg4", _REGISTERS))
}


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (Touvron et al. 2021, CaiT), key `gamma`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020) as the official SwiGLUFFNFused: the hidden width is
    2/3 of the MLP's, rounded up to a multiple of 8; `w12` holds both input projections."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on the attention and feed-forward branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn: str, layer_scale: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)
        # Per-sample stochastic depth; the official block drops a random subset of exactly
        # rate x B samples when rate > 0.1, the same in expectation.
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class DinoVisionTransformer(VisionTransformer):
    """DINOv2's ViT; features are the final-norm CLS token, `forward_features` also gives the
    patch tokens (registers excluded, as the official `x_norm_patchtokens`).

    Defaults are the official training recipe's (ssl_default_config.yaml `student`): LayerScale
    initialised at 1e-5 (the released models hold trained values; hub models built without
    weights start at 1.0), uniform stochastic depth, position offset 0.1.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        layer_scale: float = 1e-5,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
    ):
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', not {ffn!r}")
        # The ViT's patch embedding, CLS / position / mask tokens and final norm; DINOv2's own blocks.
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth=0, num_heads=num_heads, mask_token=True)
        rates = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth,
                                                                                  device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, ffn, layer_scale, rate) for rate in rates)
        self.num_register_tokens = num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self._init_weights()
        # Official init_weights: CLS and register tokens N(0, 1e-6), the rest as the ViT's.
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a (grid_h, grid_w) patch grid, the official way (bicubic, in float32)."""
        stored = self.pos_embed.shape[1] - 1
        if stored == grid_h * grid_w and grid_h == grid_w:
            return self.pos_embed
        side = math.isqrt(stored)
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The official kludge (DINO issue #8), kept because the released weights were trained with
            # it: a scale factor of (grid + offset) / side rather than the output size, which moves the
            # sampling positions slightly.
            size = dict(scale_factor=((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side))
        else:
            size = dict(size=(grid_h, grid_w))
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **size)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x, masks=None):
        """(B, 1 + R + N, D): CLS, the registers (which get no position embedding), then the patches."""
        x = super().prepare_tokens(x, masks)
        if self.register_tokens is None:
            return x
        return torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

    def forward_features(self, x, masks=None) -> dict[str, torch.Tensor]:
        tokens = super().forward_features(x, masks)
        return {"cls": tokens["cls"], "patches": tokens["patches"][:, self.num_register_tokens:]}

    def last_self_attention(self, x) -> torch.Tensor:
        """The last block's attention among CLS and patches (B, heads, 1+N, 1+N), register rows and columns left out."""
        attention = super().last_self_attention(x)
        keep = torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.arange(1 + self.num_register_tokens, attention.shape[-1])]).to(attention.device)
        return attention.index_select(-2, keep).index_select(-1, keep)
