"""TensorBoard tracking read back the way a user sees it: over HTTP from `vitrail dashboard`."""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from vitrail.launch.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.tracking import dashboard_command

from conftest import tiny_config_tree


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tensorboard_dashboard_serves_the_logged_losses(fashion_shards, tmp_path):
    run_dir = tmp_path / "tiny-run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"tracking": "tensorboard"}, optim={"max_steps": 6})
    pretrain(from_dict(tree), progress=False)
    logged = {row["step"]: row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    port = _free_port()
    server = subprocess.Popen(dashboard_command([run_dir], port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # TensorBoard names a run of --logdir_spec NAME:DIR as "NAME/.".
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={urllib.parse.quote('tiny-run/.')}&tag=loss"
    try:
        deadline, served = time.monotonic() + 90, None
        while served is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = json.loads(response.read())
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    # Each scalar comes back as [wall_time, step, value].
    assert {step: pytest.approx(value, rel=1e-6) for _, step, value in served} == logged

