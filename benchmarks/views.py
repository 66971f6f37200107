"""DINO multi-crop views from JPEG shards: our pipeline against the reference recipe, per core.

Builds JPEG shards from real images (Fashion-MNIST upscaled to 256 px RGB, plus the photos
scikit-image ships when it is installed), then measures in this one process (per core: images
per CPU-second of this process, which other load on the machine barely moves):

  reference  DINO's DataAugmentationDINO as the paper's code runs it: PIL decode, torchvision
             v1 transforms per image (RandomResizedCrop bicubic, flip, ColorJitter(0.4, 0.4,
             0.2, 0.1) p=0.8, grayscale p=0.2, GaussianBlur, Solarize; ToTensor, Normalize),
             2 x 224 + 10 x 96, one thread
  vitrail    `stream.make_views` with `MultiCrop()` at 224 / 96 (decode + views, uint8 out;
             normalisation happens on the training device), one torch thread
  ray        shard -> views end to end through `stream.ray_dataset` on a Ray cluster of 1,
             then 2 CPUs (127.0.0.1, shut down after)

    python benchmarks/views.py                 # default sizes
    python benchmarks/views.py --images 128 --ray-images 256   # quick check
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.io import encode_jpeg

from vitrail.pipelines import shards
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.stream import make_views, ray_dataset
from vitrail.pipelines.views import MultiCrop


def _jpeg(image: torch.Tensor) -> bytes:
    return encode_jpeg(image, quality=90).numpy().tobytes()


def _skimage_photos() -> list[torch.Tensor]:
    """The photos bundled in scikit-image's wheel, as (3, H, W) uint8; none without skimage."""
    try:
        import skimage
    except ImportError:
        return []
    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for path in sorted(folder.glob("*.[pj][np]g")):
        image = np.asarray(Image.open(path).convert("RGB"))
        if min(image.shape[:2]) >= 128:  # thumbnails and logos are no photos
            photos.append(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous())
    return photos


def build_shards(out: Path, fashion: int) -> shards.ShardIndex:
    images, labels = load_fashion_mnist("train")
    gray = torch.from_numpy(images[:fashion].copy())[:, None].float()
    upscaled = F.interpolate(gray, size=(256, 256), mode="bicubic", align_corners=False).clamp(0, 255).round().byte()
    samples = [shards.Sample(f"fmnist{n:06d}", "jpg", int(labels[n]), partial(bytes, _jpeg(image.expand(3, -1, -1).contiguous())))
               for n, image in enumerate(upscaled)]
    samples += [shards.Sample(f"photo{n:04d}", "jpg", 10, partial(bytes, _jpeg(photo))) for n, photo in enumerate(_skimage_photos())]
    return shards.write_shards(samples, [str(c) for c in range(11)], out, shard_size=128, log=lambda message: None)


class _Blur:
    """DINO's GaussianBlur: PIL's blur with radius U(0.1, 2), applied with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))) if random.random() <= self.p else image


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        return ImageOps.solarize(image) if random.random() < self.p else image


def dino_reference(global_size=224, local_size=96, num_local=10):
    """DataAugmentationDINO, written from the paper's code: PIL image -> 2 + num_local tensors."""
    flip_and_color_jitter = T.Compose([T.RandomHorizontalFlip(p=0.5),
                                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                       T.RandomGrayscale(p=0.2)])
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC
    global1 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                         flip_and_color_jitter, _Blur(1.0), normalize])
    global2 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                         flip_and_color_jitter, _Blur(0.1), _Solarize(0.2), normalize])
    local = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic),
                       flip_and_color_jitter, _Blur(0.5), normalize])
    return lambda image: [global1(image), global2(image)] + [local(image) for _ in range(num_local)]


def reference_rate(samples: list[dict]) -> float:
    transform = dino_reference()
    transform(Image.open(io.BytesIO(samples[0]["jpg"])).convert("RGB"))  # warm-up
    started = time.process_time()
    for sample in samples:
        transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    return len(samples) / (time.process_time() - started)


def vitrail_rate(samples: list[dict], batch_size: int = 64) -> float:
    recipe = MultiCrop()
    make_views(samples[:8], recipe, 0, 0, channels=3)  # warm-up
    started = time.process_time()
    for start in range(0, len(samples), batch_size):
        columns, bad = make_views(samples[start:start + batch_size], recipe, 0, 0, channels=3)
        assert bad == 0 and columns["global"].shape[1:] == (2, 3, 224, 224) and columns["local"].shape[1:] == (10, 3, 96, 96)
    return len(samples) / (time.process_time() - started)


def ray_rate(index: shards.ShardIndex, cpus: int) -> float:
    import logging

    from vitrail.cluster import LOOPBACK_ENV

    # Before `ray` is imported: it reads its single-machine (loopback) mode then.
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per execution otherwise
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": dict(LOOPBACK_ENV)})
    try:
        dataset = ray_dataset(index, MultiCrop(), seed=0, channels=3, epochs=range(1))
        rows, started = 0, time.perf_counter()
        for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
            rows += len(batch["key"])
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert rows == index.num_samples, (rows, index.num_samples)
    return rows / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="Fashion-MNIST images in the per-core runs (default 512)")
    parser.add_argument("--ray-images", type=int, default=1024, help="Fashion-MNIST images in the Ray runs (default 1024)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray end-to-end runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    with tempfile.TemporaryDirectory() as folder:
        index = build_shards(Path(folder) / "views", args.images)
        samples = [sample for path, shard in zip(index.paths, index.shards) for sample in ShardStream(path, shard["samples"])]
        photos = sum(key["__key__"].startswith("photo") for key in samples)
        print(f"{len(samples)} JPEG samples ({len(samples) - photos} Fashion-MNIST at 256 px, {photos} scikit-image photos); "
              f"views 2 x 224 + 10 x 96; torch {torch.__version__}, 1 thread\n")
        reference, ours = reference_rate(samples), vitrail_rate(samples)
        print("| pipeline (decode + DINO multi-crop) | images/s per core |\n|---|---|")
        print(f"| reference: PIL + torchvision v1, per image (DataAugmentationDINO) | {reference:.1f} |")
        print(f"| vitrail make_views (MultiCrop, uint8 out) | {ours:.1f} |")
        print(f"\nratio vitrail / reference: {ours / reference:.2f}x")
        if args.no_ray:
            return
        ray_index = build_shards(Path(folder) / "ray", args.ray_images)
        print(f"\n| Ray Data shard -> views ({ray_index.num_samples} images, {len(ray_index.shards)} shards) | images/s | per CPU |\n|---|---|---|")
        for cpus in (1, 2):
            rate = ray_rate(ray_index, cpus)
            print(f"| {cpus} CPU{'s' if cpus > 1 else ''} | {rate:.1f} | {rate / cpus:.1f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
