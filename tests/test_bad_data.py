"""Bad data never stops a run: corrupt JPEGs, a truncated tar and a missing shard are skipped,
and `data/skipped` counts exactly the samples lost, in the local launcher and under Ray."""

import json
import shutil
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

from vitrail.errors import VitrailError
from vitrail.launch.config import from_dict
from vitrail.pipelines import shards
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import MultiCrop

from conftest import tiny_config_tree

SAMPLES, SHARD_SIZE, BATCH = 1024, 128, 32
CORRUPT = 10  # about 1% of the samples
TRUNCATED_SHARD = 5
# 32 bad samples leave 992 = 31 full batches, so no dropped last batch hides a count.
LOST_IN_TAR = 32 - CORRUPT


def _corrupt(jpeg: bytes, number: int) -> bytes:
    """Half a JPEG, or one with a garbled header: both undecodable."""
    if number % 2:
        return jpeg[: len(jpeg) // 2]
    return jpeg[:2] + b"garbage!" * 8 + jpeg[66:]


def _truncate_mid_member(path, lost: int) -> set[str]:
    """Cut the tar inside the image of the sample `lost` from the end; the keys whose members
    no longer fit, read from the intact tar's member offsets."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(member.name.partition(".")[0] for member in members))
    victim = next(m for m in members if m.name == f"{keys[-lost]}.jpg")
    cut = victim.offset_data + victim.size // 2
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    return {m.name.partition(".")[0] for m in members if m.offset_data + m.size > cut}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Real Fashion-MNIST JPEG shards with 1% corrupt images and one truncated tar; returns
    (shard folder, the keys of every bad sample)."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    intact = [i for i in range(SAMPLES) if i // SHARD_SIZE != TRUNCATED_SHARD]
    corrupt = set(rng.choice(intact, CORRUPT, replace=False).tolist())
    samples = []
    for number in range(SAMPLES):
        jpeg = encode_jpeg(torch.from_numpy(images[number].copy())[None], quality=90).numpy().tobytes()
        if number in corrupt:
            jpeg = _corrupt(jpeg, number)
        samples.append(shards.Sample(f"train{number:07d}", "jpg", int(labels[number]), partial(bytes, jpeg)))
    root = tmp_path_factory.mktemp("bad")
    out = root / "train"
    index = shards.write_shards(samples, ["c"] * 10, out, shard_size=SHARD_SIZE, log=lambda message: None)
    lost = _truncate_mid_member(out / index.shards[TRUNCATED_SHARD]["name"], LOST_IN_TAR)
    bad = {f"train{number:07d}" for number in corrupt} | lost
    assert len(lost) == LOST_IN_TAR and len(bad) == CORRUPT + LOST_IN_TAR
    shutil.copytree(out, root / "test")  # the eval shards the tiny config names
    return root, bad


def _config(root, run_dir, **run):
    good_batches = (SAMPLES - CORRUPT - LOST_IN_TAR) // BATCH
    return from_dict(tiny_config_tree(root, run_dir, run={"tracking": "none", **run},
                                      optim={"epochs": 1, "batch_size": BATCH, "max_steps": good_batches}))


def _last_metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_truncated_tar_yields_its_intact_samples(bad_shards):
    root, bad = bad_shards
    index = shards.read_index(root / "train")
    stream = ShardStream(index.paths[TRUNCATED_SHARD], SHARD_SIZE)
    keys = [sample["__key__"] for sample in stream]
    assert len(keys) == SHARD_SIZE - LOST_IN_TAR and stream.lost == LOST_IN_TAR
    assert not set(keys) & bad and stream.error is not None
    missing = ShardStream(root / "train" / "nope.tar", 7)
    assert list(missing) == [] and missing.lost == 7 and "nope.tar" in missing.error


def test_local_launcher_trains_to_the_end_and_counts_every_bad_sample(bad_shards, tmp_path, caplog):
    from vitrail.launch.local import pretrain

    root, bad = bad_shards
    trainer = pretrain(_config(root, tmp_path / "run"), progress=False)
    assert trainer.step == trainer.schedule.stop_step == (SAMPLES - len(bad)) // BATCH
    assert _last_metrics(tmp_path / "run")["data/skipped"] == len(bad)
    named = " ".join(record.getMessage() for record in caplog.records if record.name == "vitrail.data")
    assert "undecodable" in named and f"{LOST_IN_TAR} lost" in named


def test_missing_shard_is_named_and_counted(bad_shards, tmp_path, caplog):
    root, bad = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    index = shards.read_index(folder)
    (folder / index.shards[0]["name"]).unlink()
    recipe = MultiCrop(global_size=28, local_size=14, num_local=0)
    batches = list(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH, epochs=1, drop_last=False))
    in_first_shard = sum(key < f"train{SHARD_SIZE:07d}" for key in bad)
    assert sum(int(batch["skipped"].sum()) for batch in batches) == len(bad) - in_first_shard + SHARD_SIZE
    assert sum(len(batch["key"]) for batch in batches) == SAMPLES - SHARD_SIZE - (len(bad) - in_first_shard)
    assert index.shards[0]["name"] in caplog.text
    for shard in index.shards[1:]:
        (folder / shard["name"]).unlink()
    with pytest.raises(VitrailError, match="no shard of .* holds a readable image"):
        next(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH))


def test_ray_trains_to_the_end_and_counts_every_bad_sample(ray_cluster, bad_shards, tmp_path):
    from vitrail.launch.train import pretrain

    root, bad = bad_shards
    run_dir = pretrain(_config(root, tmp_path / "run"), dashboard=False)
    assert _last_metrics(run_dir)["step"] == (SAMPLES - len(bad)) // BATCH
    assert _last_metrics(run_dir)["data/skipped"] == len(bad)


def test_ray_dataset_counts_a_missing_shard(ray_cluster, bad_shards, tmp_path):
    from vitrail.pipelines.stream import ray_dataset

    root, bad = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    index = shards.read_index(folder)
    (folder / index.shards[-1]["name"]).unlink()
    dataset = ray_dataset(index, MultiCrop(global_size=28, local_size=14, num_local=0), seed=0, channels=1, epochs=range(1))
    batches = list(dataset.iter_batches(batch_size=BATCH, batch_format="numpy"))
    in_last_shard = sum(key >= f"train{SAMPLES - SHARD_SIZE:07d}" for key in bad)
    assert sum(int(batch["skipped"].sum()) for batch in batches) == len(bad) - in_last_shard + SHARD_SIZE
    assert sum(len(batch["key"]) for batch in batches) == SAMPLES - SHARD_SIZE - (len(bad) - in_last_shard)


def test_ray_counts_a_shard_that_yields_no_image(ray_cluster, bad_shards, tmp_path):
    """A tar cut inside its first sample gives its task no row to count on: a carrier row takes the count."""
    from vitrail.pipelines.stream import ray_dataset, without_carriers

    root, bad = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    index = shards.read_index(folder)
    assert len(_truncate_mid_member(folder / index.shards[0]["name"], SHARD_SIZE)) == SHARD_SIZE
    dataset = ray_dataset(index, MultiCrop(global_size=28, local_size=14, num_local=0), seed=0, channels=1, epochs=range(1))
    batches = list(without_carriers(dataset.iter_batches(batch_size=BATCH, batch_format="numpy")))
    in_first_shard = sum(key < f"train{SHARD_SIZE:07d}" for key in bad)
    assert sum(int(batch["skipped"].sum()) for batch in batches) == len(bad) - in_first_shard + SHARD_SIZE
    keys = np.concatenate([batch["key"] for batch in batches])
    assert len(keys) == SAMPLES - SHARD_SIZE - (len(bad) - in_first_shard) and "" not in set(keys)
