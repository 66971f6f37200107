"""Continued pretraining pays: DINO on Fashion-MNIST started from a vitrail DINO run's teacher
(`model.init_from`) against DINO from scratch, weighted k-NN after the same number of steps.

    python benchmarks/init_from.py [--steps 80] [--data data/fashion-mnist] [--out runs/init_from] [--limit 5000]

With the demo recipe (configs/demo.yaml, `vitrail pretrain --local`, online k-NN off):
  1. scratch:   `--steps` steps from random init (it is also the run the next one starts from);
  2. continued: `--steps` steps more, a fresh run with `model.init_from=<scratch run>`, its own
                schedules (warm-up included) and fresh heads;
  3. the same with `model.init_heads=true`: the scratch run's heads and centre too.
A run dir that already holds its `--steps` checkpoint is not retrained (its wall time is then ~0).
Both are scored by `vitrail eval knn` (k = 20, T = 0.07) with the first `--limit` training images
as the bank and the first `--limit` test images as queries. Every command runs with one torch
thread: on a shared machine two threads that wait on each other run many times slower.
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


def vitrail(*args: str) -> float:
    """Run one `vitrail` command; returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitrail.launch.cli", *args], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - started


def knn_top1(run_dir: Path, step: int) -> float:
    rows = json.loads((run_dir / "results.json").read_text())["knn"]
    return next(row["top1"] for row in rows if row["features"] == f"pretrained (step {step})" and row["k"] == 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="steps of each run (default 80)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion-mnist", help="shard folder (made if missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/init_from", help="folder of the two run dirs")
    parser.add_argument("--limit", type=int, default=5_000, help="k-NN bank and query images (default 5000)")
    args = parser.parse_args()
    if not (args.data / "test" / "index.json").exists():
        vitrail("shard", "fashion-mnist", str(args.data))
    common = ["configs/demo.yaml", "--local", f"optim.max_steps={args.steps}", "eval.knn_every=0",
              "run.tracking=none", f"run.checkpoint_every={args.steps}", "run.precision=fp32",
              f"data.shards={args.data / 'train'}", f"data.eval_train_shards={args.data / 'train'}",
              f"data.eval_test_shards={args.data / 'test'}"]
    scratch = args.out / "scratch"
    rows = []
    for name, run_dir, extra in (
            ("from scratch", scratch, []),
            ("init_from the scratch run's teacher, fresh heads", args.out / "continued", [f"model.init_from={scratch}"]),
            ("init_from the scratch run, its heads too", args.out / "continued_heads",
             [f"model.init_from={scratch}", "model.init_heads=true"])):
        train_s = vitrail("pretrain", *common, f"run.dir={run_dir}", *extra)
        eval_s = vitrail("eval", "knn", str(run_dir), "--k", "20", "--limit", str(args.limit))
        rows.append((name, knn_top1(run_dir, args.steps), train_s, eval_s))
    print(f"\nDINO demo recipe, {args.steps} steps of 64 per run; weighted k-NN (k=20, T=0.07), "
          f"{args.limit} bank / {args.limit} query images\n")
    print("| start | steps in this run | steps seen in all | k-NN top-1 | train wall (s) | eval wall (s) |")
    print("|---|---|---|---|---|---|")
    for (name, top1, train_s, eval_s), seen in zip(rows, (args.steps, 2 * args.steps, 2 * args.steps)):
        print(f"| {name} | {args.steps} | {seen} | {top1:.2f} | {train_s:.0f} | {eval_s:.0f} |")


if __name__ == "__main__":
    main()
