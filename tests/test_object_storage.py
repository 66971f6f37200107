"""Shards, run dirs and checkpoints on object storage (a real S3 server) and read-only HTTP shards."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from vitrail import checkpoints, storage
from vitrail.errors import VitrailError
from vitrail.launch.cli import main
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.tracking import dashboard_command
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches

from conftest import tiny_config_tree
from object_storage import http_server


def _images(images, keys, seed, epoch) -> dict:
    return {"image": np.stack([image.numpy() for image in images])}


def _samples(index) -> list[tuple[str, bytes]]:
    """(key, decoded pixels) of every sample, in shard order."""
    batches = local_batches(index, _images, 0, 1, 64, shuffle=False, epochs=1, drop_last=False)
    return [(key, image.tobytes()) for batch in batches for key, image in zip(batch["key"], batch["image"])]


def test_shard_train_resume_evaluate_and_report_in_a_bucket(s3, tmp_path, capsys):
    data, run = "s3://vitrail/fashion", "s3://vitrail/runs/tiny"
    assert main(["shard", "fashion-mnist", data, "--limit", "384", "--shard-size", "128"]) == 0
    assert main(["shard", "verify", f"{data}/train"]) == 0
    assert "3 shards, 384 samples, every sha256 matches" in capsys.readouterr().out
    # What a third party sees in the bucket: the shards and their index, nothing half-written.
    assert s3.keys("vitrail", "fashion/train/") == [f"fashion/train/{name}" for name in
                                                    ("index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar")]

    shards = read_index(f"{data}/train")
    local = tmp_path / "copy"
    storage.download_tree(f"{data}/train", local)
    assert _samples(shards) == _samples(read_index(local)) and len(_samples(shards)) == 384

    tree = tiny_config_tree(tmp_path, run, run={"checkpoint_every": 2, "log_every": 1, "keep_last": 2,
                                                "tracking": "tensorboard"}, optim={"max_steps": 4})
    tree["data"].update(shards=f"{data}/train", eval_train_shards=f"{data}/train", eval_test_shards=f"{data}/test")
    assert pretrain(from_dict(tree), progress=False).step == 4
    assert s3.keys("vitrail", "runs/tiny/checkpoints/") == ["runs/tiny/checkpoints/step-00000002/state.pt",
                                                            "runs/tiny/checkpoints/step-00000004/state.pt"]
    assert yaml.safe_load(storage.read_text(f"{run}/config.yaml"))["data"]["shards"] == f"{data}/train"

    # A new process resumes from the bucket's newest checkpoint: no local file is involved.
    tree["optim"]["max_steps"] = 6
    assert pretrain(from_dict(tree), progress=False).step == 6
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert checkpoints.latest_step(run) == 6 and checkpoints.load(run)["step"] == 6
    assert s3.keys("vitrail", "runs/tiny/checkpoints/") == ["runs/tiny/checkpoints/step-00000004/state.pt",
                                                            "runs/tiny/checkpoints/step-00000006/state.pt"]

    assert main(["eval", "knn", run, "--k", "5", "--cache-dir", str(tmp_path / "features")]) == 0
    knn = json.loads(storage.read_text(f"{run}/results.json"))["knn"]
    assert [row["features"] for row in knn] == ["pretrained (step 6)"] and knn[0]["samples_train"] == 384

    # TensorBoard wrote its events locally; they were copied into the bucket, and the dashboard reads them from there.
    events = [key for key in s3.keys("vitrail", "runs/tiny/tensorboard/") if "tfevents" in key]
    assert len(events) == 2  # one file per process: the first run and its resume
    command = dashboard_command([run])
    logdir = Path(command[command.index("--logdir_spec") + 1].split(":", 1)[1])
    assert sorted(path.name for path in logdir.iterdir()) == sorted(key.rsplit("/", 1)[1] for key in events)

    assert main(["report", run, "--out", str(tmp_path / "report")]) == 0
    assert "| tiny | dino | vit_tiny | 6 |" in (tmp_path / "report" / "report.md").read_text()


def test_shards_served_over_http_read_like_local_ones(fashion_shards, capsys):
    with http_server(fashion_shards) as base:
        index = read_index(f"{base}/train")
        assert index.num_samples == 640
        assert _samples(index) == _samples(read_index(fashion_shards / "train"))
        with pytest.raises(VitrailError, match=rf"shard directory {base}/nowhere has no index.json"):
            read_index(f"{base}/nowhere")
        assert main(["shard", "fashion-mnist", f"{base}/out", "--limit", "10"]) == 2
        assert f"{base}/out/train: http(s) URLs are read-only" in capsys.readouterr().err


@pytest.mark.parametrize("where, expected", [
    ("ftp://host/run", r"ftp://host/run: unsupported URL scheme 'ftp'; use a local path, file://, s3://, gs:// or http\(s\)://"),
    ("s3://no-such-bucket/run", r"run dir s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist"),
])
def test_a_bad_run_dir_url_is_one_line_naming_it_before_ray_starts(s3, fashion_shards, tmp_path, capsys, where, expected):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_tree(fashion_shards, where)))
    assert main(["pretrain", str(recipe), "--no-dashboard"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert re.search(expected, error), error


def test_wrong_credentials_are_named_with_the_url(s3, fashion_shards, tmp_path, capsys, monkeypatch):
    storage.write_text("s3://vitrail/creds/index.json", "{}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    tree = tiny_config_tree(fashion_shards, tmp_path / "run")
    tree["data"]["shards"] = "s3://vitrail/creds"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["pretrain", str(recipe), "--no-dashboard"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "cannot reach s3://vitrail" in error and "ACCESS_DENIED" in error, error
