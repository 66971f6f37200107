"""Feature extraction spread over Ray tasks: contiguous groups of shards, results back in shard order."""

from __future__ import annotations

import numpy as np

from vitrail.cluster import init_ray
from vitrail.eval.features import extract
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS
from vitrail.pipelines.shards import ShardIndex


def shard_groups(index: ShardIndex, workers: int, limit: int | None = None) -> list[ShardIndex]:
    """At most `workers` contiguous, non-empty groups of the shards that hold the first `limit` samples."""
    shards, total = [], 0
    for shard in index.shards:
        if limit is not None and total >= limit:
            break
        shards.append(shard)
        total += shard["samples"]
    return [ShardIndex(index.folder, index.classes, [shards[i] for i in part])
            for part in np.array_split(np.arange(len(shards)), min(workers, len(shards))) if len(part)]


def ray_feature_batches(backbone, index: ShardIndex, transform, normalization, workers: int,
                        batch_size: int = 256, limit: int | None = None, mode: str = "cls",
                        max_pixels: int = MAX_IMAGE_PIXELS):
    """The batches `features.feature_batches` gives, computed by `workers` Ray tasks of one CPU each.

    Uses the running Ray cluster, or starts one on 127.0.0.1 (shut down afterwards). Each task
    returns its group's features whole, so the driver holds one group at a time.
    """
    started = init_ray(dashboard=False)
    import ray

    try:
        extract_group = ray.remote(num_cpus=1)(_extract_group)
        model = ray.put(backbone.cpu())
        parts = [extract_group.remote(model, group, transform, normalization, batch_size, mode, max_pixels)
                 for group in shard_groups(index, workers, limit)]
        seen = 0
        for part in parts:
            features, labels, keys = ray.get(part)
            keep = len(labels) if limit is None else min(len(labels), limit - seen)
            if keep > 0:
                yield features[:keep], labels[:keep], keys[:keep]
            seen += keep
    finally:
        if started:
            ray.shutdown()


def _extract_group(backbone, index, transform, normalization, batch_size, mode, max_pixels):
    return extract(backbone, index, transform, normalization, batch_size, return_keys=True, mode=mode,
                   max_pixels=max_pixels)

