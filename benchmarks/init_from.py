"""Continued pretraining pays: DINO on Fashion-MNIST started from a vitrail DINO run's teacher
(`model.init_from`) against DINO from scratch, weighted k-NN after the same number of steps.

    python benchmarks/init_from.py [--source-steps 500] [--steps 200] [--data data/fashion-mnist]
        [--out runs/init_from] [--limit 5000] [--threads 2]

With the demo recipe (configs/demo.yaml, `vitrail pretrain --local`, online k-NN off):
  0. source:    `--source-steps` steps from random init: the released weights a user starts from
                (500 steps is `make demo`'s run);
  1. scratch:   `--steps` steps from random init;
  2. continued: `--steps` steps, a fresh run with `model.init_from=<source run>`: its teacher
                backbone, fresh heads, its own schedules (warm-up included);
  3. the same with `model.init_heads=true`: the source run's heads and centre too.
A run dir that already holds its checkpoint is not retrained (its wall time is then ~0).
Each is scored by `vitrail eval knn` (k = 20, T = 0.07) with the first `--limit` training images
as the bank and the first `--limit` test images as queries. `--threads 1` on a shared machine:
two threads that wait on each other run many times slower there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vitrail(threads: int, *args: str) -> float:
    """Run one `vitrail` command; returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitrail.launch.cli", *args], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - started


def knn_top1(run_dir: Path, step: int) -> float:
    rows = json.loads((run_dir / "results.json").read_text())["knn"]
    return next(row["top1"] for row in rows if row["features"] == f"pretrained (step {step})" and row["k"] == 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-steps", type=int, default=500, help="steps of the run started from (default 500)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each compared run (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per command (default 2)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion-mnist", help="shard folder (made if missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/init_from", help="folder of the two run dirs")
    parser.add_argument("--limit", type=int, default=5_000, help="k-NN bank and query images (default 5000)")
    args = parser.parse_args()
    if not (args.data / "test" / "index.json").exists():
        vitrail(args.threads, "shard", "fashion-mnist", str(args.data))
    common = ["configs/demo.yaml", "--local", "eval.knn_every=0", "run.tracking=none", "run.precision=fp32",
              f"data.shards={args.data / 'train'}", f"data.eval_train_shards={args.data / 'train'}",
              f"data.eval_test_shards={args.data / 'test'}"]
    source = args.out / "source"
    rows = []
    for name, run_dir, steps, seen, extra in (
            ("source run, from scratch", source, args.source_steps, args.source_steps, []),
            ("from scratch", args.out / "scratch", args.steps, args.steps, []),
            ("`init_from` the source run's teacher, fresh heads", args.out / "continued", args.steps,
             args.source_steps + args.steps, [f"model.init_from={source}"]),
            ("`init_from` the source run, its heads and centre too", args.out / "continued_heads", args.steps,
             args.source_steps + args.steps, [f"model.init_from={source}", "model.init_heads=true"])):
        train_s = vitrail(args.threads, "pretrain", *common, f"optim.max_steps={steps}", f"run.checkpoint_every={steps}",
                          f"run.dir={run_dir}", *extra)
        eval_s = vitrail(args.threads, "eval", "knn", str(run_dir), "--k", "20", "--limit", str(args.limit))
        rows.append((name, steps, seen, knn_top1(run_dir, steps), train_s, eval_s))
    print(f"\nDINO demo recipe, steps of 64; weighted k-NN (k=20, T=0.07), {args.limit} bank / {args.limit} query "
          f"images, {args.threads} torch threads\n")
    print("| start | steps in this run | steps seen in all | k-NN top-1 | train wall (s) | eval wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, steps, seen, top1, train_s, eval_s in rows:
        print(f"| {name} | {steps} | {seen} | {top1:.2f} | {train_s:.0f} | {eval_s:.0f} |")


if __name__ == "__main__":
    main()
