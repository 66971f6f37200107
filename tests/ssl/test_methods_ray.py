"""DeepCluster's view recipe (a single crop) and its epoch hook for two steps under Ray Train
(Ray Data views, one worker). Every method runs the same Trainer code through the contract
(tests/test_precision_matrix.py trains each under DDP on Ray Train); the other recipes run under
Ray Train elsewhere, since each Ray run costs ~30 s here: DINO's multi-crop in
tests/test_train_ray.py, RotNet's rotations in tests/test_bad_data.py. iBOT and BYOL train on
multi-crop views, as DINO."""

import json

from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.train import pretrain

import test_deepcluster


def test_deepcluster_trains_under_ray_train(ray_cluster, fashion_shards, tmp_path):
    run_dir = tmp_path / "deepcluster"
    tree = test_deepcluster.tiny_tree(fashion_shards, run_dir, epochs=1, batch_size=32, max_steps=2)
    tree["run"]["checkpoint_every"] = 2
    pretrain(from_dict(tree), dashboard=False)
    assert checkpoints.latest_step(run_dir) == 2
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 2 and "clusters/nonempty" in row
