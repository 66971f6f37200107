"""Shards -> decoded uint8 images -> view columns, through Ray Data or in this process.

Both readers run `shard_views` once per shard: stream the tar (`reader.ShardStream`),
decode, apply the view recipe in batches. So a recipe and the bad-data accounting behave
identically under Ray Train and in the local launcher.

Bad data is skipped and counted, never fatal: an undecodable image, a sample lost in a
truncated tar (declared in index.json, never read) and a missing shard all add to the
`skipped` column of a view batch (the count rides on its first row), which the training
loop sums into the `data/skipped` metric. A Ray task whose shard gave no image at all sends
its count on a blank carrier row, removed by `without_carriers` before training.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from vitrail.errors import VitrailError
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.shards import READ_EXTENSIONS, ShardIndex

log = logging.getLogger("vitrail.data")
# torchvision 0.29 deprecates its image codecs in favour of torchcodec, which decodes no still images yet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
_IMAGE_EXTENSIONS = sorted(READ_EXTENSIONS)
_LOGGED_KEYS = 5
CARRIER_KEY = ""  # see `_count_carrier`


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> (channels, H, W) uint8; raises RuntimeError or ValueError on corrupt data."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def make_views(samples: list[dict], recipe, seed: int, epoch: int, channels: int) -> tuple[dict | None, int]:
    """Raw samples `{"__key__", "cls", "jpg"|"png"|...}` -> (view columns or None when no image
    decoded, number of samples skipped as undecodable)."""
    images, keys, labels, bad_keys = [], [], [], []
    for sample in samples:
        key = str(sample["__key__"])
        data = next((sample[ext] for ext in _IMAGE_EXTENSIONS if ext in sample), None)
        try:
            if data is None:
                raise ValueError("no image member")
            label = int(sample["cls"]) if "cls" in sample else -1
            images.append(decode(data, channels))
        except (RuntimeError, ValueError):
            bad_keys.append(key)
            continue
        keys.append(key)
        labels.append(label)
    if bad_keys:
        log.warning("skipped %d undecodable samples: %s", len(bad_keys), ", ".join(bad_keys[:_LOGGED_KEYS]))
    if not images:
        return None, len(bad_keys)
    columns = recipe(images, keys, seed, epoch)
    columns["key"] = np.asarray(keys, dtype=object)
    columns["label"] = np.asarray(labels, dtype=np.int64)
    columns["skipped"] = np.zeros(len(images), dtype=np.int64)
    return columns, len(bad_keys)


def shard_views(path: str, declared: int, recipe, seed: int, epoch: int, channels: int,
                batch_size: int, carried: int = 0) -> Iterator[dict]:
    """View batches of one shard, every skip of it (plus `carried`) counted in their `skipped`.

    The last batch is held back until the tar ends, since only then is the number of samples
    lost to truncation known. A shard without one decodable image yields a single
    `{"skipped": n}` with no rows, for the caller to carry into a later batch.
    """
    stream = ShardStream(path, declared)
    skipped, ready, pending = carried, None, []

    def batches():
        for sample in stream:
            pending.append(sample)
            if len(pending) == batch_size:
                yield make_views(pending, recipe, seed, epoch, channels)
                pending.clear()
        if pending:
            yield make_views(pending, recipe, seed, epoch, channels)

    for columns, bad in batches():
        skipped += bad
        if columns is None:
            continue
        if ready is not None:
            ready["skipped"][0] += skipped
            skipped = 0
            yield ready
        ready = columns
    skipped += stream.lost
    if ready is None:
        yield {"skipped": skipped}
    else:
        ready["skipped"][0] += skipped
        yield ready


def epoch_shard_order(shards: list, seed: int, epoch: int) -> list:
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _epoch_shards(index: ShardIndex, seed: int, epoch: int, shuffle: bool) -> list[tuple[str, int]]:
    shards = [(str(index.folder / shard["name"]), int(shard["samples"])) for shard in index.shards]
    return epoch_shard_order(shards, seed, epoch) if shuffle else shards


def _shard_task(rows: dict, recipe, seed: int, epoch: int, channels: int, batch_size: int) -> Iterator[dict]:
    """Ray Data map task: one shard's row `{"path", "samples", "carried"}` -> its view batches."""
    torch.set_num_threads(1)  # one core per data task; the training worker owns the rest
    for path, declared, carried in zip(rows["path"], rows["samples"], rows["carried"]):
        for columns in shard_views(str(path), int(declared), recipe, seed, epoch, channels, batch_size, int(carried)):
            if "key" in columns:
                yield columns
            elif columns["skipped"]:
                yield _count_carrier(recipe, seed, epoch, channels, columns["skipped"])


