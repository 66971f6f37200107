"""Mobile-Former (Chen et al., CVPR 2022, "Mobile-Former: Bridging MobileNet and Transformer").

A MobileNet-style CNN ("Mobile") and a handful of learnable global tokens ("Former") run in
parallel. In every block a lightweight cross-attention bridge carries local features to the
tokens (Mobile -> Former), the tokens attend to each other, the first token produces the
coefficients of the CNN's dynamic ReLUs, and a second bridge carries the tokens back to the
feature map (Former -> Mobile). State-dict keys follow the official implementation
(AAboys/MobileFormer), so its checkpoints load with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrail.backbones.capabilities import Capabilities
from vitrail.backbones.vit import DropPath

# Table 9-11 of the paper / official model definitions. Each block row is
# (kind, expansion e1, out channels, stride, second expansion e2): kind "dw" is the
# dw -> pw -> dw -> pw block used where the map shrinks, "pw" the inverted bottleneck
# pw -> dw -> pw; a row with e2 == 0 is a plain convolution without bridges.
_BLOCKS_294M = [
    ("dw", 2, 16, 1, 0), ("dw", 6, 24, 2, 4), ("pw", 4, 24, 1, 4), ("dw", 6, 48, 2, 4), ("pw", 4, 48, 1, 4),
    ("dw", 6, 96, 2, 4), ("pw", 4, 96, 1, 4), ("pw", 6, 128, 1, 4), ("pw", 6, 128, 1, 4),
    ("dw", 6, 192, 2, 4), ("pw", 6, 192, 1, 4), ("pw", 6, 192, 1, 4),
]  # fmt: skip
_BLOCKS_52M = [
    ("dw", 3, 12, 2, 0), ("pw", 3, 12, 1, 3), ("dw", 6, 24, 2, 4), ("pw", 3, 24, 1, 3), ("dw", 6, 48, 2, 4),
    ("pw", 4, 48, 1, 4), ("pw", 6, 64, 1, 4), ("dw", 6, 96, 2, 4), ("pw", 6, 96, 1, 4),
]  # fmt: skip
VARIANTS = {
    "mobileformer_26m": dict(blocks=_BLOCKS_52M, stem_chs=8, token_num=3, token_dim=128, num_features=1024, groups=4),
    "mobileformer_52m": dict(blocks=_BLOCKS_52M, stem_chs=8, token_num=3, token_dim=128, num_features=1024),
    "mobileformer_96m": dict(
        blocks=[
            ("dw", 2, 12, 1, 0), ("dw", 6, 16, 2, 4), ("dw", 6, 32, 2, 4), ("pw", 3, 32, 1, 3), ("dw", 6, 64, 2, 4),
            ("pw", 4, 64, 1, 4), ("pw", 6, 88, 1, 4), ("dw", 6, 128, 2, 4), ("pw", 6, 128, 1, 4),
        ],
        stem_chs=12, token_num=4, token_dim=128, num_features=1280,
    ),
    "mobileformer_151m": dict(
        blocks=[
            ("dw", 2, 12, 1, 0), ("dw", 6, 16, 2, 4), ("pw", 3, 16, 1, 3), ("dw", 6, 32, 2, 4), ("pw", 3, 32, 1, 3),
            ("dw", 6, 64, 2, 4), ("pw", 4, 64, 1, 4), ("pw", 6, 88, 1, 4), ("pw", 6, 88, 1, 4),
            ("dw", 6, 128, 2, 4), ("pw", 6, 128, 1, 4), ("pw", 6, 128, 1, 4),
        ],
        stem_chs=12, token_num=6, token_dim=192, num_features=1280,
    ),
    "mobileformer_214m": dict(
        blocks=[
            ("dw", 2, 12, 1, 0), ("dw", 6, 20, 2, 4), ("pw", 3, 20, 1, 4), ("dw", 6, 40, 2, 4), ("pw", 4, 40, 1, 4),
            ("dw", 6, 80, 2, 4), ("pw", 4, 80, 1, 4), ("pw", 6, 112, 1, 4), ("pw", 6, 112, 1, 4),
            ("dw", 6, 160, 2, 4), ("pw", 6, 160, 1, 4), ("pw", 6, 160, 1, 4),
        ],
        stem_chs=12, token_num=6, token_dim=192, num_features=1600,
    ),
    "mobileformer_294m": dict(blocks=_BLOCKS_294M, stem_chs=16, token_num=6, token_dim=192, num_features=1920),
    "mobileformer_508m": dict(
        blocks=[
            ("dw", 2, 24, 1, 0), ("dw", 6, 40, 2, 4), ("pw", 3, 40, 1, 3), ("dw", 6, 72, 2, 4), ("pw", 3, 72, 1, 3),
            ("dw", 6, 128, 2, 4), ("pw", 4, 128, 1, 4), ("pw", 6, 176, 1, 4), ("pw", 6, 176, 1, 4),
            ("dw", 6, 240, 2, 4), ("pw", 6, 240, 1, 4), ("pw", 6, 240, 1, 4),
        ],
        stem_chs=24, token_num=6, token_dim=192, num_features=1920,
    ),
}  # fmt: skip

_BRIDGE_HEADS = 2  # heads of both bridges (Section 3.2)
_FORMER_HEADS = 4  # heads of the token self-attention, the official default
_DYNAMIC_SCALE = 2.0  # range of the dynamic-ReLU and bridge coefficients


class ChannelShuffle(nn.Module):
    """Mixes channels across groups after a grouped convolution (ShuffleNet)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        batch, channels, height, width = x.shape
        x = x.view(batch, self.groups, channels // self.groups, height, width)
        return x.transpose(1, 2).reshape(batch, channels, height, width)


def _shuffle(groups: int, active: bool) -> nn.Module:
    return ChannelShuffle(groups) if active else nn.Identity()


def _conv_bn(in_chs, out_chs, kernel=1, stride=1, groups=1, shuffle: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_chs)]
    return nn.Sequential(*layers, shuffle) if shuffle is not None else nn.Sequential(*layers)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads), channels of one head contiguous."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class HyperFunc(nn.Module):
    """First global token -> coefficients of a dynamic ReLU, in [0, 1]."""

    def __init__(self, token_dim: int, out_dim: int, reduction: int = 4):
        super().__init__()
        self.hyper = nn.Sequential(
            nn.Linear(token_dim, token_dim // reduction), nn.ReLU(), nn.Linear(token_dim // reduction, out_dim),
            nn.Hardsigmoid(),
        )  # fmt: skip

    def forward(self, tokens):  # (B, T, D) -> (B, out_dim, 1, 1)
        return self.hyper(tokens[:, 0])[:, :, None, None]


def dynamic_relu(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """max(a1 * x, a2 * x) with token-generated slopes a1 in [0, 2], a2 in [-1, 1] (Section 3.3)."""
    slope1, slope2 = coefficients.chunk(2, dim=1)
    return torch.maximum(x * ((slope1 - 0.5) * _DYNAMIC_SCALE + 1.0), x * ((slope2 - 0.5) * _DYNAMIC_SCALE))


class Local2Global(nn.Module):
    """Mobile -> Former bridge: tokens query the feature map (keys = values = the raw map)."""

    def __init__(self, channels: int, token_dim: int, drop_path: float):
        super().__init__()
        # Dynamic channel weights from the tokens themselves (the official gbr_dynamic[0]).
        self.alpha = nn.Sequential(nn.Linear(token_dim, channels), nn.Hardsigmoid())
        self.q = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(channels, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, features, tokens):  # (B, C, H, W), (B, T, D)
        local = _split_heads(features.flatten(2).transpose(1, 2), _BRIDGE_HEADS)  # (B, h, HW, C/h)
        query = _split_heads(self.q(tokens), _BRIDGE_HEADS)
        update = F.scaled_dot_product_attention(query, local, local)  # (B, h, T, C/h)
        update = update.transpose(1, 2).flatten(2) * (self.alpha(tokens) * _DYNAMIC_SCALE)
        return self.layer_norm(tokens + self.drop_path(self.proj(update)))


class GlobalBlock(nn.Module):
    """Former: token self-attention (keys = values = tokens) and a post-norm FFN."""

    def __init__(self, token_dim: int, drop_path: float):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(token_dim, 2 * token_dim), nn.GELU(), nn.Linear(2 * token_dim, token_dim))
        self.ffn_norm = nn.LayerNorm(token_dim)
        self.q = nn.Linear(token_dim, token_dim)
        self.channel_mlp = nn.Linear(token_dim, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):  # (B, T, D)
        keys = _split_heads(tokens, _FORMER_HEADS)
        update = F.scaled_dot_product_attention(_split_heads(self.q(tokens), _FORMER_HEADS), keys, keys)
        tokens = self.layer_norm(tokens + self.drop_path(self.channel_mlp(update.transpose(1, 2).flatten(2))))
        return self.ffn_norm(tokens + self.ffn(tokens))


class Global2Local(nn.Module):
    """Former -> Mobile bridge: every pixel queries the tokens (queries = the raw map)."""

    def __init__(self, channels: int, token_dim: int, drop_path: float):
        super().__init__()
        self.k = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(token_dim, channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, features, tokens):
        batch, channels, height, width = features.shape
        query = _split_heads(features.flatten(2).transpose(1, 2), _BRIDGE_HEADS)  # (B, h, HW, C/h)
        update = F.scaled_dot_product_attention(
            query, _split_heads(self.k(tokens), _BRIDGE_HEADS), _split_heads(self.proj(tokens), _BRIDGE_HEADS)
        )
        update = update.transpose(2, 3).reshape(batch, channels, height, width)
        return features + self.drop_path(update)


class ConvOnlyBlock(nn.Module):
    """Plain depthwise-separable block without bridges (the first block of every variant)."""

    def __init__(self, in_chs, out_chs, stride, expansion, groups):
        super().__init__()
        hidden = in_chs * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 3, stride, 1, groups=in_chs, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(), _shuffle(in_chs, groups > 1),
            nn.Conv2d(hidden, out_chs, 1, groups=groups, bias=False), nn.BatchNorm2d(out_chs),
        )  # fmt: skip
        self.identity = stride == 1 and in_chs == out_chs

    def forward(self, features, tokens):
        out = self.conv(features)
        return (out + features if self.identity else out), tokens


