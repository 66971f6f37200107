"""The demo's recipe search: `configs/demo.yaml` with overrides, each variant trained and scored.

    python benchmarks/demo_recipe.py --seeds 0 [1 2] \\
        --variant "demo" \\
        --variant "7-px patches" model.kwargs.patch_size=7 method.local_crop_size=14 optim.max_steps=1200

Each variant trains `vitrail pretrain configs/demo.yaml --local` in this process with its
`KEY=VALUE` overrides (fp32, online k-NN and tracking off, 2 torch threads), then its teacher is
scored by the same full k-NN as `make demo` and benchmarks/reference_dino.py (k = 20, T = 0.07,
60,000 training images as the bank, 10,000 test images as the queries). Prints one row per
variant: steps, training wall seconds and k-NN top-1 as mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import statistics

from reference_dino import knn_top1, train_vitrail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="a name, then the overrides of configs/demo.yaml; repeat for each variant")
    parser.add_argument("--train-shards", default="data/fashion-mnist/train")
    parser.add_argument("--test-shards", default="data/fashion-mnist/test")
    args = parser.parse_args()
    rows = []
    for name, *overrides in args.variant:
        scores, seconds, steps = [], [], 0
        for seed in args.seeds:
            backbone, config, wall, steps = train_vitrail(seed, "fp32", args.train_shards, tuple(overrides))
            scores.append(knn_top1(backbone, config.data.normalization, args.train_shards, args.test_shards))
            seconds.append(wall)
            print(f"{name}, seed {seed}: {steps} steps in {wall:.0f} s, k-NN {scores[-1]:.2f}", flush=True)
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        rows.append(f"| {name} | `{' '.join(overrides)}` | {steps} | {statistics.mean(seconds):.0f} | "
                     f"{statistics.mean(scores):.2f} ± {spread:.2f} | {', '.join(f'{s:.2f}' for s in scores)} |")
    print("\n| variant | overrides | steps | train s | k-NN top-1 (k=20), mean ± std | per seed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
