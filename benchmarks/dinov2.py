"""DINOv2's CPU demo next to DINO's and iBOT's on Fashion-MNIST, and its step time against DINO's.

    nice -n 10 python benchmarks/dinov2.py [--methods dino ibot dinov2] [--step-batches 23]
        [--train-shards data/fashion-mnist/train] [--test-shards data/fashion-mnist/test]

Quality: each method trains its demo config in this process with the local launcher
(configs/demo.yaml for DINO, without its online k-NN; configs/demo_ibot.yaml;
configs/demo_dinov2.yaml) and is scored as benchmarks/methods.py scores it (k-NN top-1, k = 20,
on the first 10,000 train / 2,000 test images; random init = the same method at the run's seed).
The backbones have the same size: 4 blocks 192 wide with 4-px patches on 28 px (DINO and iBOT
train vit_tiny, DINOv2 the DINOv2 ViT: LayerScale, mask token, its init).

Step time: DINO and DINOv2 on the same backbone, batch, crops and head widths (the DINOv2
demo's), fp32: the mean time of the trainer's step (forward, backward, clipping, AdamW, EMA)
over the same pre-made view batches, after 3 warm-up steps.
"""

import argparse
import tempfile
import time

import torch
from methods import knn_top1

from vitrail import ssl
from vitrail.config import from_dict, load
from vitrail.launch.local import pretrain
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches

DEMOS = {"dino": "configs/demo.yaml", "ibot": "configs/demo_ibot.yaml", "dinov2": "configs/demo_dinov2.yaml"}
WARMUP_STEPS = 3


def quality(name: str, train_shards: str, test_shards: str) -> str:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load(DEMOS[name], [f"data.shards={train_shards}", f"run.dir={run_dir}", "run.tracking=none",
                                    "eval.knn_every=0", "data.eval_train_shards=null", "data.eval_test_shards=null"])
        torch.manual_seed(config.run.seed)  # the initial weights the trainer starts from
        before = knn_top1(ssl.build(config, 1, 1).backbone_for_eval(), config, train_shards, test_shards)
        started = time.perf_counter()
        trainer = pretrain(config, progress=False)
        minutes = (time.perf_counter() - started) / 60
        after = knn_top1(trainer.method.backbone_for_eval(), config, train_shards, test_shards)
    row = (f"| {name} | {config.model.backbone} | {before:.2f} | {after:.2f} | {after - before:+.2f} | "
           f"{minutes:.1f} min ({trainer.step} steps) | `vitrail pretrain {DEMOS[name]} --local` |")
    print(row, flush=True)
    return row


def step_seconds(config, batches) -> float:
    trainer = Trainer(config, num_samples=60_000)
    for batch in batches[:WARMUP_STEPS]:
        trainer.train_step(trainer.method, batch)
    started = time.perf_counter()
    for batch in batches[WARMUP_STEPS:]:
        trainer.train_step(trainer.method, batch)
    return (time.perf_counter() - started) / (len(batches) - WARMUP_STEPS)


def step_times(train_shards: str, count: int) -> None:
    dinov2 = load(DEMOS["dinov2"], [f"data.shards={train_shards}", "run.precision=fp32"])
    tree = dinov2.model_dump(mode="json")
    crops = {key: tree["method"][key] for key in ("out_dim", "hidden_dim", "global_crop_size", "local_crop_size",
                                                  "local_crops_number", "global_crops_scale", "local_crops_scale",
                                                  "blur_sigma", "teacher_temp", "warmup_teacher_temp_epochs")}
    dino = from_dict({**tree, "method": {"name": "dino", **crops}})
    data = dinov2.data
    batches = []
    for batch in local_batches(read_index(train_shards), dinov2.method.views(), dinov2.run.seed, data.channels,
                               dinov2.optim.batch_size):
        batches.append(batch)
        if len(batches) == count:
            break
    seconds = {name: step_seconds(config, batches) for name, config in (("dino", dino), ("dinov2", dinov2))}
    print(f"\nstep time, {dinov2.model.backbone} {dinov2.model.kwargs}, batch {dinov2.optim.batch_size}, "
          f"2 x {crops['global_crop_size']} + {crops['local_crops_number']} x {crops['local_crop_size']} crops, "
          f"head {crops['hidden_dim']} -> {crops['out_dim']}, fp32, {torch.get_num_threads()} threads, "
          f"mean of {count - WARMUP_STEPS} steps: DINO {seconds['dino']:.3f} s, DINOv2 {seconds['dinov2']:.3f} s, "
          f"ratio {seconds['dinov2'] / seconds['dino']:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--step-batches", type=int, default=23, help="batches timed per method (3 of them warm-up)")
    parser.add_argument("--train-shards", default="data/fashion-mnist/train")
    parser.add_argument("--test-shards", default="data/fashion-mnist/test")
    args = parser.parse_args()

    if args.step_batches > WARMUP_STEPS:
        step_times(args.train_shards, args.step_batches)
    rows = [quality(name, args.train_shards, args.test_shards) for name in args.methods]
    print("\n| method | backbone | k-NN top-1 random init | k-NN top-1 trained | delta | train wall time | command |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