class MobileFormerBlock(nn.Module):
    """Mobile-Former block: Mobile -> Former bridge, Former, Mobile with dynamic ReLU, Former -> Mobile."""

    def __init__(self, kind, in_chs, out_chs, stride, expansion, second_expansion, token_dim, groups, drop_path):
        super().__init__()
        self.kind = kind
        self.identity = stride == 1 and in_chs == out_chs
        if kind == "dw":  # dw(stride) -> pw -> dw -> pw, with a skip around the second pair
            hidden1, hidden2 = round(in_chs * expansion), round(out_chs * second_expansion)
            self.conv1 = _conv_bn(in_chs, hidden1, 3, stride, in_chs, _shuffle(in_chs, groups > 1))
            self.hyper1 = HyperFunc(token_dim, 2 * hidden1)
            self.conv2 = _conv_bn(hidden1, out_chs, groups=groups)
            self.conv3 = _conv_bn(out_chs, hidden2, 3, 1, out_chs, _shuffle(out_chs, groups > 1))
            self.hyper3 = HyperFunc(token_dim, 2 * hidden2)
            self.conv4 = _conv_bn(hidden2, out_chs, groups=groups)
        else:  # inverted bottleneck pw -> dw(stride) -> pw
            hidden = round(in_chs * expansion)
            self.conv1 = _conv_bn(in_chs, hidden, groups=groups, shuffle=_shuffle(groups, groups > 1))
            self.hyper1 = HyperFunc(token_dim, 2 * hidden)
            self.conv2 = _conv_bn(hidden, hidden, 3, stride, hidden)
            self.hyper2 = HyperFunc(token_dim, 2 * hidden)
            self.conv3 = _conv_bn(hidden, out_chs, groups=groups, shuffle=_shuffle(groups, groups > 1))
        self.drop_path = DropPath(drop_path)
        self.local_global = Local2Global(in_chs, token_dim, drop_path)
        self.global_block = GlobalBlock(token_dim, drop_path)
        self.global_local = Global2Local(out_chs, token_dim, drop_path)

    def forward(self, features, tokens):
        tokens = self.global_block(self.local_global(features, tokens))
        if self.kind == "dw":
            out = self.conv2(dynamic_relu(self.conv1(features), self.hyper1(tokens)))
            out = self.drop_path(self.conv4(dynamic_relu(self.conv3(out), self.hyper3(tokens)))) + out
            out = self.global_local(out, tokens)
            return (out + features if self.identity else out), tokens
        out = dynamic_relu(self.conv1(features), self.hyper1(tokens))
        out = self.conv3(dynamic_relu(self.conv2(out), self.hyper2(tokens)))
        if self.identity:
            out = self.drop_path(out) + features
        return self.global_local(out, tokens), tokens


