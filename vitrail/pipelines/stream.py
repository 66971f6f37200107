"""Shards -> decoded uint8 images -> view columns, through Ray Data or a plain webdataset reader.

Both readers call the same `make_views` on batches of raw samples, so a view recipe behaves
identically under Ray Train and in the local launcher. A sample whose image cannot be
decoded is dropped and counted in the batch's `skipped` column (the count rides on the
first row), and its key is logged.
"""

from __future__ import annotations

import logging
import random
import warnings
from functools import partial

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from vitrail.pipelines.shards import IMAGE_EXTENSIONS, ShardIndex

log = logging.getLogger("vitrail.data")
# torchvision 0.29 deprecates its image codecs in favour of torchcodec, which decodes no still images yet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
_IMAGE_COLUMNS = sorted(set(IMAGE_EXTENSIONS.values()))


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> (channels, H, W) uint8; raises RuntimeError on corrupt data."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def _image_bytes(batch: dict, row: int):
    for column in _IMAGE_COLUMNS:
        values = batch.get(column)
        if values is not None and values[row] is not None:
            return values[row]
    return None


def make_views(batch: dict, recipe, seed: int, epoch: int, channels: int) -> dict[str, np.ndarray]:
    """A batch of raw webdataset samples (columns `__key__`, `cls`, `png`/`jpg`/...) -> views."""
    torch.set_num_threads(1)  # one core per data task; the training worker owns the rest
    images, keys, labels, bad_keys = [], [], [], []
    for row, key in enumerate(batch["__key__"]):
        data = _image_bytes(batch, row)
        try:
            if data is None:
                raise RuntimeError("no image member")
            images.append(decode(data, channels))
        except RuntimeError:
            bad_keys.append(str(key))
            continue
        keys.append(str(key))
        labels.append(int(batch["cls"][row]) if batch.get("cls") is not None and batch["cls"][row] is not None else -1)
    if bad_keys:
        log.warning("skipped %d undecodable samples: %s", len(bad_keys), ", ".join(bad_keys[:5]))
    if not images:
        return {}
    columns = recipe(images, keys, seed, epoch)
    columns["key"] = np.asarray(keys, dtype=object)
    columns["label"] = np.asarray(labels, dtype=np.int64)
    columns["skipped"] = np.zeros(len(images), dtype=np.int64)
    columns["skipped"][0] = len(bad_keys)
    return columns


def epoch_shard_order(paths: list[str], seed: int, epoch: int) -> list[str]:
    order = list(paths)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def ray_dataset(index: ShardIndex, recipe, seed: int, channels: int, epochs: range,
                shuffle: bool = True, view_batch_size: int = 64):
    """A Ray dataset streaming the views of `epochs` back to back, shards reshuffled per epoch."""
    import ray.data

    # Ray Data's per-operator bars would drown the training progress bar.
    ray.data.DataContext.get_current().enable_progress_bars = False
    per_epoch = []
    for epoch in epochs:
        paths = epoch_shard_order(index.paths, seed, epoch) if shuffle else index.paths
        raw = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=len(paths))
        per_epoch.append(raw.map_batches(
            partial(make_views, recipe=recipe, seed=seed, epoch=epoch, channels=channels),
            batch_size=view_batch_size, batch_format="numpy",
        ))
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


def local_batches(index: ShardIndex, recipe, seed: int, channels: int, batch_size: int,
                  start_epoch: int = 0, shuffle: bool = True, epochs: int | None = None, drop_last: bool = True):
    """Batches of views from a plain webdataset reader in this process, epoch after epoch."""
    import webdataset as wds

    epoch = start_epoch
    while epochs is None or epoch < start_epoch + epochs:
        paths = epoch_shard_order(index.paths, seed, epoch) if shuffle else index.paths
        reader = wds.WebDataset(paths, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
        pending: list[dict] = []
        for sample in reader:
            pending.append(sample)
            if len(pending) == batch_size:
                yield _views_of(pending, recipe, seed, epoch, channels)
                pending = []
        if pending and not drop_last:
            yield _views_of(pending, recipe, seed, epoch, channels)
        epoch += 1


def _views_of(samples: list[dict], recipe, seed, epoch, channels) -> dict[str, np.ndarray]:
    columns = {"__key__": [s["__key__"] for s in samples], "cls": [s.get("cls") for s in samples]}
    for column in _IMAGE_COLUMNS:
        if any(column in s for s in samples):
            columns[column] = [s.get(column) for s in samples]
    return make_views(columns, recipe, seed, epoch, channels)
