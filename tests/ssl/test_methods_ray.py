"""Each view recipe besides DINO's multi-crop (tests/test_train_ray.py) for two steps under Ray
Train (Ray Data views, one worker), in one test because each Ray run costs seconds here. Every
method runs the same Trainer code through the contract (tests/test_precision_matrix.py trains each
under DDP on Ray Train), so one method per recipe: DeepCluster's single crop with its epoch hook,
RotNet's rotations. iBOT and BYOL train on multi-crop views, as DINO."""

import json

from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.train import pretrain

import test_deepcluster
import test_rotnet

HEALTH_METRIC = {
    test_deepcluster: "clusters/nonempty",
    test_rotnet: "rotation_accuracy",
}


def test_each_view_recipe_trains_under_ray_train(ray_cluster, fashion_shards, tmp_path):
    for module, metric in HEALTH_METRIC.items():
        run_dir = tmp_path / module.__name__
        tree = module.tiny_tree(fashion_shards, run_dir, epochs=1, batch_size=32, max_steps=2)
        tree["run"]["checkpoint_every"] = 2
        pretrain(from_dict(tree), dashboard=False)
        assert checkpoints.latest_step(run_dir) == 2, module.__name__
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["step"] == 2 and metric in row, module.__name__