class MergeHead(nn.Module):
    """Merges the pooled CNN map with the first token into the `num_features` representation."""

    def __init__(self, channels, num_features, token_dim, groups, num_classes, expansion=6):
        super().__init__()
        hidden = channels * expansion
        self.conv = nn.Sequential(
            _shuffle(groups, groups > 1), nn.Conv2d(channels, hidden, 1, groups=groups, bias=False),
            nn.BatchNorm2d(hidden),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(hidden + token_dim, num_features), nn.BatchNorm1d(num_features), nn.Hardswish())
        # Index 0 holds the official dropout slot, so the linear layer keeps its `classifier.1` key.
        self.classifier = nn.Sequential(nn.Identity(), nn.Linear(num_features, num_classes)) if num_classes else None

    def forward(self, features, tokens):
        pooled = F.hardswish(F.relu6(self.conv(features)).mean(dim=(2, 3)))
        return self.fc(torch.cat([pooled, tokens[:, 0]], dim=1))


class MobileFormer(nn.Module):
    """Mobile-Former backbone; features are the merged CNN + token vector before the classifier."""

    capabilities = Capabilities()

    def __init__(
        self,
        blocks=_BLOCKS_294M,
        in_chans: int = 3,
        stem_chs: int = 16,
        token_num: int = 6,
        token_dim: int = 192,
        num_features: int = 1920,
        groups: int = 1,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        self.embed_dim = num_features
        self.tokens = nn.Embedding(token_num, token_dim)  # the learnable global tokens
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem_chs), nn.ReLU6()
        )
        layers, channels = [], stem_chs
        for index, (kind, expansion, out_chs, stride, second_expansion) in enumerate(blocks):
            # Official rule: drop-path rate grows linearly with the block index.
            rate = drop_path_rate * (index + 1) / len(blocks)
            if second_expansion == 0:
                layers.append(ConvOnlyBlock(channels, out_chs, stride, expansion, groups))
            else:
                layers.append(
                    MobileFormerBlock(
                        kind, channels, out_chs, stride, expansion, second_expansion, token_dim, groups, rate
                    )
                )
            channels = out_chs
        self.features = nn.ModuleList(layers)
        self.local_global = Local2Global(channels, token_dim, drop_path_rate)
        self.classifier = MergeHead(channels, num_features, token_dim, groups, num_classes)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        tokens = self.tokens.weight.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, T, D)
        x = self.stem(x)
        for block in self.features:
            x, tokens = block(x, tokens)
        features = self.classifier(x, self.local_global(x, tokens))
        if self.classifier.classifier is None:
            return features
        return self.classifier.classifier(features)
