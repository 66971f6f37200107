"""Write, index and verify webdataset shards.

A shard folder holds `shard-000000.tar ...` and `index.json` (samples per shard, class
names, sha256 per shard). Each sample is `KEY.<ext>` (the image in its original encoding)
plus `KEY.cls` (the class index as ASCII). Keys contain no dots, since webdataset splits a
member name at its first dot.

Shards are byte-identical across runs (sorted inputs, fixed tar metadata). Writing is
resumable: every finished shard is recorded in `progress.jsonl`; a re-run keeps recorded
shards whose checksum still matches, rewrites the rest, and writes `index.json` last, so a
folder with an index is complete and one without it is partial.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from vitrail.errors import VitrailError
from vitrail.pipelines.reader import ShardStream

INDEX = "index.json"
PROGRESS = "progress.jsonl"
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".ppm": "ppm"}
# Member extensions read as images: ours, plus those other webdataset writers use.
READ_EXTENSIONS = {extension.lstrip(".") for extension in IMAGE_EXTENSIONS}


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str
    label: int
    load: Callable[[], bytes]  # deferred and picklable, so shard workers read their own files


@dataclass(frozen=True)
class ShardIndex:
    folder: Path
    classes: list[str]
    shards: list[dict]  # [{"name", "samples", "sha256"}]

    @property
    def num_samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    @property
    def paths(self) -> list[str]:
        return [str(self.folder / shard["name"]) for shard in self.shards]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: Sequence[Sample]) -> None:
    temporary = path.with_suffix(".tar.tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if "." in sample.key:
                raise VitrailError(f"sample key {sample.key!r} contains a dot; webdataset would split it")
            _add_member(tar, f"{sample.key}.{sample.ext}", sample.load())
            _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
    os.replace(temporary, path)


def _finished_shards(out: Path) -> dict[str, dict]:
    """Shards a previous run recorded as finished and whose bytes still match."""
    progress = out / PROGRESS
    if not progress.exists():
        return {}
    kept = {}
    for line in progress.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the previous run was killed
        path = out / record["name"]
        if path.exists() and sha256_file(path) == record["sha256"]:
            kept[record["name"]] = record
    return kept


def write_shards(samples: Sequence[Sample], classes: list[str], out: str | os.PathLike,
                 shard_size: int = 1000, workers: int = 1, log: Callable[[str], None] = print) -> ShardIndex:
    """Write `samples` (in the given order) to `out`; a no-op when `out` is already complete."""
    out = Path(out)
    if (out / INDEX).exists():
        index = read_index(out)
        if index.num_samples != len(samples) or index.classes != classes:
            raise VitrailError(f"{out} already holds a different shard set ({index.num_samples} samples); choose another folder")
        log(f"{out}: complete ({index.num_samples} samples in {len(index.shards)} shards), nothing to do")
        return index
    if shard_size < 1:
        raise VitrailError(f"shard size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    chunks = [samples[start:start + shard_size] for start in range(0, len(samples), shard_size)]
    names = [f"shard-{number:06d}.tar" for number in range(len(chunks))]
    finished = _finished_shards(out)
    if finished:
        log(f"{out}: partial shard set found, keeping {len(finished)} finished shards of {len(chunks)}")
    for stale in out.glob("*.tmp"):
        stale.unlink()
    todo = [(name, chunk) for name, chunk in zip(names, chunks) if name not in finished]

    def finish(name: str, count: int) -> None:
        record = {"name": name, "samples": count, "sha256": sha256_file(out / name)}
        finished[name] = record
        with open(out / PROGRESS, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    if workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as pool:
            futures = {name: pool.submit(_write_shard, out / name, chunk) for name, chunk in todo}
            for (name, chunk) in todo:
                futures[name].result()
                finish(name, len(chunk))
    else:
        for name, chunk in todo:
            _write_shard(out / name, chunk)
            finish(name, len(chunk))
    index = {"classes": classes, "num_samples": len(samples), "shards": [finished[name] for name in names]}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    (out / PROGRESS).unlink()
    log(f"{out}: wrote {len(samples)} samples in {len(names)} shards")
    return read_index(out)


def read_index(folder: str | os.PathLike) -> ShardIndex:
    folder = Path(folder)
    if not folder.is_dir():
        raise VitrailError(f"shard directory {folder} does not exist")
    path = folder / INDEX
    if not path.exists():
        hint = " (a partial shard set: re-run `vitrail shard` to finish it)" if (folder / PROGRESS).exists() else ""
        raise VitrailError(f"shard directory {folder} has no {INDEX}{hint}")
    try:
        index = json.loads(path.read_text())
        return ShardIndex(folder, list(index["classes"]), list(index["shards"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise VitrailError(f"{path} is not a vitrail shard index: {error}") from None


def verify(folder: str | os.PathLike) -> ShardIndex:
    """Re-check every shard's presence and sha256 against index.json."""
    index = read_index(folder)
    problems = []
    for shard in index.shards:
        path = index.folder / shard["name"]
        if not path.exists():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{path} has sha256 {sha256_file(path)}, index.json says {shard['sha256']}")
    if problems:
        raise VitrailError("shard verification failed: " + "; ".join(problems))
    return index


