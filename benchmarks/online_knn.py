"""What online monitoring costs: the demo trained with and without it, side by side in one process.

    nice -n 10 python benchmarks/online_knn.py [--config configs/demo.yaml] [--steps 500]
        [--knn-every 100] [--repeats 1] [section.key=value ...]

Both runs train `--config` with the local launcher (as `vitrail pretrain CONFIG --local`) for
`--steps` steps from the same seed; the baseline has monitoring off (eval.knn_every=0,
eval.images=false), the monitored run has the online k-NN every `--knn-every` steps with the
config's subset sizes, plus the view grid and attention maps. With `--repeats` > 1 the two
alternate, so drift in the machine's load hits both; the medians are compared. Overrides apply
to both runs (e.g. eval.knn_train_samples=10000 to price a larger bank).
"""

import argparse
import statistics
import tempfile
import time

from vitrail.config import load
from vitrail.launch.local import pretrain


def train_seconds(config_path: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load(config_path, overrides + [f"run.dir={run_dir}", "run.tracking=none"])
        started = time.perf_counter()
        pretrain(config, progress=False)
        return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--knn-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for both runs")
    args = parser.parse_args()

    common = [f"optim.max_steps={args.steps}"] + args.overrides
    variants = {"off": common + ["eval.knn_every=0", "eval.images=false"],
                f"k-NN every {args.knn_every} + images": common + [f"eval.knn_every={args.knn_every}", "eval.images=true"]}
    seconds = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, overrides in variants.items():
            seconds[name].append(train_seconds(args.config, overrides))
            print(f"repeat {repeat + 1}, monitoring {name}: {seconds[name][-1]:.1f} s", flush=True)

    config = load(args.config, variants[f"k-NN every {args.knn_every} + images"])
    baseline = statistics.median(seconds["off"])
    print(f"\n{args.config}, {args.steps} steps, k-NN bank {config.eval.knn_train_samples} / queries "
          f"{config.eval.knn_test_samples} (median of {args.repeats}):\n")
    print("| monitoring | wall time | slowdown |\n|---|---|---|")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.1f} s | {100 * (median / baseline - 1):+.1f}% |")


if __name__ == "__main__":
    main()
