import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitrail.errors import VitrailError
from vitrail.pipelines import shards, sources
from vitrail.pipelines.datasets import load_fashion_mnist


def _read_back(folder):
    samples = {}
    for path in shards.read_index(folder).paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_fashion_mnist_round_trip(fashion_shards):
    images, labels = load_fashion_mnist("train")
    index = shards.verify(fashion_shards / "train")
    assert index.num_samples == 640 and len(index.shards) == 5
    assert index.classes[0] == "t-shirt" and len(index.classes) == 10
    samples = _read_back(fashion_shards / "train")
    assert len(samples) == 640
    for number in range(640):
        sample = samples[f"train{number:07d}"]
        assert "." not in f"train{number:07d}"
        assert int(sample["cls"]) == labels[number]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[number])


def test_rerun_is_noop_and_shards_are_byte_identical(tmp_path):
    images, labels = load_fashion_mnist("test")
    samples = sources.array_samples(images[:300], labels[:300], "test")
    first = shards.write_shards(samples, ["a"] * 10, tmp_path / "a", shard_size=100)
    again = shards.write_shards(samples, ["a"] * 10, tmp_path / "a", shard_size=100)
    other = shards.write_shards(samples, ["a"] * 10, tmp_path / "b", shard_size=100)
    assert first.shards == again.shards == other.shards
    with pytest.raises(VitrailError, match="different shard set"):
        shards.write_shards(samples[:200], ["a"] * 10, tmp_path / "a", shard_size=100)


def test_partial_folder_is_detected_and_finished(tmp_path):
    images, labels = load_fashion_mnist("test")
    samples = sources.array_samples(images[:300], labels[:300], "test")
    reference = shards.write_shards(samples, ["x"], tmp_path / "ref", shard_size=100)
    out = tmp_path / "partial"
    shards.write_shards(samples, ["x"], out, shard_size=100)
    # Simulate a run killed after its second shard: no index, a half-written third shard.
    (out / "index.json").unlink()
    progress = [json.dumps(shard) for shard in reference.shards[:2]]
    (out / "progress.jsonl").write_text("\n".join(progress) + "\n")
    (out / "shard-000002.tar").write_bytes(b"half a tar")
    (out / "shard-000001.tar.tmp").write_bytes(b"stale")
    with pytest.raises(VitrailError, match="partial shard set"):
        shards.read_index(out)
    log = []
    finished = shards.write_shards(samples, ["x"], out, shard_size=100, log=log.append)
    assert "keeping 2 finished shards of 3" in log[0]
    assert finished.shards == reference.shards
    assert not list(out.glob("*.tmp")) and not (out / "progress.jsonl").exists()


def test_verify_names_the_corrupt_shard(tmp_path):
    images, labels = load_fashion_mnist("test")
    shards.write_shards(sources.array_samples(images[:20], labels[:20], "t"), ["x"], tmp_path, shard_size=10)
    with open(tmp_path / "shard-000001.tar", "r+b") as handle:
        handle.seek(600)
        handle.write(b"\xff")
    with pytest.raises(VitrailError, match="shard-000001.tar has sha256"):
        shards.verify(tmp_path)
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(VitrailError, match="shard-000000.tar is missing"):
        shards.verify(tmp_path)


def test_folder_of_class_subfolders(tmp_path):
    source = tmp_path / "images"
    for label, name in enumerate(["cat", "dog"]):
        (source / name).mkdir(parents=True)
        for number in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * number + label, np.uint8)).save(source / name / f"im.{number}.jpg")
    samples, classes, problems = sources.folder_samples(source)
    assert problems == []
    assert classes == ["cat", "dog"] and len(samples) == 6
    index = shards.write_shards(samples, classes, tmp_path / "out", shard_size=4)
    back = _read_back(tmp_path / "out")
    assert sorted(int(s["cls"]) for s in back.values()) == [0, 0, 0, 1, 1, 1]
    # JPEG stays JPEG, byte for byte.
    assert back[samples[0].key]["jpg"] == (source / "cat" / "im.0.jpg").read_bytes()
    assert index.num_samples == 6


def test_missing_folder_errors(tmp_path):
    with pytest.raises(VitrailError, match=str(tmp_path / "nope")):
        shards.read_index(tmp_path / "nope")
    with pytest.raises(VitrailError, match="no class sub-folders"):
        sources.folder_samples(tmp_path)


