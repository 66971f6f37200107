"""Ray Train throughput with 1 and with 2 workers (the same per-worker batch), side by side.

    nice -n 10 python benchmarks/scaling.py [--config configs/demo.yaml] [--workers 1 2]
        [--warmup-steps 20] [--steps 60] [--gpus-per-worker G]

Every worker count trains the config for warm-up + measured steps in a fresh run dir, one
after the other on the same local Ray cluster (127.0.0.1) started by this process. Images/s is
taken from metrics.jsonl: its `images_per_second` rows after the warm-up (Ray Data start-up,
first batches), combined as total images over total time (the harmonic mean of the rows).

The machine's cores are split evenly: each worker reserves (cores - 1) / workers CPUs (one is
left to Ray Data's view tasks, as `vitrail pretrain` requires) and runs cores / workers torch
threads, so every count uses the same cores; 2 workers on a 2-core CPU measure what DDP and the
doubled view stream cost against one worker using both cores. With --gpus-per-worker each
worker gets a GPU share instead and the cores matter less.
"""

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from vitrail.config import load
from vitrail.launch.train import pretrain

LOG_EVERY = 10


def images_per_second(run_dir: Path, warmup_steps: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["images_per_second"] for row in rows if row["step"] > warmup_steps and "images_per_second" in row]
    if not rates:
        raise SystemExit(f"no metrics row after step {warmup_steps} in {run_dir}: raise --steps")
    # Each row covers LOG_EVERY steps of the same global batch: total images / total time.
    return statistics.harmonic_mean(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the figure (a multiple of 10)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps (a multiple of 10)")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args()

    cores = os.cpu_count()
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as run_dir:
            config = load(args.config, [
                *args.overrides, f"run.dir={run_dir}", "run.tracking=none", f"run.log_every={LOG_EVERY}", "eval.images=false",
                f"run.checkpoint_every={args.warmup_steps + args.steps}", f"optim.max_steps={args.warmup_steps + args.steps}",
                f"ray.workers={workers}", f"ray.cpus_per_worker={(cores - 1) / workers}",
                f"ray.torch_threads={max(1, cores // workers)}", f"ray.gpus_per_worker={args.gpus_per_worker}",
            ])
            pretrain(config, dashboard=False)
            rate = images_per_second(Path(run_dir), args.warmup_steps)
        rows.append((workers, config, rate))
        print(f"{workers} worker(s): {rate:.1f} images/s", flush=True)

    import ray

    ray.shutdown()
    base = rows[0][2]
    print(f"\n{args.config}, {args.steps} steps after {args.warmup_steps} of warm-up, {cores} cores\n")
    print("| workers | CPUs reserved / worker | torch threads / worker | GPUs / worker | batch / worker | global batch "
          f"| images/s | vs {rows[0][0]} worker(s) |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, config, rate in rows:
        print(f"| {workers} | {config.ray.cpus_per_worker:g} | {config.ray.torch_threads} | {config.ray.gpus_per_worker:g} "
              f"| {config.optim.batch_size} | {config.optim.batch_size * workers} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