def _count_carrier(recipe, seed: int, epoch: int, channels: int, skipped: int) -> dict:
    """A blank row, views of the recipe's shapes, whose only use is to carry `skipped` out of a
    task that read no image: a task's output is rows, and a count rides on one. Its key is
    empty, which no sample's is; `without_carriers` takes it out before training."""
    columns = recipe([torch.zeros((channels, 8, 8), dtype=torch.uint8)], [CARRIER_KEY], seed, epoch)
    columns["key"] = np.asarray([CARRIER_KEY], dtype=object)
    columns["label"] = np.asarray([-1], dtype=np.int64)
    columns["skipped"] = np.asarray([skipped], dtype=np.int64)
    return columns


def without_carriers(batches: Iterable[dict]) -> Iterator[dict]:
    """Ray Data's batches without `_count_carrier` rows, their counts moved to the next real row."""
    carried = 0
    for batch in batches:
        real = batch["key"] != CARRIER_KEY
        if real.all() and not carried:
            yield batch
            continue
        carried += int(batch["skipped"][~real].sum())
        batch = {name: column[real] for name, column in batch.items()}  # copies: Ray's arrays are read-only
        if len(batch["key"]):
            batch["skipped"][0] += carried
            carried = 0
            yield batch


def _carry_missing(shards: list[tuple[str, int]]) -> list[dict]:
    """Task rows for the shards present now; a missing shard's samples are counted as skipped
    by the next present shard, so its count reaches `data/skipped` though no task reads it."""
    rows, missing = [], 0
    for path, declared in shards:
        if not os.path.exists(path):
            log.warning("shard %s is missing: its %d samples are skipped", path, declared)
            missing += declared
            continue
        rows.append({"path": path, "samples": declared, "carried": missing})
        missing = 0
    if rows and missing:
        rows[0]["carried"] += missing
    return rows


def ingest_options(object_store_mb: int | None):
    """Ray Data execution options with an explicit object-store budget: half of `object_store_mb`
    (Ray Data's own default fraction), so read and view tasks pause (backpressure) instead of
    outrunning the trainer, whatever the data set's size. None keeps Ray Data's default."""
    from ray.data import ExecutionOptions, ExecutionResources

    options = ExecutionOptions()
    if object_store_mb:
        options.resource_limits = ExecutionResources(object_store_memory=object_store_mb * 2**20 // 2)
    return options


def ray_dataset(index: ShardIndex, recipe, seed: int, channels: int, epochs: range, shuffle: bool = True,
                view_batch_size: int = 16, object_store_mb: int | None = None):
    """A Ray dataset streaming the views of `epochs` back to back: one map task per shard, shards
    reshuffled per epoch."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # Ray Data's per-operator bars would drown the training bar
    context.execution_options = ingest_options(object_store_mb)
    per_epoch = []
    for epoch in epochs:
        rows = _carry_missing(_epoch_shards(index, seed, epoch, shuffle))
        if not rows:
            raise VitrailError(f"no shard of {index.folder} exists: every file index.json names is missing")
        shards = ray.data.from_items(rows, override_num_blocks=len(rows))
        per_epoch.append(shards.map_batches(
            partial(_shard_task, recipe=recipe, seed=seed, epoch=epoch, channels=channels, batch_size=view_batch_size),
            batch_size=1, batch_format="numpy",
        ))
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


def local_batches(index: ShardIndex, recipe, seed: int, channels: int, batch_size: int, start_epoch: int = 0,
                  shuffle: bool = True, epochs: int | None = None, drop_last: bool = True, view_batch_size: int = 64):
    """Batches of `batch_size` views read in this process, epoch after epoch. Skips counted in a
    dropped last batch or a shard with no decodable image ride on the next batch."""
    epoch, carried = start_epoch, 0
    while epochs is None or epoch < start_epoch + epochs:
        parts, count, rows = [], 0, 0
        for path, declared in _epoch_shards(index, seed, epoch, shuffle):
            for columns in shard_views(path, declared, recipe, seed, epoch, channels, view_batch_size):
                if "key" not in columns:
                    carried += columns["skipped"]
                    continue
                parts.append(columns)
                count += len(columns["key"])
                rows += len(columns["key"])
                while count >= batch_size:
                    batch, parts = _split(parts, batch_size)
                    count -= batch_size
                    batch["skipped"][0] += carried
                    carried = 0
                    yield batch
        if parts and not drop_last:
            batch, parts = _split(parts, count)
            batch["skipped"][0] += carried
            carried = 0
            yield batch
        if not rows:
            raise VitrailError(f"no shard of {index.folder} holds a readable image (see the warnings above)")
        carried += sum(int(part["skipped"].sum()) for part in parts)
        epoch += 1


def _split(parts: list[dict], size: int) -> tuple[dict, list[dict]]:
    """The first `size` rows of the concatenated `parts`, and the rest as a list of parts."""
    joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    rest = {name: values[size:] for name, values in joined.items()}
    return {name: values[:size] for name, values in joined.items()}, ([rest] if len(rest["key"]) else [])
