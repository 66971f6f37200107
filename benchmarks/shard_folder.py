"""`vitrail shard folder` on the 70,000 Fashion-MNIST images as PNG files in class folders:
sharded twice (every shard byte-identical), then killed mid-way and re-run (the result equals
the clean run, no sample twice). Each run is the real command in a subprocess.

    python benchmarks/shard_folder.py                                  # 70k images, 5000 per shard
    python benchmarks/shard_folder.py --images 3000 --shard-size 20    # the size tests/test_shards.py runs

The last line is a JSON summary; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vitrail.pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist


def write_folder(root: Path, count: int) -> None:
    """The first `count` of Fashion-MNIST's train then test images as root/<class>/<n>.png."""
    images, labels = (np.concatenate(parts) for parts in zip(load_fashion_mnist("train"), load_fashion_mnist("test")))
    for name in FASHION_MNIST_CLASSES:
        (root / name).mkdir(parents=True)
    for number in range(count):
        Image.fromarray(images[number]).save(root / FASHION_MNIST_CLASSES[labels[number]] / f"{number:05d}.png")


def _command(src: Path, out: Path, shard_size: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "vitrail.launch.cli", "shard", "folder", str(src), str(out),
            "--shard-size", str(shard_size), "--workers", str(workers)]


def shard(src: Path, out: Path, shard_size: int, workers: int) -> float:
    started = time.perf_counter()
    subprocess.run(_command(src, out, shard_size, workers), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def shard_killed(src: Path, out: Path, shard_size: int, workers: int) -> int:
    """Start the command, SIGKILL it and its shard writers once a first shard is recorded;
    returns the number of shards recorded as finished when it died."""
    process = subprocess.Popen(_command(src, out, shard_size, workers), stdout=subprocess.DEVNULL, start_new_session=True)
    progress = out / "progress.jsonl"
    while process.poll() is None and not (progress.exists() and progress.read_text().count("\n") >= 1):
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # its own session: the command and its pool workers
    process.wait()
    if (out / "index.json").exists():
        raise SystemExit("the command finished before it could be killed; use more images or a smaller --shard-size")
    return progress.read_text().count("\n")


def digests(out: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out.glob("shard-*.tar"))}


def duplicate_keys(out: Path) -> int:
    keys = Counter()
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            keys.update(member.name.partition(".")[0] for member in tar if member.name.endswith(".png"))
    return sum(count - 1 for count in keys.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=70000, help="images in the folder (default 70000, all of Fashion-MNIST)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="shard-writing processes (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        write_folder(root / "images", args.images)
        print(f"{args.images} PNG files in {len(FASHION_MNIST_CLASSES)} class folders written in {time.perf_counter() - started:.1f} s")
        first = shard(root / "images", root / "first", args.shard_size, args.workers)
        second = shard(root / "images", root / "second", args.shard_size, args.workers)
        kept = shard_killed(root / "images", root / "killed", args.shard_size, args.workers)
        resumed = shard(root / "images", root / "killed", args.shard_size, args.workers)
        clean = digests(root / "first")
        summary = {
            "images": args.images, "shards": len(clean), "first_s": round(first, 2), "second_s": round(second, 2),
            "identical": digests(root / "second") == clean, "kept_after_kill": kept, "resume_s": round(resumed, 2),
            "resumed_identical": digests(root / "killed") == clean, "duplicates": duplicate_keys(root / "killed"),
            "index_identical": (root / "killed" / "index.json").read_text() == (root / "first" / "index.json").read_text(),
        }
    print(f"| run ({args.images} images, {summary['shards']} shards, {args.workers} workers) | seconds | images/s |\n|---|---|---|")
    for name, seconds in (("first", first), ("second, byte-identical" if summary["identical"] else "second, DIFFERENT", second)):
        print(f"| {name} | {seconds:.1f} | {args.images / seconds:.0f} |")
    print(f"| re-run after SIGKILL ({kept} finished shards kept) | {resumed:.1f} | - |")
    print(json.dumps(summary))
    passed = summary["identical"] and summary["resumed_identical"] and summary["index_identical"] and summary["duplicates"] == 0
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
