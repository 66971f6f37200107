"""Runs that survive faults: a driver killed mid-checkpoint. (A lost Ray Train worker, with the whole node it ran
on: tests/test_multinode.py.)"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from vitrail import checkpoints
from vitrail.config import from_dict

from conftest import tiny_config_tree


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_driver_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    # A 65536-wide head makes each checkpoint large enough (~100 MB) to be killed mid-write.
    tree = tiny_config_tree(fashion_shards, run_dir, run={"checkpoint_every": 2, "log_every": 2},
                            method={"out_dim": 65536, "bottleneck_dim": 128}, optim={"max_steps": 40})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tree))
    code = ("import json, sys; from vitrail.config import from_dict; from vitrail.launch.local import pretrain; "
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
