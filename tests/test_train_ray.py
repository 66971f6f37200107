"""The Ray path end to end: Ray Data reads the shards and makes the views, Ray Train trains."""

import json

from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.train import pretrain

from conftest import tiny_config_tree


def test_cli_pretrain_stays_on_loopback_and_another_cluster_resumes_it(ray_cluster, fashion_shards, tmp_path):
    """`vitrail pretrain` in a fresh process whose environment says nothing about Ray: the node
    it starts must be 127.0.0.1, not the machine's outward address (Ray picks that unless its
    single-machine mode is set before `ray` is first imported), and nothing the run opens (Ray's
    servers, the dashboard, the training worker's torch.distributed store, gloo) listens beyond it.
    The session's own cluster then resumes the run from its checkpoints, as a user's next
    `vitrail pretrain` on a new cluster does (one test: each Ray Train run costs ~30 s here)."""
    import os
    import subprocess
    import sys

    import psutil
    import yaml

    from listeners import off_loopback, watch_listeners

    run_dir = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    tree = tiny_config_tree(fashion_shards, run_dir, optim={"epochs": 2, "batch_size": 32, "max_steps": 8},
                            run={"tracking": "wandb"})
    config_file.write_text(yaml.safe_dump(tree))
    script = ("import sys; from vitrail.launch.cli import main; code = main(sys.argv[1:]); import ray; "
              "print('NODES', sorted(node['NodeManagerAddress'] for node in ray.nodes())); sys.exit(code)")
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME", "MASTER_ADDR")}
    driver = subprocess.Popen([sys.executable, "-c", script, "pretrain", str(config_file)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(driver.pid)
    try:
        with watch_listeners(lambda: [root]) as listeners:
            stdout, stderr = driver.communicate(timeout=900)
    finally:
        driver.kill()  # a no-op once it has ended
    assert driver.returncode == 0, stderr[-3000:]
    assert "NODES ['127.0.0.1']" in stdout
    # The store's process is named after Ray's worker actor; the dashboard ran too (no --no-dashboard).
    names = {name for _, _, name in listeners}
    assert any("RayTrainWorker" in name for name in names) and any("dashboard" in name.lower() for name in names), listeners
    assert not off_loopback(listeners), off_loopback(listeners)

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
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12] and rows[4]["resumed_from"] == 8
    assert (run_dir / "wandb_id").read_text() == run_id
