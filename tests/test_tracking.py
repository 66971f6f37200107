"""Tracking read back the way a user sees it: TensorBoard over HTTP from `vitrail dashboard`, wandb's
offline run folders, the PNGs in the run dir."""

import io
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vitrail.errors import VitrailError
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.tracking import Tracker, dashboard_command

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



def test_wandb_runs_offline_in_the_run_dir_and_a_resume_continues_its_run(fashion_shards, tmp_path):
    run_dir = tmp_path / "wandb-run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"tracking": "wandb"}, optim={"max_steps": 6})
    tree["eval"] = {"knn_every": 4, "knn_train_samples": 256, "knn_test_samples": 128}
    pretrain(from_dict(tree), progress=False)
    tree["optim"]["max_steps"] = 8  # resumed: a second wandb run file, the same run id
    pretrain(from_dict(tree), progress=False)
    run_id = (run_dir / "wandb_id").read_text()
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2
    # k-NN every 4 steps and at each run's last step (6, then 8).
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "knn/top1" in row] == [4, 6, 8]
    # The view grids and attention maps went to wandb as images, the PNGs the run dir holds.
    ours = sorted(path.name for path in (run_dir / "images").glob("*.png"))
    assert ours == ["attention_step2.png", "attention_step4.png", "attention_step6.png", "attention_step8.png",
                    "views_step2.png", "views_step8.png"]
    theirs = list(run_dir.glob("wandb/offline-run-*/files/media/images/*.png"))
    assert sorted(np.asarray(Image.open(path)).tobytes() for path in theirs) == sorted(
        np.asarray(Image.open(run_dir / "images" / name)).tobytes() for name in ours)


def test_images_go_to_png_files_and_tensorboard(tmp_path):
    tracker = Tracker(tmp_path, "tensorboard", config={})
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    gray = image[:, :, 0]
    tracker.log({"loss": 1.0}, step=3, images={"views": image, "attention": gray})
    tracker.close()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "views_step3.png")), image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "attention_step3.png")), np.stack([gray] * 3, axis=2))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    [served] = events.Images("views")
    assert served.step == 3
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(served.encoded_image_string))), image)
    with pytest.raises(VitrailError, match="image 'views' must be uint8"):
        Tracker(tmp_path, "none", config={}).log_image("views", image.astype(np.float32), 4)
