"""Shards -> decoded uint8 images -> view columns, through Ray Data or in this process.

Both readers run `shard_views` once per shard: stream the tar (`reader.ShardStream`),
decode, apply the view recipe in batches. So a recipe and the bad-data accounting behave
identically under Ray Train and in the local launcher.

Bad data is skipped and counted, never fatal: an undecodable image (`decode.decode` raises,
never crashes, and refuses images over the pixel limit), a sample lost in a truncated tar
(declared in index.json, never read) and a missing shard all add to the `skipped` column of
a view batch (the count rides on its first row), which the training loop sums into the
`data/skipped` metric; samples a tar holds beyond its declared count are trained on, logged
and counted the same way in `extra` (`data/extra_samples`). A Ray task whose shard gave no
image at all sends its counts on a blank carrier row, removed by `without_carriers` before
training. What stops a run: a shard whose sha256 differs from index.json's (`verify`), and
a shard whose view task keeps dying (`VIEW_TASK_RETRIES`), each named.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch

from vitrail import storage
from vitrail.errors import VitrailError
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS, UndecodableImage, decode
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.shards import READ_EXTENSIONS, ShardIndex, sha256_file

log = logging.getLogger("vitrail.data")
_IMAGE_EXTENSIONS = sorted(READ_EXTENSIONS)
_LOGGED_KEYS = 5
CARRIER_KEY = ""  # see `_count_carrier`
# Per-batch tallies riding on a batch's first row: samples skipped (undecodable, lost to a truncated
# tar, in a missing shard) and samples found in a tar beyond the count index.json declares.
COUNTS = ("skipped", "extra")
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
    for name in COUNTS:
        columns[name] = np.zeros(len(images), dtype=np.int64)
    return columns, len(bad)


def add_counts(columns: dict, counts: dict) -> dict:
    """Add `counts` onto the first row of `columns`; returns counts emptied, for the caller to go on with."""
    for name in COUNTS:
        columns[name][0] += counts[name]
    return dict.fromkeys(COUNTS, 0)


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
                carried: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """View batches of one shard, every skip of it (plus `carried`) counted in their `skipped`, and
    samples beyond those index.json declares in their `extra`.

    The last batch is held back until the tar ends, since only then are the samples lost to
    truncation (or found beyond the declared count) known. A shard without one decodable image
    yields a single `{"skipped": n, "extra": m}` with no rows, for the caller to carry on.
    """
    if shard.verify and storage.exists(shard.path):  # a missing shard is counted as skipped below
        check_sha256(shard)
    stream = ShardStream(shard.path, shard.declared)
    counts, ready, pending = {"skipped": carried, "extra": 0}, None, []

    def batches():
        for sample in stream:
            pending.append(sample)
            if len(pending) == batch_size:
                yield make_views(pending, recipe, seed, epoch, channels, max_pixels)
                pending.clear()
        if pending:
            yield make_views(pending, recipe, seed, epoch, channels, max_pixels)

    for columns, bad in batches():
        counts["skipped"] += bad
        if columns is None:
            continue
        if ready is not None:
            counts = add_counts(ready, counts)
            yield ready
        ready = columns
    counts["skipped"] += stream.lost
    counts["extra"] += stream.extra
    if ready is None:
        yield counts
    else:
        add_counts(ready, counts)
        yield ready


def epoch_shard_order(shards: list, seed: int, epoch: int) -> list:
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _epoch_shards(index: ShardIndex, seed: int, epoch: int, shuffle: bool, verify: bool = False) -> list[ShardRead]:
    shards = [ShardRead(path, shard["samples"], shard["sha256"], verify) for path, shard in zip(index.paths, index.shards)]
    return epoch_shard_order(shards, seed, epoch) if shuffle else shards


def _shard_task(rows: dict, recipe, seed: int, epoch: int, channels: int, batch_size: int, max_pixels: int,
                attempts, retries: int) -> Iterator[dict]:
    """Ray Data map task: one shard's row (`ShardRead`'s fields and "carried") -> its view batches."""
    import ray

    torch.set_num_threads(1)  # one core per data task; the training worker owns the rest
    for number, carried in enumerate(rows["carried"]):
        shard = ShardRead(str(rows["path"][number]), int(rows["declared"][number]), str(rows["sha256"][number]),
                          bool(rows["verify"][number]))
        if ray.get(attempts.start.remote(epoch, shard.path)) == retries:  # the last start Ray allows
            raise VitrailError(f"shard {shard.path}: its view task died (killed, out of memory, or a crash in "
                               f"native code; see the Ray worker logs), and so did every retry ({retries}): the run "
                               "stops here")
        for columns in shard_views(shard, recipe, seed, epoch, channels, batch_size, int(carried), max_pixels):
            if "key" in columns:
                yield columns
            elif any(columns.values()):
                yield _count_carrier(recipe, seed, epoch, channels, columns)


class TaskAttempts:
    """A Ray actor counting how often each (epoch, shard) view task has started. A task killed
    by the OS or by a crash in native code cannot say which shard it held; its retry can, and
    the last retry Ray allows fails the run naming the shard instead of dying once more."""

    def __init__(self):
        self.started: dict[tuple[int, str], int] = {}

    def start(self, epoch: int, path: str) -> int:
        """Registers a start; returns how many starts came before it."""
        before = self.started.get((epoch, path), 0)
        self.started[(epoch, path)] = before + 1
        return before


def _count_carrier(recipe, seed: int, epoch: int, channels: int, counts: dict) -> dict:
    """A blank row, views of the recipe's shapes, whose only use is to carry `counts` out of a
    task that read no image: a task's output is rows, and a count rides on one. Its key is
    empty, which no sample's is; `without_carriers` takes it out before training."""
    columns = recipe([torch.zeros((channels, 8, 8), dtype=torch.uint8)], [CARRIER_KEY], seed, epoch)
    columns["key"] = np.asarray([CARRIER_KEY], dtype=object)
    columns["label"] = np.asarray([-1], dtype=np.int64)
    for name in COUNTS:
        columns[name] = np.asarray([counts[name]], dtype=np.int64)
    return columns


