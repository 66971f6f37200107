"""One crop family's augmentation (random-resized crop, flip, colour jitter, grayscale, blur,
solarize), batched and cheap enough to run on a single core per data task.

Every random choice of a crop is drawn up front from the sample's own generator
(`CropParams`), so a view depends only on (seed, epoch, key), never on its batch. The work
then stays close to the pixels that survive: decode once, crop before resize, resize uint8
(bicubic with antialias, channels-last), photometric ops in place on float32 at the output
size, in chunks small enough to stay in cache, the blur as banded matrix products.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

_DRAWS = 50  # uniforms drawn per crop: 40 for the crop box's ten tries, 10 for the ops
_BAND = 64  # rows per band of the banded blur products
# Rows processed together: as many crops as 4 RGB 224-px ones (2.4 MB of floats), which stay
# in a core's L2 cache; small crops go in larger chunks, which spreads the per-op overhead.
_CHUNK_VALUES = 4 * 3 * 224 * 224
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" conversion and torchvision use


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
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation factors; hue shift in turns
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


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, in one buffer."""
    return torch.mul(x[:, 0:1], _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def shift_hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB (B, 3, H, W) in [0, 255] by `shift` (B,) turns through HSV, in
    place, as torchvision's adjust_hue.

    HSV keeps each pixel's max V and min m; only the hue t (in sixths of a turn) moves, and
    the channels come back as m + (V - m) * clamp(h_c(t), 0, 1) with the hexcone's ramps
    h_r = |t - 3| - 1, h_g = 2 - |t - 2|, h_b = 2 - |t - 4|.
    """
    r, g, b = x.unbind(1)
    high = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = high - low
    # Hue in sixths of a turn, relative to the max channel (ties: red, then green, as torchvision).
    # Selections are lerps with 0/1 masks: torch.where is several times slower on CPU.
    # Comparisons write float masks directly (out=): five times faster than a bool mask cast after.
    red_max, green_max = torch.eq(r, high, out=torch.empty_like(r)), torch.eq(g, high, out=torch.empty_like(g))
    t = torch.lerp((r - g).add_(chroma, alpha=4), (b - r).add_(chroma, alpha=2), green_max)
    t = torch.lerp(t, g - b, red_max)
    t.div_(chroma.clamp(min=1e-3)).add_(shift.view(-1, 1, 1) * 6 + 6)  # in (4.4, 11.6): one wrap to [0, 6) is enough
    t.sub_(torch.ge(t, 6, out=torch.empty_like(t)), alpha=6)
    # With a_c = clamp(|t - centre_c|, 1, 2): red = (2 low - high) + chroma a_r, green and blue =
    # (high + chroma) - chroma a_c.
    rising, falling = torch.sub(low, chroma), torch.add(high, chroma)
    for channel, (centre, base, sign) in enumerate(((3.0, rising, 1.0), (2.0, falling, -1.0), (4.0, falling, -1.0))):
        ramp = torch.sub(t, centre).abs_().clamp_(1.0, 2.0)
        x[:, channel] = torch.addcmul(base, ramp, chroma, value=sign)
    return x


def color_jitter_(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter on (B, C, H, W) floats in [0, 255], per-row factors (B, 4) as in `CropParams`.

    torchvision applies the four ops in a random order per image; we apply them in the fixed
    order brightness, contrast, saturation, hue, which keeps the op batched.
    """
    brightness, contrast, saturation, hue = (column.view(-1, 1, 1, 1) for column in factors.unbind(1))
    x.mul_(brightness).clamp_(0, 255)
    channel_means = x.mean(dim=(2, 3))  # (B, C)
    mean = channel_means @ torch.tensor(_LUMA) if x.shape[1] == 3 else channel_means[:, 0]
    torch.addcmul(mean.view(-1, 1, 1, 1) * (1 - contrast), x, contrast, out=x).clamp_(0, 255)
    if x.shape[1] == 3:
        torch.addcmul(_luma(x).mul_(1 - saturation), x, saturation, out=x).clamp_(0, 255)
        shift_hue_(x, hue.view(-1))
    return x


@lru_cache(maxsize=1024)
def blur_matrix(size: int, sigma: float) -> tuple[torch.Tensor, int]:
    """(M, radius): M (size, size) with M @ column = the column blurred by a Gaussian of std
    `sigma` (radius 3 sigma, reflect padding). Sigma comes rounded to 0.01 px, so a recipe
    needs a few hundred matrices, built once."""
    radius = max(1, min(int(math.ceil(3 * sigma)), size - 1))
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    rows = torch.arange(size).view(-1, 1)
    source = (rows + offsets.view(1, -1)).abs()  # reflect at 0 ...
    source = torch.where(source >= size, 2 * (size - 1) - source, source)  # ... and at size - 1
    matrix = torch.zeros(size, size)
    matrix.index_put_((rows.expand_as(source), source), (weights / weights.sum()).expand_as(source), accumulate=True)
    return matrix, radius


def gaussian_blur_(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (C, S, S) float in place with a Gaussian of std `sigma` (PIL's GaussianBlur(radius=sigma),
    as DINO). Each axis is a product with the banded blur matrix, taken in row bands of `_BAND`
    that read only the band plus the kernel radius: a third of the full product's work at 224 px."""
    size = image.shape[-1]
    matrix, radius = blur_matrix(size, round(sigma, 2))
    if size <= 2 * _BAND:  # banding saves little here and costs its Python overhead
        return torch.matmul(torch.matmul(matrix, image), matrix.T, out=image)
    bands = [(start, min(size, start + _BAND)) for start in range(0, size, _BAND)]
    bands = [(start, stop, max(0, start - radius), min(size, stop + radius)) for start, stop in bands]
    vertical = torch.empty_like(image)
    for start, stop, low, high in bands:
        vertical[:, start:stop] = torch.matmul(matrix[start:stop, low:high], image[:, low:high])
    for start, stop, low, high in bands:
        image[:, :, start:stop] = torch.matmul(vertical[:, :, low:high], matrix[start:stop, low:high].T)
    return image


def solarize_(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.solarize at 128 on uint8, in place."""
    return x.copy_(torch.where(x >= 128, 255 - x, x))


def render(images: list[torch.Tensor], params: list[CropParams], size: int) -> torch.Tensor:
    """uint8 (C, H, W) images (channels-last is fastest) and their crop params -> (B, C, size, size) uint8."""
    # Jittered crops go first, so in every chunk they are a leading slice, jittered in place.
    order = sorted(range(len(params)), key=lambda row: params[row].jitter is None)
    channels = images[0].shape[0]
    out = torch.empty(len(images), channels, size, size, dtype=torch.uint8)
    chunk = max(1, _CHUNK_VALUES // (channels * size * size))
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        rendered = _render_chunk([images[row] for row in rows], [params[row] for row in rows], size)
        for position, row in enumerate(rows):
            out[row] = rendered[position]
    return out


def _render_chunk(images, params, size: int) -> torch.Tensor:
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.uint8)
    for row, (image, crop) in enumerate(zip(images, params)):
        resized = crop_resize(image, crop.box, size)
        out[row] = resized.flip(-1) if crop.flip else resized
    if not any(crop.jitter or crop.gray or crop.sigma for crop in params):
        return _solarize_rows(out, params)
    # Nearly every row needs a photometric op, so the whole chunk goes to float once.
    x = out.float()
    jittered = [crop.jitter for crop in params if crop.jitter]  # a leading slice, see `render`
    if jittered:
        color_jitter_(x[:len(jittered)], torch.tensor(jittered))
    grayed = [row for row, crop in enumerate(params) if crop.gray]
    if grayed and x.shape[1] == 3:
        x[grayed] = _luma(x[grayed]).expand(-1, 3, -1, -1)
    for row, crop in enumerate(params):
        if crop.sigma:
            gaussian_blur_(x[row], crop.sigma)
    # Every op keeps [0, 255] (clamped jitter, convex blur), so rounding is all that is left.
    out.copy_(x.round_())
    return _solarize_rows(out, params)


def _solarize_rows(out: torch.Tensor, params: list[CropParams]) -> torch.Tensor:
    for row, crop in enumerate(params):
        if crop.solarize:
            solarize_(out[row])
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
        jitter = factors if next(uniforms) < self.jitter_prob else None
        gray = next(uniforms) < self.grayscale_prob
        sigma = _between(next(uniforms), *self.blur_sigma)
        blurred = next(uniforms) < self.blur_prob
        return CropParams(box, flip, jitter, gray, sigma if blurred else None, next(uniforms) < self.solarize_prob)

    def __call__(self, images: list[torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        """uint8 (C, H, W) images -> augmented views (B, C, size, size) uint8."""
        params = [self.draw(uniform_stream(g, 1), image.shape[1], image.shape[2]) for image, g in zip(images, generators)]
        return render([channels_last(image) for image in images], params, self.size)
