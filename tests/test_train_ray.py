"""The Ray path end to end: Ray Data reads the shards and makes the views, Ray Train trains."""

import json

from vitrail.launch import checkpoints
from vitrail.launch.config import from_dict
from vitrail.launch.train import pretrain

from conftest import tiny_config_tree


def test_ray_pretrain_one_worker_then_resume(ray_cluster, fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, optim={"epochs": 2, "batch_size": 32, "max_steps": 8},
                            run={"tracking": "wandb"})
    pretrain(from_dict(tree), dashboard=False)
    assert checkpoints.latest_step(run_dir) == 8
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8]
    assert rows[-1]["data/skipped"] == 0 and rows[-1]["images_per_second"] > 0
    # wandb ran offline into the run dir, with a stable run id for resumes.
    run_id = (run_dir / "wandb_id").read_text()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))

    tree["optim"]["max_steps"] = 12
    pretrain(from_dict(tree), dashboard=False)
    assert checkpoints.latest_step(run_dir) == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]
    assert (run_dir / "wandb_id").read_text() == run_id