def without_carriers(batches: Iterable[dict]) -> Iterator[dict]:
    """Ray Data's batches without `_count_carrier` rows, their counts moved to the next real row."""
    carried = dict.fromkeys(COUNTS, 0)
    for batch in batches:
        real = batch["key"] != CARRIER_KEY
        if real.all() and not any(carried.values()):
            yield batch
            continue
        for name in COUNTS:
            carried[name] += int(batch[name][~real].sum())
        batch = {name: column[real] for name, column in batch.items()}  # copies: Ray's arrays are read-only
        if len(batch["key"]):
            carried = add_counts(batch, carried)
            yield batch


def _carry_missing(shards: list[ShardRead]) -> list[dict]:
    """Task rows for the shards present now; a missing shard's samples are counted as skipped
    by the next present shard, so its count reaches `data/skipped` though no task reads it."""
    rows, missing = [], 0
    for shard in shards:
        if not storage.exists(shard.path):
            log.warning("shard %s is missing: its %d samples are skipped", shard.path, shard.declared)
            missing += shard.declared
            continue
        rows.append({**asdict(shard), "carried": missing})
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
                view_batch_size: int = 16, object_store_mb: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                verify: bool = False, task_retries: int = VIEW_TASK_RETRIES):
    """A Ray dataset streaming the views of `epochs` back to back: one map task per shard, shards
    reshuffled per epoch. With `verify`, each shard's sha256 is checked when the first epoch reads it.
    A shard whose task dies `task_retries` times fails the dataset, named (a VitrailError)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # Ray Data's per-operator bars would drown the training bar
    context.execution_options = ingest_options(object_store_mb)
    attempts = ray.remote(num_cpus=0)(TaskAttempts).remote()
    per_epoch = []
    for epoch in epochs:
        rows = _carry_missing(_epoch_shards(index, seed, epoch, shuffle, verify and epoch == epochs[0]))
        if not rows:
            raise VitrailError(f"no shard of {index.folder} exists: every file index.json names is missing")
        shards = ray.data.from_items(rows, override_num_blocks=len(rows))
        per_epoch.append(shards.map_batches(
            partial(_shard_task, recipe=recipe, seed=seed, epoch=epoch, channels=channels, batch_size=view_batch_size,
                    max_pixels=max_pixels, attempts=attempts, retries=task_retries),
            # Ray 2.60 takes max_retries only through ray_remote_args (deprecated for 2.64, no named parameter yet).
            batch_size=1, batch_format="numpy", max_retries=task_retries,
        ))
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


def local_batches(index: ShardIndex, recipe, seed: int, channels: int, batch_size: int, start_epoch: int = 0,
                  shuffle: bool = True, epochs: int | None = None, drop_last: bool = True, view_batch_size: int = 64,
                  max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = False):
    """Batches of `batch_size` views read in this process, epoch after epoch. Counts in a dropped
    last batch or a shard with no decodable image ride on the next batch. With `verify`, each
    shard's sha256 is checked when the first epoch reads it."""
    epoch, carried = start_epoch, dict.fromkeys(COUNTS, 0)
    while epochs is None or epoch < start_epoch + epochs:
        parts, count, rows = [], 0, 0
        for shard in _epoch_shards(index, seed, epoch, shuffle, verify and epoch == start_epoch):
            for columns in shard_views(shard, recipe, seed, epoch, channels, view_batch_size, max_pixels=max_pixels):
                if "key" not in columns:
                    carried = {name: carried[name] + columns[name] for name in COUNTS}
                    continue
                parts.append(columns)
                count += len(columns["key"])
                rows += len(columns["key"])
                while count >= batch_size:
                    batch, parts = _split(parts, batch_size)
                    count -= batch_size
                    carried = add_counts(batch, carried)
                    yield batch
        if parts and not drop_last:
            batch, parts = _split(parts, count)
            carried = add_counts(batch, carried)
            yield batch
        if not rows:
            raise VitrailError(f"no shard of {index.folder} holds a readable image (see the warnings above)")
        carried = {name: carried[name] + sum(int(part[name].sum()) for part in parts) for name in COUNTS}
        epoch += 1


def _split(parts: list[dict], size: int) -> tuple[dict, list[dict]]:
    """The first `size` rows of the concatenated `parts`, and the rest as a list of parts."""
    joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    rest = {name: values[size:] for name, values in joined.items()}
    return {name: values[:size] for name, values in joined.items()}, ([rest] if len(rest["key"]) else [])
