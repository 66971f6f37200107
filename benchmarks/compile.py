"""torch.compile against eager for the demo's training step (`configs/demo.yaml`), side by side.

    python benchmarks/compile.py [--steps 60] [--train-shards data/fashion-mnist/train]

Both runs train the demo's model in this process on the same real view batches (the local
reader), eager first, then with `run.compile=true` (every backbone through torch.compile,
inductor). The first steps of the compiled run include the compilation (one graph per crop size
and network), cold: inductor's on-disk caches are off unless `--warm-cache`; steady steps/s is taken over the steps after `--warmup`. Compilation pays within a
run of N steps when N x (eager step - compiled step) exceeds its extra seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from vitrail.config import load
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches


def timed_run(config_path: str, shards: str, compiled: bool, batches: list[dict], warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load(config_path, [f"data.shards={shards}", f"run.dir={run_dir}", f"run.compile={compiled}",
                                    "run.precision=fp32"])
        trainer = Trainer(config, read_index(shards).num_samples)
        step_times = []
        for batch in batches:
            started = time.perf_counter()
            trainer.train_step(trainer.method, batch)
            step_times.append(time.perf_counter() - started)
    steady = step_times[warmup:]
    return {"first_steps_s": sum(step_times[:warmup]), "step_s": sum(steady) / len(steady),
            "steps_per_s": len(steady) / sum(steady)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--train-shards", default="data/fashion-mnist/train")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first steps, compilation included, left out of steps/s")
    parser.add_argument("--run-steps", type=int, default=500, help="the run length the break-even is judged on (the demo's)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="let inductor reuse its on-disk caches (default: compile cold, as a first run does)")
    args = parser.parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # read when inductor's config is first imported
    config = load(args.config, [f"data.shards={args.train_shards}"])
    torch.set_num_threads(config.ray.torch_threads or 1)
    reader = local_batches(read_index(args.train_shards), config.method.views(), config.run.seed, config.data.channels,
                           config.optim.batch_size)
    batches = [next(reader) for _ in range(args.steps)]
    eager = timed_run(args.config, args.train_shards, False, batches, args.warmup)
    compiled = timed_run(args.config, args.train_shards, True, batches, args.warmup)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # proof that dynamo compiled
    compile_seconds = compiled["first_steps_s"] - eager["first_steps_s"]
    saved_per_step = eager["step_s"] - compiled["step_s"]
    print(f"{args.config}: {args.steps} steps of {config.optim.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| mode | steady steps/s | step (s) | first {} steps (s) |\n|---|---|---|---|".format(args.warmup))
    for name, row in (("eager", eager), ("compile", compiled)):
        print(f"| {name} | {row['steps_per_s']:.2f} | {row['step_s']:.3f} | {row['first_steps_s']:.1f} |")
    print(f"\n{graphs} graphs compiled; compile time (extra seconds in the first {args.warmup} steps): {compile_seconds:.1f} s; "
          f"speed-up {eager['step_s'] / compiled['step_s']:.2f}x")
    if saved_per_step > 0:
        print(f"pays off after {compile_seconds / saved_per_step:.0f} steps "
              f"({'within' if compile_seconds / saved_per_step < args.run_steps else 'beyond'} a {args.run_steps}-step run)")
    else:
        print("never pays off: the compiled step is not faster")


if __name__ == "__main__":
    main()
