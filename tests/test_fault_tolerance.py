"""Runs that survive faults: a lost Ray Train worker, a driver killed mid-checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from vitrail import checkpoints
from vitrail.launch.config import from_dict
from vitrail.launch.train import pretrain

from conftest import tiny_config_tree
from listeners import off_loopback, watch_listeners


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_lost_worker_restarts_from_the_checkpoint(ray_cluster, fashion_shards, tmp_path):
    from ray.util.state import list_actors

    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"checkpoint_every": 4, "log_every": 1},
                            optim={"epochs": 3, "batch_size": 16, "max_steps": 16, "lr": 0.01},
                            ray={"workers": 2, "max_failures": 1, "cpus_per_worker": 0.5})
    failure = []
    thread = threading.Thread(target=lambda: _capture(failure, pretrain, from_dict(tree), dashboard=False))
    # This process started the test's Ray cluster: its descendants are every Ray process of the run,
    # the two DDP workers with their torch.distributed store and gloo sockets among them.
    with watch_listeners(lambda: [psutil.Process()]) as listeners:
        thread.start()
        _wait_for(lambda: checkpoints.latest_step(run_dir) >= 4, 240, "the first checkpoint")
        killed_after = checkpoints.latest_step(run_dir)
        cluster = ray_cluster.get_runtime_context().gcs_address  # this test's cluster, whatever else runs here
        workers = list_actors(address=cluster, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 2
        os.kill(workers[1]["pid"], signal.SIGKILL)
        thread.join(timeout=400)
    assert not thread.is_alive() and not failure, failure
    assert any("RayTrainWorker" in name for _, _, name in listeners), listeners
    assert not off_loopback(listeners), off_loopback(listeners)

    assert checkpoints.latest_step(run_dir) == 16  # the step count of an uninterrupted run
    # The group was restarted: Ray's state keeps the dead workers beside their replacements.
    assert len(list_actors(address=cluster, filters=[("class_name", "=", "RayTrainWorker")])) >= 4
    rows = _rows(run_dir)
    steps = [row["step"] for row in rows]
    # Nothing before the kill's checkpoint was trained twice: the restart did not start from zero.
    assert all(steps.count(step) == 1 for step in range(1, killed_after + 1))
    assert steps[-1] == 16 and sorted(set(steps)) == list(range(1, 17))
    # ... and it restarted from the checkpointed state: the loss goes on from where it was,
    # not from the initial loss.
    loss = {row["step"]: row["loss"] for row in rows}
    assert abs(loss[killed_after + 1] - loss[killed_after]) < abs(loss[killed_after + 1] - loss[1])


def _capture(failure, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except BaseException as error:  # reported by the test thread
        failure.append(error)


def test_driver_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    # A 65536-wide head makes each checkpoint large enough (~100 MB) to be killed mid-write.
    tree = tiny_config_tree(fashion_shards, run_dir, run={"checkpoint_every": 2, "log_every": 2},
                            method={"out_dim": 65536, "bottleneck_dim": 128}, optim={"max_steps": 40})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tree))
    code = ("import json, sys; from vitrail.launch.config import from_dict; from vitrail.launch.local import pretrain; "
            "pretrain(from_dict(json.load(open(sys.argv[1]))), progress=False)")
    process = subprocess.Popen([sys.executable, "-c", code, str(config_path)])
    folder = Path(checkpoints.checkpoint_dir(run_dir))
    try:
        # Wait until a checkpoint exists and the next one is being written, then kill -9.
        _wait_for(lambda: checkpoints.latest_step(run_dir) >= 2 and any(folder.glob(".*.tmp")), 300, "a checkpoint write")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    previous = checkpoints.latest_step(run_dir)
    assert previous >= 2
    state = checkpoints.load(run_dir)  # loadable: the interrupted write never replaced it
    assert state["step"] == previous

    tree["optim"]["max_steps"] = previous + 2
    from vitrail.launch.local import pretrain as local_pretrain
    resumed = local_pretrain(from_dict(tree), progress=False)
    assert resumed.step == previous + 2
    assert checkpoints.latest_step(run_dir) == previous + 2
    assert not list(folder.glob(".*.tmp"))  # the next save cleared the half-written file
