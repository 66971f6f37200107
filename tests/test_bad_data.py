"""Bad data never stops a run: damaged images of every kind (flipped-byte and truncated PNG,
corrupt JPEG, truncated WebP, a decompression-bomb header), a truncated tar and a missing shard
are skipped, and `data/skipped` counts exactly the samples lost, in the local launcher and
under Ray. What must stop a run stops it, naming the shard."""

import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

from PIL import Image

from vitrail.errors import VitrailError
from vitrail.config import from_dict
from vitrail.pipelines import shards
from vitrail.pipelines.datasets import load_fashion_mnist
from vitrail.pipelines.decode import UndecodableImage, decode
from vitrail.pipelines.reader import ShardStream
from vitrail.pipelines.ledger import ShardLedger
from vitrail.pipelines.stream import local_batches
from vitrail.pipelines.views import MultiCrop

from conftest import tiny_config_tree

SAMPLES, SHARD_SIZE, BATCH = 1024, 128, 32
CORRUPT = 10  # about 1% of the samples
TRUNCATED_SHARD = 5
# 32 bad samples leave 992 = 31 full batches, so no dropped last batch hides a count.
LOST_IN_TAR = 32 - CORRUPT


def _encoded(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


def _png_chunk(png: bytes, kind: bytes) -> tuple[int, int]:
    """(offset, length) of the first chunk of `kind`: its data starts 8 bytes after the offset."""
    offset = 8  # the PNG signature
    while png[offset + 4:offset + 8] != kind:
        offset += 12 + struct.unpack(">I", png[offset:offset + 4])[0]
    return offset, struct.unpack(">I", png[offset:offset + 4])[0]


def _with_crc(png: bytearray, offset: int, length: int) -> bytes:
    """`png` with the CRC of the chunk at `offset` recomputed, so only the data itself is wrong."""
    png[offset + 8 + length:offset + 12 + length] = struct.pack(">I", zlib.crc32(png[offset + 4:offset + 8 + length]))
    return bytes(png)


def flipped_png(image: np.ndarray) -> bytes:
    """One flipped byte in the compressed image data (CRC made to match): libpng fails mid-image."""
    png = bytearray(_encoded(image, "PNG"))
    offset, length = _png_chunk(png, b"IDAT")
    png[offset + 8 + length // 2] ^= 0x01
    return _with_crc(png, offset, length)


def truncated_png(image: np.ndarray) -> bytes:
    """Image data that stops short."""
    png = _encoded(image, "PNG")
    offset, length = _png_chunk(png, b"IDAT")
    return png[:offset + 8 + length // 2]


def bomb_png(image: np.ndarray) -> bytes:
    """A real PNG whose header claims 100000 x 100000 pixels (10 G, 10 GB decoded)."""
    png = bytearray(_encoded(image, "PNG"))
    offset, length = _png_chunk(png, b"IHDR")
    png[offset + 8:offset + 16] = struct.pack(">II", 100_000, 100_000)
    return _with_crc(png, offset, length)


def corrupt_jpeg(image: np.ndarray) -> bytes:
    """Bytes flipped in the JPEG's tables and frame header."""
    jpeg = _encoded(image, "JPEG")
    return jpeg[:2] + bytes(byte ^ 0xFF for byte in jpeg[2:66]) + jpeg[66:]


def truncated_webp(image: np.ndarray) -> bytes:
    webp = _encoded(image, "WEBP")
    return webp[: len(webp) // 2]


# Every kind of damaged image, with the extension its sample carries.
DAMAGED = {"flipped png": (flipped_png, "png"), "truncated png": (truncated_png, "png"),
           "bomb png": (bomb_png, "png"), "corrupt jpeg": (corrupt_jpeg, "jpg"), "truncated webp": (truncated_webp, "webp")}


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
    """Real Fashion-MNIST JPEG shards with 1% damaged images (every kind of DAMAGED, in turn) and
    one truncated tar; returns (shard folder, the keys of every bad sample)."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    intact = [i for i in range(SAMPLES) if i // SHARD_SIZE != TRUNCATED_SHARD]
    corrupt = set(rng.choice(intact, CORRUPT, replace=False).tolist())
    damage_of = {number: list(DAMAGED.values())[i % len(DAMAGED)] for i, number in enumerate(sorted(corrupt))}
    samples = []
    for number in range(SAMPLES):
        data, ext = encode_jpeg(torch.from_numpy(images[number].copy())[None], quality=90).numpy().tobytes(), "jpg"
        if number in corrupt:
            damage, ext = damage_of[number]
            data = damage(images[number])
        samples.append(shards.Sample(f"train{number:07d}", ext, int(labels[number]), partial(bytes, data)))
    root = tmp_path_factory.mktemp("bad")
    out = root / "train"
    index = shards.write_shards(samples, ["c"] * 10, out, shard_size=SHARD_SIZE, log=lambda message: None)
    lost = _truncate_mid_member(out / index.shards[TRUNCATED_SHARD]["name"], LOST_IN_TAR)
    bad = {f"train{number:07d}" for number in corrupt} | lost
    assert len(lost) == LOST_IN_TAR and len(bad) == CORRUPT + LOST_IN_TAR
    shutil.copytree(out, root / "test")  # the eval shards the tiny config names
    return root, bad


def _config(root, run_dir, method=None):
    """DINO's tiny recipe, or `method`'s section, over every batch the intact samples fill."""
    good_batches = (SAMPLES - CORRUPT - LOST_IN_TAR) // BATCH
    tree = tiny_config_tree(root, run_dir, run={"tracking": "none", "precision": "fp32"},
                            optim={"epochs": 1, "batch_size": BATCH, "max_steps": good_batches})
    tree["method"] = method or tree["method"]
    return from_dict(tree)


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
    ledger = ShardLedger()
    batches = list(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH, epochs=1, drop_last=False,
                                 ledger=ledger))
    in_first_shard = sum(key < f"train{SHARD_SIZE:07d}" for key in bad)
    assert ledger.totals() == {"skipped": len(bad) - in_first_shard + SHARD_SIZE, "extra": 0}
    assert all(set(batch) == {"global", "key", "label"} for batch in batches)
    assert sum(len(batch["key"]) for batch in batches) == SAMPLES - SHARD_SIZE - (len(bad) - in_first_shard)
    assert index.shards[0]["name"] in caplog.text
    for shard in index.shards[1:]:
        (folder / shard["name"]).unlink()
    with pytest.raises(VitrailError, match="no shard of .* holds a readable image"):
        next(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH))


def test_ray_trains_to_the_end_and_counts_every_bad_sample(ray_cluster, bad_shards, tmp_path):
    from vitrail.launch.train import pretrain

    root, bad = bad_shards
    # RotNet: its rotation views under Ray Train here, DeepCluster's single crop in
    # tests/ssl/test_methods_ray.py, DINO's multi-crop in tests/test_train_ray.py.
    rotnet = {"name": "rotnet", "crop_size": 28, "crop_scale": [0.6, 1.0]}
    run_dir = Path(pretrain(_config(root, tmp_path / "run", rotnet), dashboard=False))
    assert _last_metrics(run_dir)["step"] == (SAMPLES - len(bad)) // BATCH
    assert _last_metrics(run_dir)["data/skipped"] == len(bad) and "rotation_accuracy" in _last_metrics(run_dir)


def test_ray_dataset_counts_a_missing_shard(ray_cluster, bad_shards, tmp_path):
    from vitrail.pipelines.ledger import RemoteLedger
    from vitrail.pipelines.stream import ray_dataset

    root, bad = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    index = shards.read_index(folder)
    (folder / index.shards[-1]["name"]).unlink()
    ledger = RemoteLedger()
    dataset = ray_dataset(index, MultiCrop(global_size=28, local_size=14, num_local=0), seed=0, channels=1, epochs=range(1),
                          ledger=ledger)
    batches = list(dataset.iter_batches(batch_size=BATCH, batch_format="numpy"))
    in_last_shard = sum(key >= f"train{SAMPLES - SHARD_SIZE:07d}" for key in bad)
    assert ledger.totals() == {"skipped": len(bad) - in_last_shard + SHARD_SIZE, "extra": 0}
    assert sum(len(batch["key"]) for batch in batches) == SAMPLES - SHARD_SIZE - (len(bad) - in_last_shard)


def _garble_every_image(path) -> None:
    """Rewrite the tar at `path` with every image's header zeroed (flipping it, as `corrupt_jpeg`
    does, would mend a corrupt JPEG): each sample is there, none decodes."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = data if member.name.endswith(".cls") else data[:2] + bytes(64) + data[66:]
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_ray_counts_shards_that_yield_no_image_beside_the_batches(ray_cluster, bad_shards, tmp_path):
    """A tar cut inside its first sample and a tar of undecodable images give their tasks no row:
    their counts reach the ledger all the same, and the batches hold the views, key and label alone."""
    from vitrail.pipelines.ledger import RemoteLedger
    from vitrail.pipelines.stream import ray_dataset

    root, bad = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    index = shards.read_index(folder)
    assert len(_truncate_mid_member(folder / index.shards[0]["name"], SHARD_SIZE)) == SHARD_SIZE
    _garble_every_image(folder / index.shards[1]["name"])
    ledger = RemoteLedger()
    dataset = ray_dataset(index, MultiCrop(global_size=28, local_size=14, num_local=0), seed=0, channels=1, epochs=range(1),
                          ledger=ledger)
    batches = list(dataset.iter_batches(batch_size=BATCH, batch_format="numpy"))
    in_first_shards = sum(key < f"train{2 * SHARD_SIZE:07d}" for key in bad)
    assert ledger.totals() == {"skipped": len(bad) - in_first_shards + 2 * SHARD_SIZE, "extra": 0}
    assert all(set(batch) == {"global", "key", "label"} for batch in batches)
    keys = np.concatenate([batch["key"] for batch in batches])
    assert len(keys) == SAMPLES - 2 * SHARD_SIZE - (len(bad) - in_first_shards)


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_every_damaged_image_kind_raises_in_the_decoder(kind):
    """torchvision's decoder segfaulted on the PNGs (this process would die) and allocated what the
    bomb's header claims; the decoder raises, and refuses the bomb from its header."""
    image = load_fashion_mnist("train")[0][0]
    damage, _ = DAMAGED[kind]
    with pytest.raises(UndecodableImage) as raised:
        decode(damage(image), channels=1)
    if kind == "bomb png":
        # Read from the header: 10 G pixels were never allocated.
        assert "data.max_image_pixels (89,478,485)" in str(raised.value) and "10000000000 pixels" in str(raised.value)


def test_pixel_limit_and_channels_of_intact_images():
    image = load_fashion_mnist("train")[0][0]  # 28 x 28
    for image_format in ("PNG", "JPEG", "WEBP"):
        gray, rgb = decode(_encoded(image, image_format), 1), decode(_encoded(image, image_format), 3)
        assert gray.shape == (1, 28, 28) and rgb.shape == (3, 28, 28) and gray.dtype == torch.uint8
    np.testing.assert_array_equal(decode(_encoded(image, "PNG"), 1)[0].numpy(), image)
    assert decode(_encoded(image, "PNG"), 1, max_pixels=28 * 28).shape == (1, 28, 28)
    with pytest.raises(UndecodableImage, match="28x28 pixels exceed"):
        decode(_encoded(image, "PNG"), 1, max_pixels=28 * 28 - 1)


def test_verify_decode_names_every_bad_image_and_the_truncated_shard(bad_shards, capsys):
    from vitrail.launch.cli import main

    root, bad = bad_shards
    truncated = shards.read_index(root / "train").shards[TRUNCATED_SHARD]["name"]
    assert main(["shard", "verify", str(root / "train")]) == 2  # only the truncated tar's checksum differs
    assert "1 problems" in capsys.readouterr().err
    assert main(["shard", "verify", str(root / "train"), "--decode"]) == 2
    error = capsys.readouterr().err
    corrupt_keys = {key for key in bad if f"{key} (" in error}
    assert len(corrupt_keys) == CORRUPT and f"{truncated} cannot be read whole" in error
    assert f"{CORRUPT + 2} problems" in error


def test_local_verify_names_a_changed_shard_and_counts_extra_samples(bad_shards, tmp_path, caplog):
    root, _ = bad_shards
    folder = tmp_path / "train"
    shutil.copytree(root / "train", folder)
    recipe = MultiCrop(global_size=28, local_size=14, num_local=0)
    tree = json.loads((folder / "index.json").read_text())
    tree["shards"][1]["samples"] -= 5  # index.json declares fewer samples than the tar holds
    tree["num_samples"] -= 5
    (folder / "index.json").write_text(json.dumps(tree))
    index = shards.read_index(folder)
    ledger = ShardLedger()
    list(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH, epochs=1, shuffle=False, ledger=ledger))
    assert ledger.totals()["extra"] == 5
    assert f"{index.shards[1]['name']} holds {SHARD_SIZE} samples, index.json declares {SHARD_SIZE - 5}" in caplog.text
    path = folder / index.shards[2]["name"]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first member's image: still a readable tar
    path.write_bytes(bytes(data))
    assert next(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH, shuffle=False))
    with pytest.raises(VitrailError, match=f"shard {path} has sha256 .*, index.json says"):
        list(local_batches(index, recipe, seed=0, channels=1, batch_size=BATCH, epochs=1, shuffle=False, verify=True))


def test_ray_view_task_that_keeps_dying_fails_naming_its_shard(ray_cluster, fashion_shards):
    """A task killed outright (os._exit, as by the OOM killer or a native crash) is retried a
    bounded number of times, then the dataset fails naming the shard, instead of retrying for ever."""
    from vitrail.pipelines.stream import ray_dataset

    index = shards.read_index(fashion_shards / "train")
    doomed_key = f"train{2 * 128 + 5:07d}"  # in the third shard of 128
    multi_crop = MultiCrop(global_size=28, local_size=14, num_local=0)

    def dies_on_doomed_key(images, keys, seed, epoch):
        if doomed_key in keys:
            os._exit(1)
        return multi_crop(images, keys, seed, epoch)

    dataset = ray_dataset(index, dies_on_doomed_key, seed=0, channels=1, epochs=range(1), task_retries=1)
    with pytest.raises(VitrailError, match=f"shard {index.paths[2]}: its view task died .* every retry \\(1\\)"):
        list(dataset.iter_batches(batch_size=BATCH, batch_format="numpy"))


def test_ray_pretrain_with_verify_stops_naming_a_changed_shard(ray_cluster, fashion_shards, tmp_path):
    from vitrail.launch.train import pretrain

    shutil.copytree(fashion_shards, tmp_path / "data")
    index = shards.read_index(tmp_path / "data" / "train")
    path = tmp_path / "data" / "train" / index.shards[3]["name"]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    tree = tiny_config_tree(tmp_path / "data", tmp_path / "run", run={"tracking": "none", "precision": "fp32"},
                            data={"verify": True}, optim={"epochs": 1, "batch_size": 32})
    with pytest.raises(VitrailError, match=f"shard {path} has sha256 .*, index.json says {index.shards[3]['sha256']}"):
        pretrain(from_dict(tree), dashboard=False)


def test_eval_features_skip_every_damaged_image(bad_shards):
    """`vitrail eval` extracts through the same decoder: the raw-pixel baseline's features cover
    exactly the intact samples, in shard order."""
    from vitrail.eval.features import extract
    from vitrail.pipelines.views import EvalTransform, Normalization

    root, bad = bad_shards
    index = shards.read_index(root / "test")
    features, labels, keys = extract(torch.nn.Flatten(), index, EvalTransform.at(28), Normalization(1, (0.286,), (0.353,)),
                                     return_keys=True)
    assert keys == sorted(f"train{number:07d}" for number in range(SAMPLES) if f"train{number:07d}" not in bad)
    assert features.shape == (SAMPLES - len(bad), 28 * 28) and len(labels) == len(keys)
