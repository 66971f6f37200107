"""DINO ViT-S/16 training step on one device: throughput, memory, model FLOP utilisation, and
whether the Ray Data view stream keeps up.

    python benchmarks/gpu.py                          # CUDA: the paper's recipe at batch 64 per GPU
    python benchmarks/gpu.py --device cpu --steps 1   # the same code on the CPU (the suite's smoke test)

The step is the real one (`vitrail.launch.loop.Trainer.train_step`) on `configs/dino_vit_small.yaml`:
2 x 224 + 10 x 96 crops, K = 65536, AdamW, EMA teacher, in the precision `run.precision` picks
(bf16 autocast on CUDA). Its views are made once by the real multi-crop recipe from JPEG shards of
Fashion-MNIST upscaled to 256 px, and reused. FLOPs per step are counted by torch's
FlopCounterMode on one warm-up step (forward and backward of the student, forward of the
teacher); MFU = FLOPs per second / the device's dense bf16 peak (`--peak-tflops`, or looked up
for known GPUs). The view stream is measured alone, through `stream.ray_dataset` on a Ray cluster
of every CPU of this machine (127.0.0.1): it keeps up when its images/s reach the step's.

Prints one JSON line and a table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from views import build_shards  # benchmarks/views.py: the JPEG shards its figures use

from vitrail.config import load
from vitrail.launch.loop import Trainer
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.stream import make_views, ray_dataset

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
    "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.1, "L4": 121.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0,
}
# Per device: batch per step and warm-up steps. The CPU default batch is small enough for a
# smoke test (a batch of 64 takes half a minute per step on 2 cores).
DEFAULTS = {"cuda": {"batch_size": 64, "warmup": 3, "stream_images": 1024},
            "cpu": {"batch_size": 4, "warmup": 1, "stream_images": 64}}
IMAGENET_TRAIN = 1_281_167  # the samples the recipe's schedules span; no data is read for them


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for known, peak in BF16_PEAK_TFLOPS.items() if known in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def view_batch(index, recipe, batch_size: int) -> dict:
    """One batch of real multi-crop views (uint8 columns, as the stream delivers them)."""
    samples = []
    for path, shard in zip(index.paths, index.shards):
        samples.extend(ShardStream(path, shard["samples"]))
        if len(samples) >= batch_size:
            break
    columns, skipped = make_views(samples[:batch_size], recipe, seed=0, epoch=0, channels=3)
    assert skipped == 0 and len(columns["key"]) == batch_size, "the benchmark's own shards must decode"
    return columns


def measure_step(trainer: Trainer, batch: dict, warmup: int, steps: int) -> dict:
    device = trainer.device
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(trainer.method, batch)
    for _ in range(warmup - 1):
        trainer.train_step(trainer.method, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step(trainer.method, batch)
    synchronize(device)
    step_seconds = (time.perf_counter() - started) / steps
    if not torch.isfinite(torch.tensor(metrics["loss"])):
        raise SystemExit(f"loss is {metrics['loss']}: the benchmark's step is broken")
    return {"step_s": step_seconds, "flops_per_step": counter.get_total_flops(), "loss": metrics["loss"]}


def measure_stream(index, recipe) -> float:
    """Images per second of the Ray Data view stream alone, on every CPU of this machine."""
    from vitrail.cluster import init_ray

    init_ray(dashboard=False)
    import ray

    try:
        rows, started = 0, time.perf_counter()
        for batch in ray_dataset(index, recipe, seed=0, channels=3, epochs=range(1)).iter_batches(
                batch_size=64, batch_format="numpy"):
            rows += len(batch["key"])
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
    return rows / elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, the FLOP count among them "
                        f"(default {DEFAULTS['cuda']['warmup']} on cuda, {DEFAULTS['cpu']['warmup']} on cpu)")
    parser.add_argument("--batch-size", type=int, help=f"images per step (default {DEFAULTS['cuda']['batch_size']} "
                        f"on cuda, the paper's per-GPU batch; {DEFAULTS['cpu']['batch_size']} on cpu)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--compile", action="store_true", help="run.compile: torch.compile the backbones")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (looked up for known GPUs)")
    parser.add_argument("--stream-images", type=int, help="images through the Ray Data view stream "
                        f"(default {DEFAULTS['cuda']['stream_images']} on cuda, {DEFAULTS['cpu']['stream_images']} on cpu)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "dino_vit_small.yaml"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; run with --device cpu")
    device = torch.device(args.device)
    batch_size = args.batch_size or DEFAULTS[device.type]["batch_size"]
    warmup = max(1, args.warmup or DEFAULTS[device.type]["warmup"])
    stream_images = args.stream_images or DEFAULTS[device.type]["stream_images"]

    with tempfile.TemporaryDirectory() as folder:
        config = load(args.config, [f"run.dir={folder}/run", f"run.precision={args.precision}",
                                    f"run.compile={args.compile}", f"optim.batch_size={batch_size}", "ray.workers=1"])
        trainer = Trainer(config, IMAGENET_TRAIN, device=device)
        recipe = config.method.views()
        index = build_shards(Path(folder) / "shards", max(batch_size, stream_images))
        step = measure_step(trainer, view_batch(index, recipe, batch_size), warmup, args.steps)
        stream_rate = measure_stream(index, recipe)

    images_per_second = batch_size / step["step_s"]
    peak = peak_tflops(device, args.peak_tflops)
    achieved_tflops = step["flops_per_step"] / step["step_s"] / 1e12
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "model": "dino vit_small/16, 2x224 + 10x96", "batch": batch_size,
        "precision": "bf16" if trainer.autocast else "fp32", "compile": args.compile,
        "step_s": round(step["step_s"], 4), "images_per_s": round(images_per_second, 1),
        "peak_memory_mib": round(peak_memory_mib(device)), "tflop_per_step": round(step["flops_per_step"] / 1e12, 3),
        "achieved_tflops": round(achieved_tflops, 2), "peak_bf16_tflops": peak,
        "mfu": round(achieved_tflops / peak, 4) if peak else None,
        "stream_images_per_s": round(stream_rate, 1), "stream_keeps_up": stream_rate >= images_per_second,
    }
    print(json.dumps(row))
    mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a (no peak given)"
    print("| device | batch | precision | step (s) | images/s | peak memory (MiB) | TFLOP/step | MFU | "
          "view stream images/s | keeps up |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['device']} | {batch_size} | {row['precision']}{' + compile' if args.compile else ''} | "
          f"{row['step_s']:.3f} | {row['images_per_s']:.1f} | {row['peak_memory_mib']:,} | {row['tflop_per_step']:.3f} | "
          f"{mfu} | {row['stream_images_per_s']:.1f} | {'yes' if row['stream_keeps_up'] else 'no'} |")
    sys.stdout.flush()
    return row


if __name__ == "__main__":
    main()
