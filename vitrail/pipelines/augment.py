"""One crop family's augmentation (random-resized crop, flip, colour jitter, grayscale, blur,
solarize), cheap enough to run on a single core per data task.

Every random choice of a crop is drawn up front from the sample's own generator
(`CropParams`), so a view depends only on (seed, epoch, key), never on its batch. The work
then stays close to the pixels that survive: decode once, crop before resize, resize uint8
(bicubic with antialias, channels-last), then the photometric ops at the output size in one
numba kernel (`photometric`), on float32 planes that stay in cache.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vitrail.pipelines.photometric import photometric

_DRAWS = 51  # uniforms drawn per crop: 40 for the crop box's ten tries, 11 for the ops
# torchvision's ColorJitter applies brightness, contrast, saturation and hue (op ids 0-3 of
# `photometric`) in a random order per image: one of these 24, drawn with one uniform.
_JITTER_ORDERS = tuple(itertools.permutations(range(4)))


def sample_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def uniform_stream(generator: torch.Generator, crops: int) -> Iterator[float]:
    """The uniforms `Augment.draw` takes for `crops` crops of one sample, drawn in one call."""
    return iter(torch.rand(crops * _DRAWS, generator=generator, dtype=torch.float64).tolist())


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _between(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def random_resized_crop_box(height, width, scale, ratio, uniforms: Iterator[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w): ten tries, then a centre crop.
    Always consumes 40 uniforms, so the draws after it do not depend on which try succeeded."""
    draws = [next(uniforms) for _ in range(40)]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        u_area, u_aspect, u_top, u_left = draws[4 * attempt: 4 * attempt + 4]
        target_area = area * _between(u_area, *scale)
        aspect = math.exp(_between(u_aspect, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropParams:
    box: tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    # Colour ops in the order applied, (op id, factor) each: brightness, contrast and saturation
    # factors, hue shift in turns (`photometric`); empty when the crop is not jittered.
    jitter: tuple[tuple[int, float], ...]
    gray: bool
    sigma: float | None  # Gaussian blur std in pixels of the output, None for no blur
    solarize: bool


def channels_last(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with channels-last strides: torch's uint8 resize is several times faster on it."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def crop_resize(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """Crop (C, H, W) uint8 to `box`, resize to (C, size, size) uint8, bicubic with antialias as
    DINO's RandomResizedCrop(interpolation=BICUBIC) on PIL images."""
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]


def render(images: list[torch.Tensor], params: list[CropParams], size: int) -> torch.Tensor:
    """uint8 (C, H, W) images (channels-last is fastest) and their crop params -> (B, C, size, size) uint8."""
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.uint8)
    for row, (image, crop) in enumerate(zip(images, params)):
        resized = crop_resize(image, crop.box, size)
        resized = resized.flip(-1) if crop.flip else resized
        ops = np.array([op for op, _ in crop.jitter], np.int64)
        factors = np.array([factor for _, factor in crop.jitter], np.float64)
        photometric(resized.numpy(), out[row].numpy(), ops, factors, crop.gray, crop.sigma or 0.0, crop.solarize)
    return out


@dataclass(frozen=True)
class Augment:
    """One crop family's augmentation (DINO Sec. 3 / App., BYOL App. B)."""

    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float = 0.0
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, uniforms: Iterator[float], height: int, width: int) -> CropParams:
        """All random choices of one crop, from the next `_DRAWS` of the sample's `uniforms`."""
        box = random_resized_crop_box(height, width, self.scale, self.ratio, uniforms)
        flip = next(uniforms) < self.flip_prob
        b, c, s, h = self.jitter
        factors = (_between(next(uniforms), max(0.0, 1 - b), 1 + b), _between(next(uniforms), max(0.0, 1 - c), 1 + c),
                   _between(next(uniforms), max(0.0, 1 - s), 1 + s), _between(next(uniforms), -h, h))
        order = _JITTER_ORDERS[int(next(uniforms) * len(_JITTER_ORDERS))]
        jitter = tuple((op, factors[op]) for op in order) if next(uniforms) < self.jitter_prob else ()
        gray = next(uniforms) < self.grayscale_prob
        sigma = _between(next(uniforms), *self.blur_sigma)
        blurred = next(uniforms) < self.blur_prob
        return CropParams(box, flip, jitter, gray, sigma if blurred else None, next(uniforms) < self.solarize_prob)

    def __call__(self, images: list[torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        """uint8 (C, H, W) images -> augmented views (B, C, size, size) uint8."""
        params = [self.draw(uniform_stream(g, 1), image.shape[1], image.shape[2]) for image, g in zip(images, generators)]
        return render([channels_last(image) for image in images], params, self.size)
