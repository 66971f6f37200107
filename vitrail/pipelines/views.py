"""View recipes: uint8 images in, the fixed-shape uint8 view columns a method trains on out.

A recipe runs where the data is (a Ray Data `map_batches` worker or the local loader) and
keeps everything uint8 so that only a quarter of the float bytes cross the object store;
`to_device` converts to normalised floats on the training device.

Randomness is drawn per sample from a generator seeded by (seed, epoch, sample key), so a
view is reproducible whatever worker, batch or order produced it. The photometric ops run
per crop in one numba kernel (`photometric`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitrail.pipelines.augment import Augment, _uniform, channels_last, render, sample_generator, uniform_stream


@dataclass
class Views:
    """What every view recipe's `to_device` gives a method: normalised float crops on the
    training device, each (n, C, H, W), and the extras some recipes make with them."""

    crops: list[torch.Tensor]  # multi-crop: global crops, then local; single crop: one; rotations: (4B, ...) one
    key_ids: torch.Tensor | None = None  # (B,) int64 sample ids (`key_ids`), for per-sample state (DeepCluster)
    labels: torch.Tensor | None = None   # (n,) int64 targets of crops[0] made with the views (RotNet's rotations)


@dataclass(frozen=True)
class MultiCrop:
    """DINO's multi-crop (Caron et al. 2021, Sec. 3.1 and App.): 2 global crops of
    scale (0.4, 1) — blur 1.0 on the first, blur 0.1 and solarize 0.2 on the second — and
    N local crops of scale (0.05, 0.4) with blur 0.5. Columns: "global" (B, 2, C, G, G),
    "local" (B, N, C, L, L), both uint8.
    """

    global_size: int = 224
    local_size: int = 96
    num_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def families(self) -> dict[str, list[Augment]]:
        glob = dict(size=self.global_size, scale=self.global_scale, blur_sigma=self.blur_sigma)
        return {
            "global": [Augment(blur_prob=1.0, **glob), Augment(blur_prob=0.1, solarize_prob=0.2, **glob)],
            "local": [Augment(self.local_size, self.local_scale, blur_prob=0.5, blur_sigma=self.blur_sigma)] * self.num_local,
        }

    def __call__(self, images, keys, seed: int, epoch: int) -> dict[str, np.ndarray]:
        families = {column: augments for column, augments in self.families().items() if augments}
        crops = {column: ([], []) for column in families}  # column -> (images, params), sample-major
        crops_per_sample = sum(len(augments) for augments in families.values())
        for image, key in zip(images, keys):
            uniforms = uniform_stream(sample_generator(seed, epoch, key), crops_per_sample)
            image = channels_last(image)  # once per image, for the 2 + N resizes below
            for column, augments in families.items():
                for augment in augments:
                    crops[column][0].append(image)
                    crops[column][1].append(augment.draw(uniforms, image.shape[1], image.shape[2]))
        columns = {}
        for column, augments in families.items():
            views = render(*crops[column], augments[0].size)  # (B * n, C, S, S)
            columns[column] = views.view(len(images), len(augments), *views.shape[1:]).numpy()
        return columns

    def to_device(self, batch: dict, device, normalization: Normalization) -> Views:
        """Crops [global_0, global_1, local_0, ...], each (B, C, H, W) float."""
        crops = []
        for column in ("global", "local"):
            if column in batch:
                stacked = normalization(torch.as_tensor(batch[column]).to(device, non_blocking=True))
                crops.extend(stacked.unbind(1))
        return Views(crops)


@dataclass(frozen=True)
class Normalization:
    """How a data set's images are decoded (`channels`: 1 grayscale, 3 RGB) and standardised per
    channel: (x / 255 - mean) / std (DINO's Normalize on torchvision's [0, 1] tensors)."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"{self.channels} channels need as many means and stds, got {self.mean} and {self.std}")

    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.mean, device=device).view(-1, 1, 1) * 255.0,
                torch.tensor(self.std, device=device).view(-1, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> standardised float."""
        mean, std = self._stats(images.device)
        return (images.float() - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised float (..., C, H, W) -> uint8 (view grids)."""
        mean, std = self._stats(images.device)
        return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to `resize_size`, centre-crop `crop_size` (DINO's k-NN / linear eval: 256 / 224)."""

    resize_size: int = 256
    crop_size: int = 224

    @classmethod
    def at(cls, crop_size: int, resize_size: int | None = None) -> "EvalTransform":
        """Centre crops of `crop_size` from images resized by DINO's 256/224 ratio unless told otherwise."""
        return cls(resize_size or round(crop_size * 256 / 224), crop_size)

    def __call__(self, images, keys=None, seed=0, epoch=0) -> dict[str, np.ndarray]:
        out = []
        for image in images:
            height, width = image.shape[1:]
            scale = self.resize_size / min(height, width)
            size = (max(self.crop_size, round(height * scale)), max(self.crop_size, round(width * scale)))
            x = image[None].float()
            if size != (height, width):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            top, left = (size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2
            out.append(x[0, :, top:top + self.crop_size, left:left + self.crop_size])
        return {"image": torch.stack(out).clamp_(0, 255).round_().to(torch.uint8).numpy()}


def key_ids(keys) -> np.ndarray:
    """Sample key strings -> int64 ids (63-bit blake2b), so per-sample state can live in tensors."""
    return np.array([int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")
                     & ((1 << 63) - 1) for key in keys], dtype=np.int64)


@dataclass(frozen=True)
class SingleCrop:
    """One random-resized crop per image with a horizontal flip and no photometric change, the
    augmentation of DeepCluster (Caron et al. 2018, Sec. 4) and RotNet (Gidaris et al. 2018,
    Sec. 3). Column "image" (B, C, S, S) uint8; `to_device` also gives the samples' `key_ids`.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)

    def augment(self) -> Augment:
        return Augment(self.size, self.scale, blur_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)

    def __call__(self, images, keys, seed: int, epoch: int) -> dict[str, np.ndarray]:
        generators = [sample_generator(seed, epoch, key) for key in keys]
        return {"image": self.augment()(images, generators).numpy()}

    def to_device(self, batch: dict, device, normalization: Normalization) -> Views:
        """One crop (B, C, S, S) float and the samples' key ids."""
        return Views([normalization(torch.as_tensor(batch["image"]).to(device, non_blocking=True))],
                     key_ids=torch.from_numpy(key_ids(batch["key"])).to(device))


@dataclass(frozen=True)
class Rotations(SingleCrop):
    """RotNet's views (Gidaris et al. 2018, Sec. 2.2): each crop in the four rotations 0, 90,
    180 and 270 degrees, labelled 0-3. The rotations are made on the device, so only the
    unrotated uint8 crop crosses the object store."""

    def to_device(self, batch: dict, device, normalization: Normalization) -> Views:
        """One crop (4B, C, S, S): every image rotated by 0, then 90, 180, 270 degrees; labels (4B,) 0-3."""
        images = normalization(torch.as_tensor(batch["image"]).to(device, non_blocking=True))
        rotated = torch.cat([torch.rot90(images, quarter, dims=(-2, -1)) for quarter in range(4)])  # (4B, C, S, S)
        labels = torch.arange(4, device=device).repeat_interleave(len(images))
        return Views([rotated], labels=labels)


@dataclass(frozen=True)
class BlockMasking:
    """iBOT's blockwise masks (Zhou et al. 2022, Sec. 3.2 / App. B, after BEiT): per image a
    ratio r is drawn, uniformly among U(m - v, m + v) for each (m, v) of `ratios` x `ratio_vars`
    (iBOT's `pred_ratio 0 0.3, pred_ratio_var 0 0.2`: r = 0 or U(0.1, 0.5), half the time
    each), then rectangles of area >= (min(H, W) // 3)^2 and aspect in `aspect` are added
    until r H W patches are masked or ten tries add nothing."""

    ratios: tuple[float, ...] = (0.0, 0.3)
    ratio_vars: tuple[float, ...] = (0.0, 0.2)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def ratio(self, generator: torch.Generator) -> float:
        choice = int(torch.randint(len(self.ratios), (), generator=generator))
        mean, var = self.ratios[choice], self.ratio_vars[choice]
        return _uniform(generator, mean - var, mean + var) if var > 0 else mean

    def mask(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """One (height, width) bool mask."""
        return blocks_mask(height, width, self.ratio(generator) * height * width, (min(height, width) // 3) ** 2,
                           height * width, self.aspect, generator)

    def __call__(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, height, width) bool masks, one ratio drawn per mask."""
        return torch.stack([self.mask(height, width, generator) for _ in range(count)])


def blocks_mask(height: int, width: int, target: float, min_area: float, max_area: float,
                aspect: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """BEiT's blockwise masking (Bao et al. 2022, Alg. 1), as iBOT and DINOv2 use it: rectangles
    of area in [min_area, min(max_area, what is left)] and aspect in `aspect` are added to a
    (height, width) bool mask until `target` patches are masked or ten tries add nothing."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while mask.sum() < target:
        budget = min(target - mask.sum().item(), max_area)
        for _ in range(10):
            area = _uniform(generator, min_area, budget)
            ratio = math.exp(_uniform(generator, *log_aspect))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                added = h * w - mask[top:top + h, left:left + w].sum().item()
                # A block that would overshoot the budget or add nothing is redrawn.
                if 0 < added <= budget:
                    mask[top:top + h, left:left + w] = True
                    break
        else:
            break
    return mask
