"""Each method's CPU demo on Fashion-MNIST: k-NN top-1 of its backbone at random init and trained.

    nice -n 10 python benchmarks/methods.py [--methods rotnet byol ibot deepcluster]
        [--train-shards data/fashion-mnist/train] [--test-shards data/fashion-mnist/test]

Every method trains `configs/demo_<method>.yaml` in this process (the local launcher, as
`vitrail pretrain configs/demo_<method>.yaml --local` does), then the backbone it evaluates
(teacher or online) is scored with DINO's weighted k-NN (k = 20, T = 0.07) on a fixed subset
to save time: the first 10,000 training images are the bank, the first 2,000 test images the
queries, 28 px with no crop. The random-init row is the same method built with the run's seed.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitrail import ssl
from vitrail.eval.features import extract
from vitrail.eval.knn import knn_classify
from vitrail.config import load
from vitrail.launch.local import pretrain
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform

BANK, QUERIES = 10_000, 2_000


def knn_top1(backbone, config, train_shards, test_shards) -> float:
    transform = EvalTransform(28, 28)
    data = config.data
    bank = extract(backbone, read_index(train_shards), transform, data.normalization, limit=BANK)
    queries = extract(backbone, read_index(test_shards), transform, data.normalization, limit=QUERIES)
    return knn_classify(*bank, *queries, k=20, temperature=0.07)["top1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rotnet", "byol", "ibot", "deepcluster"])
    parser.add_argument("--train-shards", default="data/fashion-mnist/train")
    parser.add_argument("--test-shards", default="data/fashion-mnist/test")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method (ablations)")
    args = parser.parse_args()

    rows = []
    for name in args.methods:
        path = Path("configs") / f"demo_{name}.yaml"
        with tempfile.TemporaryDirectory() as run_dir:
            config = load(path, [f"data.shards={args.train_shards}", f"run.dir={run_dir}", *args.set])
            torch.manual_seed(config.run.seed)  # the initial weights the trainer starts from
            random_init = ssl.build(config, 1, 1).backbone_for_eval()
            before = knn_top1(random_init, config, args.train_shards, args.test_shards)
            started = time.perf_counter()
            trainer = pretrain(config, progress=False)
            minutes = (time.perf_counter() - started) / 60
            after = knn_top1(trainer.method.backbone_for_eval(), config, args.train_shards, args.test_shards)
        rows.append((name, config.model.backbone, before, after, minutes, trainer.step, path))
        print(f"{name}: {before:.2f} -> {after:.2f} in {minutes:.1f} min", flush=True)

    print("\n| method | backbone | k-NN top-1 random init | k-NN top-1 trained | delta | train wall time | command |")
    print("|---|---|---|---|---|---|---|")
    for name, backbone, before, after, minutes, steps, path in rows:
        print(f"| {name} | {backbone} | {before:.2f} | {after:.2f} | {after - before:+.2f} | "
              f"{minutes:.1f} min ({steps} steps) | `vitrail pretrain {path} --local` |")


if __name__ == "__main__":
    main()
