"""Training throughput and peak memory of every backbone, as a markdown table.

For each variant and image size: forward + backward images/s in train mode, and the peak
memory the step needs beyond the model itself (CUDA: peak allocated; CPU: peak resident set
above the resident set before the first step). Each measurement runs in a fresh process so
one variant's peak memory cannot hide another's.

    python benchmarks/backbones.py                      # every variant, 224 and 96 px, CPU (+ CUDA)
    python benchmarks/backbones.py --variants vit_small,swin_tiny --batch 32 --devices cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitrail import backbones  # noqa: E402


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, size: int, batch: int, iterations: int, device: str) -> dict:
    torch.manual_seed(0)
    model = backbones.create(name).to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    params = sum(p.numel() for p in model.parameters())

    def step():
        model.zero_grad(set_to_none=True)
        model(images).square().mean().backward()

    before = _resident_mib()
    step()  # warm-up: allocator, kernels, autotuning
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before  # ru_maxrss is KiB on Linux
    elapsed = time.perf_counter() - start
    return dict(name=name, size=size, device=device, params=params, images_per_s=batch * iterations / elapsed, peak_mib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(backbones.names()), help="comma-separated backbone names")
    parser.add_argument("--sizes", default="224,96", help="comma-separated image sides")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.variants.split(",")
    sizes = [int(size) for size in args.sizes.split(",")]
    devices = args.devices.split(",")

    if args.worker:  # one measurement, result as JSON on stdout
        print(json.dumps(measure(names[0], sizes[0], args.batch, args.iterations, devices[0])))
        return

    unknown = sorted(set(names) - set(backbones.names()))
    if unknown:
        parser.error(f"unknown backbone(s) {', '.join(unknown)}; known: {', '.join(backbones.names())}")
    rows = []
    for device in devices:
        for name in names:
            for size in sizes:
                command = [sys.executable, __file__, "--worker", "--variants", name, "--sizes", str(size),
                           "--batch", str(args.batch), "--iterations", str(args.iterations), "--devices", device]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{name} @ {size} on {device} failed:\n{result.stderr}", file=sys.stderr)
                    continue
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"done {name} @ {size} on {device}", file=sys.stderr)

    print(f"Forward + backward, train mode, batch {args.batch}, {args.iterations} timed steps.\n")
    print("| backbone | params (M) | device | image | images/s | peak step memory (MiB) |")
    print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['name']} | {row['params'] / 1e6:.1f} | {row['device']} | {row['size']} "
            f"| {row['images_per_s']:.1f} | {row['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
