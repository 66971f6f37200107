"""What a backbone can do beyond `forward(images) -> (B, embed_dim)` features.

Every backbone declares its `capabilities`, as it declares `embed_dim` and `patch_size`; eval
and training code read the declaration and never probe for methods or classes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    patch_tokens: bool = False  # forward_features(x, masks=None) -> {"cls": (B, D), "patches": (B, N, D)}
    block_cls: bool = False  # intermediate_cls(x, n) -> (B, n, D): the final-normed CLS of the last n blocks
    cls_attention: bool = False  # last_self_attention(x) -> (B, heads, 1+N, 1+N) over a `patch_size` grid
