"""Tracking read back the way a user sees it: TensorBoard over HTTP from `vitrail dashboard`, wandb's own
run files, the PNGs in the run dir."""

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
from vitrail.launch.tracking import Tracker, dashboard_command, read_offline_history

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



def _by_step(rows: list[dict]) -> dict[int, dict]:
    merged = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return merged


def test_wandb_offline_history_read_back_with_wandbs_records_equals_metrics_jsonl(fashion_shards, tmp_path):
    run_dir = tmp_path / "wandb-run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"tracking": "wandb"}, optim={"max_steps": 6})
    tree["eval"] = {"knn_every": 4, "knn_train_samples": 256, "knn_test_samples": 128}
    pretrain(from_dict(tree), progress=False)
    tree["optim"]["max_steps"] = 8  # resumed: a second wandb run file, the same run id
    pretrain(from_dict(tree), progress=False)
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 2

    history = read_offline_history(run_dir)
    logged = _by_step(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    scalars = {row["step"]: {key: value for key, value in row.items() if not isinstance(value, dict)} for row in history}
    assert scalars == logged
    # k-NN every 4 steps and at each run's last step (6, then 8).
    assert [step for step, row in sorted(logged.items()) if "knn/top1" in row] == [4, 6, 8]
    # The view grids and attention maps went to wandb as images, their PNGs in the run's media folder.
    images = {(row["step"], key): value for row in history for key, value in row.items() if isinstance(value, dict)}
    assert sorted(images) == [(2, "attention"), (2, "views"), (4, "attention"), (6, "attention"), (8, "attention"),
                              (8, "views")]
    for (step, name), image in images.items():
        assert image["_type"] == "image-file"
        media = list(run_dir.glob(f"wandb/offline-run-*/files/{image['path']}"))
        assert len(media) == 1
        assert np.array_equal(np.asarray(Image.open(media[0])), np.asarray(Image.open(run_dir / "images" / f"{name}_step{step}.png")))


def test_wandb_records_longer_than_a_block_are_reassembled(tmp_path):
    tracker = Tracker(tmp_path, "wandb", config={}, name="big-rows")
    # ~4000 keys make one history record of over 100 KiB: FIRST, MIDDLE..., LAST fragments.
    big = {f"layer{index:04d}/grad_norm": index / 7 for index in range(4000)}
    tracker.log(big, step=1)
    tracker.log({"loss": 0.5}, step=2)
    tracker.close()
    assert max(path.stat().st_size for path in tmp_path.glob("wandb/*/run-*.wandb")) > 3 * 32768
    assert read_offline_history(tmp_path) == [{"step": 1, **big}, {"step": 2, "loss": 0.5}]


def test_wandb_reader_rejects_damaged_files_by_name(tmp_path):
    tracker = Tracker(tmp_path, "wandb", config={}, name="damaged")
    tracker.log({"loss": 0.5}, step=1)
    tracker.close()
    run_file = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    data = bytearray(run_file.read_bytes())
    data[20] ^= 0xFF
    run_file.write_bytes(bytes(data))
    with pytest.raises(VitrailError, match=f"{run_file}: record at byte 7 fails its checksum"):
        read_offline_history(tmp_path)
    with pytest.raises(VitrailError, match="holds no wandb run files"):
        read_offline_history(tmp_path / "elsewhere")


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