def index_existing(folder: str | os.PathLike, workers: int = 1, log: Callable[[str], None] = print) -> ShardIndex:
    """Write index.json for webdataset shards made elsewhere (`*.tar` in `folder`, sorted by name),
    in place: no image is copied. Each shard is read once to count its samples and gather its
    `.cls` labels (integers; classes become "0".."max"); a shard that can't be read whole is
    named in the error, since index.json must declare what the shards hold."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        index = read_index(folder)
        log(f"{folder}: already indexed ({index.num_samples} samples in {len(index.shards)} shards), nothing to do")
        return index
    if (folder / PROGRESS).exists():
        raise VitrailError(f"{folder} is a partial shard set that `vitrail shard` was writing: re-run that command "
                           "to finish it")
    paths = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if not paths:
        raise VitrailError(f"{folder} holds no .tar shards to index")
    if workers > 1 and len(paths) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as pool:
            scans = list(pool.map(_scan_shard, paths))
    else:
        scans = [_scan_shard(path) for path in paths]
    labels = max(scan.pop("max_label") for scan in scans)
    without_image = sum(scan.pop("without_image") for scan in scans)
    if without_image:
        log(f"{folder}: {without_image} samples have no image member ({', '.join(sorted(READ_EXTENSIONS))}); "
            "training skips and counts them")
    index = {"classes": [str(label) for label in range(labels + 1)], "num_samples": sum(s["samples"] for s in scans),
             "shards": scans}
    (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    log(f"{folder}: indexed {index['num_samples']} samples in {len(scans)} shards")
    return read_index(folder)


def _scan_shard(path: Path) -> dict:
    stream = ShardStream(path, None)
    max_label, without_image = -1, 0
    for sample in stream:
        without_image += not READ_EXTENSIONS & sample.keys()
        if "cls" in sample:
            try:
                max_label = max(max_label, int(sample["cls"]))
            except ValueError:
                raise VitrailError(f"{path}: sample {sample['__key__']!r} has a non-integer .cls label "
                                   f"{sample['cls'][:20]!r}") from None
    if stream.error is not None:
        raise VitrailError(f"{path} cannot be read whole ({stream.error}) after {stream.read} samples; "
                           "repair or remove it, then index again")
    return {"name": path.name, "samples": stream.read, "sha256": sha256_file(path), "max_label": max_label,
            "without_image": without_image}


def folder_samples(source: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """An ImageFolder tree (one sub-folder per class) as samples in sorted order."""
    source = Path(source)
    if not source.is_dir():
        raise VitrailError(f"image folder {source} does not exist")
    classes = sorted(entry.name for entry in source.iterdir() if entry.is_dir())
    if not classes:
        raise VitrailError(f"image folder {source} has no class sub-folders")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(path for path in (source / name).rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
        for number, path in enumerate(files):
            samples.append(Sample(f"c{label:05d}_{number:08d}", IMAGE_EXTENSIONS[path.suffix.lower()], label, partial(Path.read_bytes, path)))
    if not samples:
        raise VitrailError(f"image folder {source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples, classes


def _parse_list_line(line: str) -> tuple[str, str | None]:
    if "\t" in line:
        path, _, label = line.partition("\t")
    elif "," in line:
        path, _, label = line.rpartition(",")
    else:
        path, label = line, None
    return path.strip(), (label.strip() if label is not None else None)


def list_samples(listing: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """A file list, one `path` or `path<TAB or comma>label` per line, as samples in list order.

    Relative paths are resolved against the list's folder. Labels are class names (classes
    sorted by name) or, when all are integers, class indices; a list without labels gives
    label -1 and no classes. Blank lines, `#` comments and a `path[,label]` header are skipped.
    """
    listing = Path(listing)
    try:
        lines = listing.read_text().splitlines()
    except OSError as error:
        raise VitrailError(f"cannot read file list {listing}: {error}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, label = _parse_list_line(line)
        if not entries and path.lower() == "path" and label in (None, "label"):
            continue
        where = f"{listing}:{number}"
        resolved = Path(path) if Path(path).is_absolute() else listing.parent / path
        if resolved.suffix.lower() not in IMAGE_EXTENSIONS:
            raise VitrailError(f"{where}: {path!r} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if not resolved.is_file():
            raise VitrailError(f"{where}: image {resolved} does not exist")
        if entries and (label is None) != (entries[0][2] is None):
            raise VitrailError(f"{where}: every line needs a label or none does (line {entries[0][0]} differs)")
        entries.append((number, resolved, label))
    if not entries:
        raise VitrailError(f"file list {listing} names no image")
    labels = [label for _, _, label in entries]
    if labels[0] is None:
        classes, index = [], {}
    elif all(label.isdigit() for label in labels):
        classes = [str(value) for value in range(max(int(label) for label in labels) + 1)]
        index = {label: int(label) for label in labels}
    else:
        classes = sorted(set(labels))
        index = {name: position for position, name in enumerate(classes)}
    samples = [Sample(f"l{position:09d}", IMAGE_EXTENSIONS[path.suffix.lower()], index.get(label, -1), partial(Path.read_bytes, path))
               for position, (_, path, label) in enumerate(entries)]
    return samples, classes


def encode_png(image) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def array_samples(images, labels, prefix: str) -> list[Sample]:
    """In-memory uint8 images (N, H, W[, C]) as PNG samples keyed `{prefix}{index}`."""
    return [Sample(f"{prefix}{number:07d}", "png", int(label), partial(encode_png, image))
            for number, (image, label) in enumerate(zip(images, labels))]


def shard_fashion_mnist(out: str | os.PathLike, root=None, shard_size: int = 5000,
                        limit: int | None = None, workers: int = 1, log=print) -> dict[str, ShardIndex]:
    """Fashion-MNIST's train and test splits to `out/train` and `out/test` (PNG, lossless)."""
    from vitrail.pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
    indexes = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, root)
        samples = array_samples(images[:limit], labels[:limit], split)
        indexes[split] = write_shards(samples, FASHION_MNIST_CLASSES, Path(out) / split, shard_size, workers, log)
    return indexes
