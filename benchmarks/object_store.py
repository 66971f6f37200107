"""Bounded memory: stream several epochs of DINO views, many times the object store's size,
through `stream.ray_dataset` on a Ray cluster whose object store is `--object-store-mb`, and
print the peak object-store use (sampled every 0.2 s) and what Ray spilled to disk.

    python benchmarks/object_store.py [--images 1000] [--epochs 2] [--object-store-mb 256] [--cpus 2]

Ray Data's budget is half the store (`stream.ingest_options`): the view tasks pause when the
consumer lags, so the peak stays near the budget whatever the data set's size.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from views import build_shards  # noqa: E402  (the JPEG shards of benchmarks/views.py)

from vitrail.pipelines.stream import ray_dataset  # noqa: E402
from vitrail.pipelines.views import MultiCrop  # noqa: E402


def _store_mib() -> tuple[float, float]:
    """(object-store MiB in use, MiB spilled so far), from Ray's `ray memory --stats-only` summary."""
    from ray._private.internal_api import memory_summary

    summary = memory_summary(stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB", summary)
    spilled = re.search(r"Spilled (\d+) MiB", summary)
    return float(used.group(1)) if used else 0.0, float(spilled.group(1)) if spilled else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images per epoch (default 1000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--object-store-mb", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args(argv)
    from vitrail.cluster import LOOPBACK_ENV

    # Before `ray` is imported: it reads its single-machine (loopback) mode then.
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        index = build_shards(Path(folder), args.images)
        ray.init(num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 object_store_memory=args.object_store_mb * 2**20, runtime_env={"env_vars": dict(LOOPBACK_ENV)})
        peak, done = [0.0, 0.0], threading.Event()

        def sample():
            while not done.is_set():
                used, spilled = _store_mib()
                peak[0], peak[1] = max(peak[0], used), max(peak[1], spilled)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            dataset = ray_dataset(index, MultiCrop(), seed=0, channels=3, epochs=range(args.epochs),
                                  object_store_mb=args.object_store_mb)
            sampler.start()
            rows, view_bytes, started = 0, 0, time.perf_counter()
            for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
                rows += len(batch["key"])
                view_bytes += batch["global"].nbytes + batch["local"].nbytes
                time.sleep(0.05)  # a trainer slower than the data: backpressure has to hold the tasks back
            elapsed = time.perf_counter() - started
        finally:
            done.set()
            ray.shutdown()
    print("| views streamed | object store | Ray Data budget | peak in use | spilled | seconds |\n|---|---|---|---|---|---|")
    print(f"| {rows} ({view_bytes / 2**20:.0f} MiB, {args.epochs} epochs) | {args.object_store_mb} MiB | "
          f"{args.object_store_mb // 2} MiB | {peak[0]:.0f} MiB | {peak[1]:.0f} MiB | {elapsed:.0f} |")


if __name__ == "__main__":
    main()
