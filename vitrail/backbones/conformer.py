"""Conformer (Peng et al., 2021, "Conformer: Local Features Coupling Global Representations").

A ResNet-style CNN branch and a ViT branch run side by side; Feature Coupling Units (FCU)
pass the CNN's feature maps to the patch tokens (FCUDown) and back (FCUUp) in every block.
There is no position embedding: the CNN branch supplies position (Section 3.2).
State-dict keys follow the official implementation (pengzhiliang/Conformer), so its
checkpoints load with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.capabilities import Capabilities
from vitrail.backbones.vit import Block
from vitrail.errors import VitrailError

# Table 1 of the paper: channel ratio of the CNN branch, transformer width and heads.
VARIANTS = {
    "conformer_tiny": dict(channel_ratio=1, trans_dim=384, num_heads=6),
    "conformer_small": dict(channel_ratio=4, trans_dim=384, num_heads=6),
    "conformer_base": dict(channel_ratio=6, trans_dim=576, num_heads=9),
}

_BN_EPS = 1e-6  # the official code's BatchNorm epsilon inside blocks and FCUs
_EXPANSION = 4  # bottleneck expansion, as in ResNet


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class ConvBlock(nn.Module):
    """ResNet bottleneck that also returns its 3x3 features and can add FCUUp's map before them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, res_conv: bool = False):
        super().__init__()
        mid = out_channels // _EXPANSION
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = _norm(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = _norm(out_channels)
        if res_conv:
            self.residual_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.residual_bn = _norm(out_channels)
        self.res_conv = res_conv

    def forward(self, x, from_tokens=None):
        """Returns (output, 3x3 features); `from_tokens` is FCUUp's map for the 3x3 conv."""
        residual = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        x = F.relu(self.bn1(self.conv1(x)))
        mid = F.relu(self.bn2(self.conv2(x if from_tokens is None else x + from_tokens)))
        return F.relu(self.bn3(self.conv3(mid)) + residual), mid


class FCUDown(nn.Module):
    """Feature maps -> patch tokens: 1x1 conv, average pooling to the patch grid, LayerNorm, GELU."""

    def __init__(self, in_channels: int, dim: int, stride: int):
        super().__init__()
        self.conv_project = nn.Conv2d(in_channels, dim, 1)
        self.stride = stride
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, tokens):
        x = F.avg_pool2d(self.conv_project(x), self.stride).flatten(2).transpose(1, 2)
        x = F.gelu(self.ln(x))
        return torch.cat([tokens[:, :1], x], dim=1)  # keep the branch's CLS token in front


class FCUUp(nn.Module):
    """Patch tokens -> feature maps: 1x1 conv, BatchNorm, ReLU, nearest upsampling."""

    def __init__(self, dim: int, out_channels: int, stride: int):
        super().__init__()
        self.conv_project = nn.Conv2d(dim, out_channels, 1)
        self.bn = _norm(out_channels)
        self.stride = stride

    def forward(self, tokens, grid):
        batch, _, dim = tokens.shape
        x = tokens[:, 1:].transpose(1, 2).reshape(batch, dim, *grid)
        x = F.relu(self.bn(self.conv_project(x)))
        return F.interpolate(x, size=(grid[0] * self.stride, grid[1] * self.stride))


class ConvTransBlock(nn.Module):
    """One CNN bottleneck, one transformer block and the two FCUs between them."""

    def __init__(self, in_channels, out_channels, res_conv, stride, fcu_stride, dim, num_heads, mlp_ratio,
                 drop_path, last_fusion=False):  # fmt: skip
        super().__init__()
        self.cnn_block = ConvBlock(in_channels, out_channels, stride, res_conv)
        # The last block also halves the CNN map, so the CNN head sees the 1/32 map.
        self.fusion_block = ConvBlock(out_channels, out_channels, 2 if last_fusion else 1, res_conv=last_fusion)
        self.squeeze_block = FCUDown(out_channels // _EXPANSION, dim, fcu_stride)
        self.expand_block = FCUUp(dim, out_channels // _EXPANSION, fcu_stride)
        self.trans_block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)
        self.fcu_stride = fcu_stride

    def forward(self, x, tokens):
        x, mid = self.cnn_block(x)
        tokens = self.trans_block(self.squeeze_block(mid, tokens) + tokens)
        grid = (mid.shape[2] // self.fcu_stride, mid.shape[3] // self.fcu_stride)
        x, _ = self.fusion_block(x, self.expand_block(tokens, grid))
        return x, tokens


class Conformer(nn.Module):
    """Conformer backbone; features are [mean-pooled CNN map, final-normed CLS token].

    `embed_dim` is the concatenated width, 256 * channel_ratio + trans_dim. With `num_classes`
    both official heads are built and `forward` returns the sum of their logits, the
    paper's inference rule (Section 3.3).
    """

    capabilities = Capabilities()

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        base_channels: int = 64,
        channel_ratio: int = 4,
        trans_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        if depth % 3 != 0:
            raise VitrailError(f"Conformer depth must be a multiple of 3 (three stages), got {depth}")
        channels = [base_channels * channel_ratio * 2**stage for stage in range(3)]
        self.embed_dim = channels[-1] + trans_dim
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: buildable on the meta device

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # stem output: 1/4 resolution

        fcu_stride = patch_size // 4
        self.conv_1 = ConvBlock(64, channels[0], res_conv=True)
        self.trans_patch_conv = nn.Conv2d(64, trans_dim, kernel_size=fcu_stride, stride=fcu_stride)
        self.trans_1 = Block(trans_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rates[0])

        # Blocks 2..depth; each stage after the first halves the CNN map and the FCU stride.
        self.block_names = []
        per_stage = depth // 3
        for index in range(2, depth + 1):
            stage = (index - 1) // per_stage
            first_of_stage = stage > 0 and (index - 1) % per_stage == 0
            block = ConvTransBlock(
                in_channels=channels[stage - 1] if first_of_stage else channels[stage],
                out_channels=channels[stage],
                res_conv=first_of_stage,
                stride=2 if first_of_stage else 1,
                fcu_stride=fcu_stride // 2**stage,
                dim=trans_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=rates[index - 1],
                last_fusion=index == depth,
            )
            self.add_module(f"conv_trans_{index}", block)  # official key names
            self.block_names.append(f"conv_trans_{index}")

        self.trans_norm = nn.LayerNorm(trans_dim)
        if num_classes > 0:
            self.trans_cls_head = nn.Linear(trans_dim, num_classes)
            self.conv_cls_head = nn.Linear(channels[-1], num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_branches(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled CNN features (B, C), final-normed CLS token (B, trans_dim))."""
        height, width = x.shape[-2:]
        if height % 16 or width % 16:
            raise VitrailError(
                f"Conformer needs image sides that are multiples of 16 (its CNN and token grids must align); "
                f"got {height}x{width}"
            )
        x_base = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x, _ = self.conv_1(x_base)
        tokens = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        tokens = self.trans_1(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1))
        for name in self.block_names:
            x, tokens = getattr(self, name)(x, tokens)
        return x.mean(dim=(2, 3)), self.trans_norm(tokens[:, 0])

    def forward(self, x):
        conv_features, cls = self.forward_branches(x)
        if self.num_classes > 0:
            return self.conv_cls_head(conv_features) + self.trans_cls_head(cls)
        return torch.cat([conv_features, cls], dim=1)
