"""Object storage against local disk, side by side in one process: Ray Data view throughput over
the demo's Fashion-MNIST shards read from an S3 endpoint and from local disk, and the time to
save the demo model's checkpoint to S3 and to local disk.

    python benchmarks/object_storage.py [--shards data/fashion-mnist/train] [--epochs 1] [--repeats 3]

The S3 endpoint is moto's standalone server on 127.0.0.1 (the one the tests start), so the S3
figures measure the S3 protocol path (pyarrow's client, HTTP, one object per shard), not a
network: a real store adds its latency and bandwidth on top.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from object_storage import s3_server  # noqa: E402  (the tests' S3 server)


def _views_per_second(folder: str, epochs: int) -> tuple[int, float]:
    from vitrail.pipelines.shards import read_index
    from vitrail.pipelines.stream import ray_dataset
    from vitrail.pipelines.views import MultiCrop

    index = read_index(folder)
    dataset = ray_dataset(index, MultiCrop(global_size=28, local_size=12, num_local=4), seed=0, channels=1,
                          epochs=range(epochs), object_store_mb=512)
    started, rows = time.perf_counter(), 0
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(batch["key"])
    return rows, rows / (time.perf_counter() - started)


def _save_seconds(run_dir: str, repeats: int) -> list[float]:
    from vitrail import checkpoints
    from vitrail.config import load
    from vitrail.launch.loop import Trainer

    config = load(ROOT / "configs" / "demo.yaml", [f"run.dir={run_dir}"])
    trainer = Trainer(config, num_samples=60000)
    times = []
    for step in range(1, repeats + 1):
        trainer.step = step
        started = time.perf_counter()
        checkpoints.save(run_dir, step, trainer.state(), keep_last=repeats)
        times.append(time.perf_counter() - started)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist" / "train"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="checkpoint saves per target (median printed)")
    args = parser.parse_args(argv)

    with s3_server() as server, tempfile.TemporaryDirectory(prefix="vitrail-bench-") as scratch:
        os.environ.update(server.environment())  # before Ray starts: its workers inherit them
        server.client().create_bucket(Bucket="bench")
        from vitrail import storage, checkpoints
        from vitrail.cluster import init_ray

        started = time.perf_counter()
        storage.upload_tree(args.shards, "s3://bench/train")
        print(f"uploaded {args.shards} to s3://bench/train in {time.perf_counter() - started:.1f} s")
        init_ray(object_store_mb=1024, dashboard=False)
        for name, folder in (("local disk", args.shards), ("S3 (moto, 127.0.0.1)", "s3://bench/train")):
            rows, rate = _views_per_second(folder, args.epochs)
            print(f"Ray Data views, {name}: {rows} images, {rate:.0f} images/s")
        state_bytes = None
        for name, run_dir in (("local disk", str(Path(scratch) / "run")), ("S3 (moto, 127.0.0.1)", "s3://bench/run")):
            times = _save_seconds(run_dir, args.repeats)
            state_bytes = storage.size_and_mtime(checkpoints.list_checkpoints(run_dir)[-1])[0]
            print(f"checkpoint save, {name}: median {statistics.median(times):.3f} s of {args.repeats} "
                  f"({', '.join(f'{t:.3f}' for t in times)}), {state_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
