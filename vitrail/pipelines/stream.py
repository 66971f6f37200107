"""Shards -> decoded uint8 images -> view columns, through Ray Data or in this process.

Both readers run `shard_views` once per shard: stream the tar (`reader.ShardStream`),
decode, apply the view recipe in batches. So a recipe and the bad-data accounting behave
identically under Ray Train and in the local launcher.

Bad data is skipped and counted, never fatal: an undecodable image (`decode.decode` raises,
never crashes, and refuses images over the pixel limit), a sample lost in a truncated tar
(declared in index.json, never read) and every sample of a missing shard are `skipped`;
samples a tar holds beyond its declared count are trained on, logged and counted as `extra`.
The counts go beside the batches, not in them: `shard_views` records each shard's in a
`ShardLedger` (`ledger.py`: a plain object in the local launcher, one Ray actor per run under
Ray, which the view tasks on every node and the training loop share), and the loop asks it for the
totals of `data/skipped` and `data/extra_samples` when it logs. Batches hold the views, "key"
and "label" alone. What stops a run: a shard whose sha256 differs from index.json's
(`verify`), and a shard whose view task keeps dying (`VIEW_TASK_RETRIES`), each named.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch

from vitrail import storage
from vitrail.errors import VitrailError
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS, UndecodableImage, decode
from vitrail.pipelines.ledger import RemoteLedger, ShardLedger
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.shards import READ_EXTENSIONS, ShardIndex, sha256_file

log = logging.getLogger("vitrail.data")
_IMAGE_EXTENSIONS = sorted(READ_EXTENSIONS)
_LOGGED_KEYS = 5
# Ray retries a view task that died (Ray Data's default is forever: a shard that kills its task would hang the run).
VIEW_TASK_RETRIES = 3


def decode_sample(sample: dict, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, int]:
    """A raw sample `{"__key__", "cls", "jpg"|"png"|...}` -> (uint8 (C, H, W) image, label or -1);
    raises UndecodableImage saying why it has none."""
    data = next((sample[ext] for ext in _IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise UndecodableImage(f"no image member ({', '.join(_IMAGE_EXTENSIONS)})")
    try:
        label = int(sample["cls"]) if "cls" in sample else -1
    except ValueError:
        raise UndecodableImage(f"label {sample['cls'][:20]!r} is not an integer") from None
    return decode(data, channels, max_pixels), label


def make_views(samples: list[dict], recipe, seed: int, epoch: int, channels: int,
               max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[dict | None, int]:
    """Raw samples -> (view columns or None when no image decoded, number of samples skipped as undecodable)."""
    images, keys, labels, bad = [], [], [], []
    for sample in samples:
        key = str(sample["__key__"])
        try:
            image, label = decode_sample(sample, channels, max_pixels)
        except UndecodableImage as error:
            bad.append(f"{key} ({error})")
            continue
        images.append(image)
        keys.append(key)
        labels.append(label)
    if bad:
        log.warning("skipped %d undecodable samples: %s", len(bad), "; ".join(bad[:_LOGGED_KEYS]))
    if not images:
        return None, len(bad)
    columns = recipe(images, keys, seed, epoch)
    columns["key"] = np.asarray(keys, dtype=object)
    columns["label"] = np.asarray(labels, dtype=np.int64)
    return columns, len(bad)


@dataclass(frozen=True)
class ShardRead:
    """What a reader needs of one shard, from index.json."""

    path: str
    declared: int   # samples index.json declares
    sha256: str     # checked before reading when `verify`
    verify: bool = False


def check_sha256(shard: ShardRead) -> None:
    """Fail, naming the shard, when its bytes are not those index.json recorded (data.verify)."""
    found = sha256_file(shard.path)
    if found != shard.sha256:
        raise VitrailError(f"shard {shard.path} has sha256 {found}, index.json says {shard.sha256}: the shard changed "
                           "after indexing; re-run `vitrail shard` (or `vitrail shard index`) on its folder")


def shard_views(shard: ShardRead, recipe, seed: int, epoch: int, channels: int, batch_size: int,
                ledger: ShardLedger | RemoteLedger, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """View batches of one shard; once its tar has ended, its samples skipped and those beyond the
    count index.json declares go to `ledger`.

    The last batch is held back until they are recorded: a trainer that holds every row of a
    shard finds the shard counted.
    """
    if shard.verify and storage.exists(shard.path):  # a missing shard is counted as skipped below
        check_sha256(shard)
    stream = ShardStream(shard.path, shard.declared)
    skipped, ready, pending = 0, None, []

    def batches():
        for sample in stream:
            pending.append(sample)
            if len(pending) == batch_size:
                yield make_views(pending, recipe, seed, epoch, channels, max_pixels)
                pending.clear()
        if pending:
            yield make_views(pending, recipe, seed, epoch, channels, max_pixels)

    for columns, bad in batches():
        skipped += bad
        if columns is None:
            continue
        if ready is not None:
            yield ready
        ready = columns
    ledger.record(epoch, shard.path, skipped + stream.lost, stream.extra)
    if ready is not None:
        yield ready


def epoch_shard_order(shards: list, seed: int, epoch: int) -> list:
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _epoch_shards(index: ShardIndex, seed: int, epoch: int, shuffle: bool, verify: bool = False) -> list[ShardRead]:
    shards = [ShardRead(path, shard["samples"], shard["sha256"], verify) for path, shard in zip(index.paths, index.shards)]
    return epoch_shard_order(shards, seed, epoch) if shuffle else shards


def _shard_task(rows: dict, recipe, seed: int, epoch: int, channels: int, batch_size: int, max_pixels: int,
                ledger: RemoteLedger, dataset: int, retries: int) -> Iterator[dict]:
    """Ray Data map task: one shard's row (`ShardRead`'s fields) -> its view batches (none when
    the shard gave no image: its counts are in `ledger`)."""
    torch.set_num_threads(1)  # one core per data task; the training worker owns the rest
    for number, path in enumerate(rows["path"]):
        shard = ShardRead(str(path), int(rows["declared"][number]), str(rows["sha256"][number]),
                          bool(rows["verify"][number]))
        if ledger.start(dataset, epoch, shard.path) == retries:  # the last start Ray allows
            raise VitrailError(f"shard {shard.path}: its view task died (killed, out of memory, or a crash in "
                               f"native code; see the Ray worker logs), and so did every retry ({retries}): the run "
                               "stops here")
        yield from shard_views(shard, recipe, seed, epoch, channels, batch_size, ledger, max_pixels)


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
                view_batch_size: int = 16, object_store_mb: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                verify: bool = False, task_retries: int = VIEW_TASK_RETRIES, ledger: RemoteLedger | None = None):
    """A Ray dataset streaming the views of `epochs` back to back: one map task per shard, shards
    reshuffled per epoch; each shard's counts go to `ledger` (a new one when None). With `verify`,
    each shard's sha256 is checked when the first epoch reads it. A shard whose task dies
    `task_retries` times fails the dataset, named (a VitrailError)."""
    import ray.data

    if not any(storage.exists(path) for path in index.paths):
        raise VitrailError(f"no shard of {index.folder} exists: every file index.json names is missing")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # Ray Data's per-operator bars would drown the training bar
    context.execution_options = ingest_options(object_store_mb)
    ledger = RemoteLedger() if ledger is None else ledger
    dataset = ledger.new_dataset()
    per_epoch = []
    for epoch in epochs:
        rows = [asdict(shard) for shard in _epoch_shards(index, seed, epoch, shuffle, verify and epoch == epochs[0])]
        shards = ray.data.from_items(rows, override_num_blocks=len(rows))
        per_epoch.append(shards.map_batches(
            partial(_shard_task, recipe=recipe, seed=seed, epoch=epoch, channels=channels, batch_size=view_batch_size,
                    max_pixels=max_pixels, ledger=ledger, dataset=dataset, retries=task_retries),
            # Ray 2.60 takes max_retries only through ray_remote_args (deprecated for 2.64, no named parameter yet).
            batch_size=1, batch_format="numpy", max_retries=task_retries,
        ))
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


def local_batches(index: ShardIndex, recipe, seed: int, channels: int, batch_size: int, start_epoch: int = 0,
                  shuffle: bool = True, epochs: int | None = None, drop_last: bool = True, view_batch_size: int = 64,
                  max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = False, ledger: ShardLedger | None = None):
    """Batches of `batch_size` views read in this process, epoch after epoch; each shard's counts
    go to `ledger` when given. With `verify`, each shard's sha256 is checked when the first epoch reads it."""
    ledger = ShardLedger() if ledger is None else ledger
    epoch = start_epoch
    while epochs is None or epoch < start_epoch + epochs:
        parts, count, rows = [], 0, 0
        for shard in _epoch_shards(index, seed, epoch, shuffle, verify and epoch == start_epoch):
            for columns in shard_views(shard, recipe, seed, epoch, channels, view_batch_size, ledger, max_pixels):
                parts.append(columns)
                count += len(columns["key"])
                rows += len(columns["key"])
                while count >= batch_size:
                    batch, parts = _split(parts, batch_size)
                    count -= batch_size
                    yield batch
        if parts and not drop_last:
            batch, parts = _split(parts, count)
            yield batch
        if not rows:
            raise VitrailError(f"no shard of {index.folder} holds a readable image (see the warnings above)")
        epoch += 1


def _split(parts: list[dict], size: int) -> tuple[dict, list[dict]]:
    """The first `size` rows of the concatenated `parts`, and the rest as a list of parts."""
    joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    rest = {name: values[size:] for name, values in joined.items()}
    return {name: values[:size] for name, values in joined.items()}, ([rest] if len(rest["key"]) else [])
