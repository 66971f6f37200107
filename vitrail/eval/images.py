"""Pictures of a run for the dashboard: the views a method trains on, and where a ViT's CLS token looks.

Both come out as one uint8 (H, W, 3) grid, a row per sample; `Tracker.log_image` stores and logs it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Cells are enlarged by a whole factor to at least this many pixels (Fashion-MNIST is 28 px).
MIN_CELL_PIXELS = 96
_PADDING = 2


def view_tensors(views, batch_size: int) -> list[torch.Tensor]:
    """The crops of a recipe's `Views`, each (B, C, H, W): a crop stacking m views of the batch
    along dim 0 (RotNet's (4B, C, S, S)) is split into m."""
    return [view for crop in views.crops for view in crop.split(batch_size)]


def view_grid(views, batch_size: int, normalization, samples: int = 4) -> np.ndarray:
    """A row per sample (the first `samples`), a column per view, de-normalised: uint8 (H, W, 3)."""
    columns = [normalization.invert(view[:samples].detach().cpu()) for view in view_tensors(views, batch_size)]
    rows = min(len(column) for column in columns)
    return tile([[column[row] for column in columns] for row in range(rows)])


def cls_attention_maps(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Last-block attention (B, heads, 1+N, 1+N) -> the CLS token's over the patches, (B, heads, h, w),
    each map stretched to [0, 1] by its own range (early in training the maps are nearly flat)."""
    maps = attention[:, :, 0, 1:].reshape(*attention.shape[:2], *grid).float()
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def attention_grid(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """A row per image: the image (uint8 (B, C, H, W)), then each head's map (B, heads, h, w)
    enlarged to the image's size, in the viridis colour map: uint8 (H, W, 3)."""
    from matplotlib import colormaps

    size = images.shape[-2:]
    maps = F.interpolate(maps.float(), size=size, mode="nearest")
    colours = torch.from_numpy(colormaps["viridis"](maps.cpu().numpy(), bytes=True)[..., :3])  # (B, heads, H, W, 3)
    rows = [[images[row].cpu()] + list(colours[row].permute(0, 3, 1, 2)) for row in range(len(images))]
    return tile(rows)


def tile(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """uint8 (C, H, W) cells, C 1 or 3 and sizes free, on a grid of equal cells (each centred), all
    enlarged by one whole factor: uint8 (H, W, 3)."""
    cell_h = max(cell.shape[1] for row in rows for cell in row)
    cell_w = max(cell.shape[2] for row in rows for cell in row)
    scale = max(1, math.ceil(MIN_CELL_PIXELS / max(cell_h, cell_w)))
    step_h, step_w = cell_h * scale + _PADDING, cell_w * scale + _PADDING
    width = max(len(row) for row in rows)
    canvas = np.full((len(rows) * step_h + _PADDING, width * step_w + _PADDING, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            cell = cell.expand(3, -1, -1) if cell.shape[0] == 1 else cell
            pixels = cell.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
            top = _PADDING + r * step_h + (cell_h - cell.shape[1]) * scale // 2
            left = _PADDING + c * step_w + (cell_w - cell.shape[2]) * scale // 2
            canvas[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
    return canvas
