"""A run dir holds one run: its lock, resume that refuses another model, --reset, a corrupt checkpoint."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.local import pretrain

from conftest import tiny_config_tree


def _tree(fashion_shards, run_dir, **optim):
    return tiny_config_tree(fashion_shards, run_dir, run={"precision": "fp32"},
                            optim={"epochs": 2, "batch_size": 32, **optim})


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pretrain_process(recipe, *args):
    return subprocess.Popen([sys.executable, "-m", "vitrail.launch.cli", "pretrain", str(recipe), "--local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _holder_pid(lock):
    try:
        return json.loads(lock.read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_a_second_run_on_a_held_run_dir_fails_at_once_naming_the_holder(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(_tree(fashion_shards, run_dir, max_steps=8)))
    first = _pretrain_process(recipe)
    try:
        while _holder_pid(run_dir / ".lock") != first.pid:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        # Paused while it holds the lock: the second run cannot be racing a first run that has ended.
        os.kill(first.pid, signal.SIGSTOP)
        second = _pretrain_process(recipe)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert (f"run dir {run_dir} is in use by pid {first.pid} on host {socket.gethostname()}" in err
                and "Traceback" not in err)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    # One run's rows, in order: the refused run wrote nothing.
    assert _steps(run_dir) == [2, 4, 6, 8] and checkpoints.latest_step(run_dir) == 8
    assert not (run_dir / ".lock").exists()


def test_a_lock_whose_holder_is_gone_is_taken_over(fashion_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "since": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="vitrail.run"):
        assert pretrain(from_dict(_tree(fashion_shards, run_dir, max_steps=2)), progress=False).step == 2
    assert f"taking over the lock of pid {dead_pid} on host {socket.gethostname()}" in caplog.text
    assert not (run_dir / ".lock").exists()


def test_resume_refuses_another_model_or_method_before_touching_anything_unless_reset(fashion_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    tree = _tree(fashion_shards, run_dir, max_steps=4)
    pretrain(from_dict(tree), progress=False)
    before = {str(path): path.read_bytes() for path in (run_dir / "config.yaml", *map(Path, checkpoints.list_checkpoints(run_dir)))}

    changed = _tree(fashion_shards, run_dir, max_steps=8)
    changed["model"]["kwargs"]["depth"] = 3
    changed["method"]["out_dim"] = 32
    with pytest.raises(VitrailError, match=r"holds checkpoints of another model or method \(step-00000004\): "
                                           r"model.kwargs.depth is 2 there, 3 here; method.out_dim is 64 there, 32 here\. "
                                           r".*pass --reset"):
        pretrain(from_dict(changed), progress=False)
    assert {str(path): path.read_bytes() for path in (run_dir / "config.yaml", *map(Path, checkpoints.list_checkpoints(run_dir)))} == before
    assert _steps(run_dir) == [2, 4]

    # Keys outside the model and method may change on resume.
    tree["optim"]["max_steps"], tree["run"]["log_every"] = 6, 1
    assert pretrain(from_dict(tree), progress=False).step == 6
    assert _steps(run_dir) == [2, 4, 5, 6]

    with caplog.at_level(logging.WARNING, logger="vitrail.run"):
        assert pretrain(from_dict(changed), progress=False, reset=True).step == 8
    [aside] = run_dir.glob("reset-*")
    assert f"--reset moved the previous run (checkpoints, config.yaml, images, metrics.jsonl) into {aside}" in caplog.text
    assert checkpoints.latest_step(aside) == 6 and _steps(aside) == [2, 4, 5, 6]
    assert _steps(run_dir) == [2, 4, 6, 8] and checkpoints.load(run_dir)["config"]["method"]["out_dim"] == 32


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_resumed(fashion_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    tree = _tree(fashion_shards, run_dir, max_steps=8)
    pretrain(from_dict(tree), progress=False)
    newest = Path(checkpoints.checkpoint_dir(run_dir)) / "step-00000008" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    tree["optim"]["max_steps"] = 12
    with caplog.at_level(logging.WARNING, logger="vitrail.run"):
        assert pretrain(from_dict(tree), progress=False).step == 12
    assert f"cannot load checkpoint {newest}" in caplog.text and "resuming from step-00000004" in caplog.text
    assert (newest.parent.parent / "step-00000008.corrupt" / "state.pt").exists()
    # The resume went on from step 4: steps 6 and 8 trained again.
    assert _steps(run_dir) == [2, 4, 6, 8, 6, 8, 10, 12] and checkpoints.latest_step(run_dir) == 12

    for path in map(Path, checkpoints.list_checkpoints(run_dir)):
        path.write_bytes(b"")
    with pytest.raises(VitrailError, match=r"no checkpoint in .* loads: cannot load checkpoint .*step-00000008/state.pt"):
        pretrain(from_dict(tree), progress=False)


def test_checkpoints_in_the_earlier_layout_stop_the_run_instead_of_restarting_it(tmp_path):
    """A run dir from before one folder per checkpoint is not read as empty (a resume from step 0)."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"step": 8}, folder / "step-00000008.pt")
    with pytest.raises(VitrailError) as error:
        checkpoints.latest_step(tmp_path / "run")
    message = str(error.value)
    assert "earlier layout (step-00000008.pt)" in message
    assert f"mkdir step-00000008 && mv step-00000008.pt step-00000008/{checkpoints.STATE}" in message
    # The command in the message makes the run resumable.
    (folder / "step-00000008").mkdir()
    (folder / "step-00000008.pt").rename(folder / "step-00000008" / checkpoints.STATE)
    assert checkpoints.latest_step(tmp_path / "run") == 8