def _write_pngs(folder, count):
    images, labels = load_fashion_mnist("test")
    folder.mkdir(parents=True)
    for number in range(count):
        Image.fromarray(images[number]).save(folder / f"im{number}.png")
    return labels[:count]


def test_file_list_with_labels_relative_and_absolute_paths(tmp_path):
    from vitrail.launch.cli import main

    labels = _write_pngs(tmp_path / "pics", 6)
    names = ["sandal" if label == 5 else f"class{label}" for label in labels]
    lines = ["path,label"] + [f"pics/im{n}.png,{names[n]}" for n in range(5)] + [f"{tmp_path}/pics/im5.png,{names[5]}"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    assert main(["shard", "list", str(tmp_path / "list.csv"), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    index = shards.verify(tmp_path / "out")
    assert index.classes == sorted(set(names)) and index.num_samples == 6 and len(index.shards) == 2
    back = _read_back(tmp_path / "out")
    for number, key in enumerate(sorted(back)):
        assert "." not in key
        assert back[key]["png"] == (tmp_path / "pics" / f"im{number}.png").read_bytes()
        assert index.classes[int(back[key]["cls"])] == names[number]


def test_file_list_integer_labels_tabs_and_no_labels(tmp_path):
    _write_pngs(tmp_path / "pics", 3)
    (tmp_path / "ints.tsv").write_text("pics/im0.png\t2\npics/im1.png\t0\n\n# a comment\npics/im2.png\t2\n")
    samples, classes = sources.list_samples(tmp_path / "ints.tsv")
    assert classes == ["0", "1", "2"] and [s.label for s in samples] == [2, 0, 2]
    (tmp_path / "bare.txt").write_text("pics/im0.png\npics/im2.png\n")
    samples, classes = sources.list_samples(tmp_path / "bare.txt")
    assert classes == [] and [s.label for s in samples] == [-1, -1]
    assert samples[1].load() == (tmp_path / "pics" / "im2.png").read_bytes()


def test_file_list_errors_name_the_line(tmp_path):
    _write_pngs(tmp_path / "pics", 2)
    (tmp_path / "missing.txt").write_text("pics/im0.png\npics/im9.png\n")
    with pytest.raises(VitrailError, match=r"missing.txt:2: image .*im9.png does not exist"):
        sources.list_samples(tmp_path / "missing.txt")
    (tmp_path / "mixed.txt").write_text("pics/im0.png,1\npics/im1.png\n")
    with pytest.raises(VitrailError, match="mixed.txt:2: every line needs a label"):
        sources.list_samples(tmp_path / "mixed.txt")
    (tmp_path / "text.txt").write_text("notes.txt\n")
    with pytest.raises(VitrailError, match="text.txt:1: 'notes.txt' is not an image"):
        sources.list_samples(tmp_path / "text.txt")
    with pytest.raises(VitrailError, match="cannot read file list"):
        sources.list_samples(tmp_path / "nope.txt")


def test_folder_sharded_twice_is_byte_identical_and_a_killed_run_resumes(tmp_path):
    # The benchmark's own checks at a test's size: real PNG files, the real command in a
    # subprocess, SIGKILL once its first shard is recorded, then the same command again.
    script = Path(__file__).parents[1] / "benchmarks" / "shard_folder.py"
    done = subprocess.run([sys.executable, str(script), "--images", "3000", "--shard-size", "20", "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 150 and summary["identical"] and summary["resumed_identical"]
    assert summary["index_identical"] and summary["duplicates"] == 0
    assert 1 <= summary["kept_after_kill"] < 150


def test_shards_are_read_by_webdataset_itself(fashion_shards):
    """The shards are plain webdataset: users can stream them with `webdataset.WebDataset` too."""
    import webdataset as wds

    index = shards.read_index(fashion_shards / "test")
    ours = _read_back(fashion_shards / "test")
    theirs = {sample["__key__"]: sample for sample in wds.WebDataset(index.paths, shardshuffle=False, empty_check=False)}
    assert sorted(theirs) == sorted(ours)
    for key, sample in theirs.items():
        assert sample["png"] == ours[key]["png"] and sample["cls"] == ours[key]["cls"]


def test_shards_written_by_webdataset_are_indexed_in_place_and_trained_on(tmp_path, capsys):
    """Shards another tool wrote (webdataset's own TarWriter, `.jpeg` and `.png` members, keys
    with dots and folders) get an index.json in place, then stream like ours."""
    import webdataset as wds

    from vitrail.launch.cli import main
    from vitrail.config import from_dict
    from vitrail.launch.local import pretrain
    from vitrail.pipelines.ledger import ShardLedger
    from vitrail.pipelines.stream import local_batches
    from vitrail.pipelines.views import MultiCrop

    from conftest import tiny_config_tree

    images, labels = load_fashion_mnist("train")
    folder = tmp_path / "existing" / "train"
    folder.mkdir(parents=True)
    for shard in range(3):
        with wds.TarWriter(str(folder / f"part-{shard:05d}.tar")) as writer:
            for number in range(shard * 50, shard * 50 + 40 + shard):
                encoded = io.BytesIO()
                Image.fromarray(images[number]).save(encoded, format="JPEG" if number % 2 else "PNG")
                image = {"jpeg" if number % 2 else "png": encoded.getvalue()}
                writer.write({"__key__": f"class.{number % 3}/img{number:05d}", **image,
                              "cls": str(int(labels[number])).encode()})
    assert main(["shard", "index", str(folder), "--workers", "2"]) == 0
    index = shards.read_index(folder)
    assert [shard["samples"] for shard in index.shards] == [40, 41, 42]
    assert index.classes == [str(label) for label in range(int(max(labels[:142])) + 1)]
    assert main(["shard", "verify", str(folder)]) == 0
    assert main(["shard", "index", str(folder)]) == 0 and "nothing to do" in capsys.readouterr().out

    recipe = MultiCrop(global_size=28, local_size=14, num_local=0)
    ledger = ShardLedger()
    batches = list(local_batches(index, recipe, seed=0, channels=1, batch_size=41, epochs=1, shuffle=False,
                                 drop_last=False, ledger=ledger))
    read = {int(key[-5:]): int(label) for batch in batches for key, label in zip(batch["key"], batch["label"])}
    expected = {number: int(labels[number]) for shard in range(3) for number in range(shard * 50, shard * 50 + 40 + shard)}
    assert read == expected and ledger.totals() == {"skipped": 0, "extra": 0}

    root = tmp_path / "existing"
    (root / "test").symlink_to(folder)
    run_dir = tmp_path / "run"
    pretrain(from_dict(tiny_config_tree(root, run_dir, optim={"max_steps": 2, "batch_size": 16})), progress=False)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_indexing_a_truncated_shard_names_it(tmp_path):
    import webdataset as wds

    folder = tmp_path / "existing"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a.tar")) as writer:
        for number in range(20):
            writer.write({"__key__": f"s{number:03d}", "png": sources.encode_png(np.full((8, 8), number, np.uint8)),
                          "cls": b"1"})
    data = (folder / "a.tar").read_bytes()
    (folder / "a.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(VitrailError, match=r"a\.tar cannot be read whole .* after \d+ samples"):
        shards.index_existing(folder, log=lambda message: None)
    assert not (folder / shards.INDEX).exists()
    with pytest.raises(VitrailError, match="holds no .tar shards"):
        shards.index_existing(tmp_path / "nothing", log=lambda message: None)
    (folder / shards.PROGRESS).write_text("")
    with pytest.raises(VitrailError, match="partial shard set"):
        shards.index_existing(folder, log=lambda message: None)


@pytest.mark.parametrize("field, value, named", [
    ("samples", None, "shards[1].samples must be a non-negative integer, got None"),
    ("samples", -3, "shards[1].samples must be a non-negative integer, got -3"),
    ("samples", True, "shards[1].samples must be a non-negative integer, got True"),
    ("name", "../elsewhere.tar", "shards[1].name must be a file name inside the shard folder"),
    ("name", "/etc/passwd", "shards[1].name must be a file name inside the shard folder"),
    ("sha256", "abc", "shards[1].sha256 must be 64 lowercase hex digits"),
])
def test_index_fields_are_validated_naming_file_and_field(fashion_shards, tmp_path, field, value, named):
    tree = json.loads((fashion_shards / "train" / "index.json").read_text())
    if value is None:
        del tree["shards"][1][field]
    else:
        tree["shards"][1][field] = value
    (tmp_path / "index.json").write_text(json.dumps(tree))
    with pytest.raises(VitrailError, match=re.escape(f"{tmp_path / 'index.json'}: {named}")):
        shards.read_index(tmp_path)


def test_index_totals_and_classes_are_validated(fashion_shards, tmp_path):
    tree = json.loads((fashion_shards / "train" / "index.json").read_text())
    for edit, named in (({"num_samples": 641}, "num_samples must be the sum of the shards' samples (640)"),
                        ({"classes": "t-shirt"}, "classes must be a list of class names"),
                        ({"shards": {"name": "x.tar"}}, "shards must be a list")):
        (tmp_path / "index.json").write_text(json.dumps({**tree, **edit}))
        with pytest.raises(VitrailError, match=re.escape(named)):
            shards.read_index(tmp_path)


def _unusable_inputs(source):
    """A class folder of 6 real Fashion-MNIST PNGs plus one input of every unusable kind a root
    process meets; returns the names the summary must give."""
    from test_bad_data import bomb_png, flipped_png

    image = load_fashion_mnist("test")[0][0]
    _write_pngs(source / "shirt", 6)
    (source / "shirt" / "flipped.png").write_bytes(flipped_png(image))
    (source / "shirt" / "bomb.png").write_bytes(bomb_png(image))
    (source / "shirt" / "dangling.png").symlink_to(source / "gone.png")
    os.mkfifo(source / "shirt" / "fifo.png")  # reading it would block for ever
    return ["flipped.png (undecodable", "bomb.png (undecodable", "dangling.png (dangling symlink",
            "fifo.png (not a regular file)"]


def test_shard_folder_skips_unusable_inputs_named_and_counted_or_stops_with_strict(tmp_path, capsys):
    from vitrail.launch.cli import main

    named = _unusable_inputs(tmp_path / "images")
    assert main(["shard", "folder", str(tmp_path / "images"), str(tmp_path / "strict"), "--decode", "--strict"]) == 2
    error = capsys.readouterr().err
    assert "2 input images cannot be sharded (--strict)" in error and all(name in error for name in named[2:])
    assert not (tmp_path / "strict" / "index.json").exists()
    _write_pngs(tmp_path / "decodable" / "shirt", 6)
    (tmp_path / "decodable" / "shirt" / "z.png").symlink_to(tmp_path / "images" / "shirt" / "flipped.png")
    stopped = tmp_path / "stopped"
    assert main(["shard", "folder", str(tmp_path / "decodable"), str(stopped), "--decode", "--strict",
                 "--shard-size", "4"]) == 2  # listed fine: the writer of the shard holding z.png stops
    assert "z.png (undecodable" in capsys.readouterr().err
    assert not list(stopped.glob("*.tmp")) and not (stopped / "index.json").exists()
    assert main(["shard", "folder", str(tmp_path / "images"), str(tmp_path / "out"), "--decode", "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "skipped 4 input images" in out and all(name in out for name in named)
    index = shards.verify(tmp_path / "out", shards.Screening(decode=True))
    assert index.num_samples == 6 and index.skipped == 4 and not list((tmp_path / "out").glob("*.tmp"))
    assert main(["shard", "folder", str(tmp_path / "images"), str(tmp_path / "out"), "--decode"]) == 0  # complete: a no-op
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops from root to nobody with setpriv")
def test_unreadable_folder_and_file_are_named_and_counted(tmp_path):
    """Root reads everything, so the command runs as nobody, for whom chmod 000 is real."""
    shared = Path(tempfile.mkdtemp(prefix="vitrail-unreadable-"))
    try:
        shared.chmod(0o777)
        _write_pngs(shared / "images" / "coat", 3)
        _write_pngs(shared / "images" / "locked", 2)
        (shared / "images" / "locked").chmod(0o000)
        (shared / "images" / "coat" / "im1.png").chmod(0o000)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "vitrail.launch.cli", "shard", "folder", str(shared / "images"), str(shared / "out")],
                              capture_output=True, text=True, timeout=120, cwd=shared,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert done.returncode == 0, done.stderr
        assert "skipped 2 input images" in done.stdout and "Traceback" not in done.stderr
        assert f"{shared / 'images' / 'locked'} (unreadable folder: Permission denied)" in done.stdout
        assert f"{shared / 'images' / 'coat' / 'im1.png'} (unreadable: Permission denied)" in done.stdout
        index = json.loads((shared / "out" / "index.json").read_text())
        assert index["num_samples"] == 2 and index["skipped"] == 2 and not list((shared / "out").glob("*.tmp"))
    finally:
        (shared / "images" / "locked").chmod(0o755)
        shutil.rmtree(shared)
