"""Runs that survive faults: a lost Ray Train worker, a driver killed mid-checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vitrail.launch import checkpoints
from vitrail.launch.config import from_dict
from vitrail.launch.train import pretrain

from conftest import tiny_config_tree


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
    thread.start()
    _wait_for(lambda: checkpoints.latest_step(run_dir) >= 4, 240, "the first checkpoint")
    killed_after = checkpoints.latest_step(run_dir)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[1]["pid"], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and not failure, failure

    assert checkpoints.latest_step(run_dir) == 16  # the step count of an uninterrupted run
    steps = [row["step"] for row in _rows(run_dir)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    # The restarted group continued from a checkpoint at or after the one seen before the kill, not from zero.
    assert steps[restart] - 1 >= killed_after and steps[restart] - 1 in range(4, 16, 4)
    assert steps[-1] == 16
    # ... and from its state: the loss picks up where the checkpointed run was, not at the initial loss.
    losses = {row["step"]: row["loss"] for row in _rows(run_dir)[:restart]}
    first_loss, resumed_loss = _rows(run_dir)[0]["loss"], _rows(run_dir)[restart]["loss"]
    checkpoint_loss = losses[steps[restart] - 1]
    assert abs(resumed_loss - checkpoint_loss) < abs(resumed_loss - first_loss)


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
    folder = checkpoints.checkpoint_dir(run_dir)
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
