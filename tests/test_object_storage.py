"""Shards, run dirs and checkpoints on object storage (a real S3 server) and read-only HTTP shards."""

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import torch

from vitrail import backbones, checkpoints, storage
from vitrail.errors import VitrailError
from vitrail.launch.export import export_run
from vitrail.launch.loop import Trainer
from vitrail.launch.cli import main
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.tracking import dashboard_command
from vitrail.pipelines.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, load_fashion_mnist
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.sources import encode_png
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


def _members(folder) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of every shard of the shard folder `folder`, in shard order."""
    members = []
    for path in read_index(folder).paths:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path))) as tar:
            members += [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]
    return members


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Real Fashion-MNIST PNGs, three of each of three classes, as class sub-folders."""
    folder = tmp_path_factory.mktemp("images")
    images, labels = load_fashion_mnist("test")
    for label in range(3):
        (folder / FASHION_MNIST_CLASSES[label]).mkdir()
        for number, image in enumerate(images[labels == label][:3]):
            (folder / FASHION_MNIST_CLASSES[label] / f"{number}.png").write_bytes(encode_png(image))
    return folder


def test_an_image_folder_in_a_bucket_shards_into_the_bucket_as_its_local_copy_does(s3, image_folder, tmp_path):
    storage.upload_tree(image_folder, "s3://vitrail/images")
    assert main(["shard", "folder", "s3://vitrail/images", "s3://vitrail/image-shards", "--shard-size", "4"]) == 0
    assert main(["shard", "folder", str(image_folder), str(tmp_path / "local"), "--shard-size", "4"]) == 0
    members = _members("s3://vitrail/image-shards")
    assert members == _members(tmp_path / "local")
    assert [data for name, data in members if name.endswith(".cls")] == [b"0"] * 3 + [b"1"] * 3 + [b"2"] * 3
    assert read_index("s3://vitrail/image-shards").classes == sorted(FASHION_MNIST_CLASSES[:3])


@pytest.mark.parametrize("where, expected", [
    ("s3://vitrail/nowhere", "image folder s3://vitrail/nowhere does not exist"),
    ("http://127.0.0.1:9/images", "image folder http://127.0.0.1:9/images: a web server's folders cannot be listed"),
])
def test_a_folder_that_cannot_be_listed_is_one_line_naming_it(s3, tmp_path, capsys, where, expected):
    assert main(["shard", "folder", where, str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error, error


def _listing(image_folder, base: str) -> str:
    """A file list naming each image under `base`, the last one relative to the list's folder."""
    paths = sorted(image_folder.glob("*/*.png"))
    lines = [f"{base}/{path.parent.name}/{path.name},{path.parent.name}" for path in paths[:-1]]
    return "\n".join([*lines, f"{paths[-1].parent.name}/{paths[-1].name},{paths[-1].parent.name}"]) + "\n"


def test_file_lists_in_a_bucket_and_on_a_web_server_name_image_urls(s3, image_folder, tmp_path):
    local = tmp_path / "images"
    shutil.copytree(image_folder, local)
    (local / "list.txt").write_text(_listing(image_folder, str(local)))
    assert main(["shard", "list", str(local / "list.txt"), str(tmp_path / "local")]) == 0
    expected = _members(tmp_path / "local")
    assert len(expected) == 2 * 9

    storage.upload_tree(image_folder, "s3://vitrail/listed")
    storage.write_text("s3://vitrail/listed/list.txt", _listing(image_folder, "s3://vitrail/listed"))
    assert main(["shard", "list", "s3://vitrail/listed/list.txt", "s3://vitrail/listed-shards"]) == 0
    assert _members("s3://vitrail/listed-shards") == expected

    with http_server(local) as base:
        (local / "http.txt").write_text(_listing(image_folder, base))
        assert main(["shard", "list", f"{base}/http.txt", str(tmp_path / "from-http")]) == 0
    assert _members(tmp_path / "from-http") == expected


def test_fashion_mnist_idx_files_in_a_bucket_shard_as_the_local_ones(s3, tmp_path):
    for path in Path(FASHION_MNIST_DIRS[0]).iterdir():
        storage.write_bytes(f"s3://vitrail/idx/{path.name}", path.read_bytes())
    assert main(["shard", "fashion-mnist", str(tmp_path / "bucket"), "--root", "s3://vitrail/idx", "--limit", "64"]) == 0
    assert main(["shard", "fashion-mnist", str(tmp_path / "local"), "--root", FASHION_MNIST_DIRS[0], "--limit", "64"]) == 0
    for split in ("train", "test"):
        assert _members(tmp_path / "bucket" / split) == _members(tmp_path / "local" / split)
        assert len(_members(tmp_path / "bucket" / split)) == 2 * 64


def test_init_from_a_run_dir_in_a_bucket_and_export_into_one_match_the_local_copy(s3, fashion_shards, tmp_path):
    local = tmp_path / "run"
    assert pretrain(from_dict(tiny_config_tree(fashion_shards, local, optim={"max_steps": 2}, run={"checkpoint_every": 2})),
                    progress=False).step == 2
    storage.upload_tree(local, "s3://vitrail/init/run")

    def first_step_state(init_from) -> dict:
        trainer = Trainer(from_dict(tiny_config_tree(fashion_shards, tmp_path / f"from-{storage.scheme(init_from)}",
                                                     model={"init_from": init_from})), num_samples=640)
        trainer.resume_if_possible()
        return trainer.method.state_dict()

    from_bucket, from_local = first_step_state("s3://vitrail/init/run"), first_step_state(str(local))
    fresh = Trainer(from_dict(tiny_config_tree(fashion_shards, tmp_path / "fresh")), num_samples=640).method.state_dict()
    assert from_bucket.keys() == from_local.keys()
    assert all(torch.equal(from_bucket[key], from_local[key]) for key in from_local)
    assert not all(torch.equal(fresh[key], from_local[key]) for key in from_local)  # the weights did load

    assert main(["export", str(local), "s3://vitrail/init/export"]) == 0
    assert main(["export", str(local), str(tmp_path / "export")]) == 0
    storage.download_tree("s3://vitrail/init/export", tmp_path / "downloaded")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "downloaded" / name).read_bytes() == (tmp_path / "export" / name).read_bytes()
    downloaded = backbones.load_exported(tmp_path / "downloaded").state_dict()
    exported = backbones.load_exported(tmp_path / "export").state_dict()
    assert downloaded.keys() == exported.keys() and all(torch.equal(downloaded[key], exported[key]) for key in exported)
