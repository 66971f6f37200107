"""Write, index and verify webdataset shards.

A shard folder holds `shard-000000.tar ...` and `index.json` (samples per shard, class
names, sha256 per shard). Each sample is `KEY.<ext>` (the image in its original encoding)
plus `KEY.cls` (the class index as ASCII). Keys contain no dots, since webdataset splits a
member name at its first dot.

Shards are byte-identical across runs (sorted inputs, fixed tar metadata). Writing is
resumable: every finished shard is recorded in `progress.jsonl`; a re-run keeps recorded
shards whose checksum still matches, rewrites the rest, and writes `index.json` last, so a
folder with an index is complete and one without it is partial.

A shard folder may be local or a URL (`vitrail.storage`): shards are written to a local temporary
file and then moved (renamed, or uploaded) to their name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from vitrail import storage
from vitrail.errors import VitrailError
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS, UndecodableImage, check
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
    source: str = ""           # the file it is read from, named when it cannot be


@dataclass(frozen=True)
class Screening:
    """What sharding does with an input it cannot use: skip it, named and counted (default), or,
    `strict`, stop naming it. With `decode`, every image is decoded (within `max_pixels`) too."""

    strict: bool = False
    decode: bool = False
    max_pixels: int | None = None  # None: decode.MAX_IMAGE_PIXELS

    def problem(self, data: bytes) -> str | None:
        """Why the image `data` cannot be used, or None."""
        if not self.decode:
            return None
        try:
            check(data, self.max_pixels or MAX_IMAGE_PIXELS)
        except UndecodableImage as error:
            return f"undecodable: {error}"
        return None

    def report(self, problems: list[str], log: Callable[[str], None]) -> None:
        """Stop on `problems` when strict, else log them as skipped."""
        if problems and self.strict:
            raise refusal(problems)
        if problems:
            log(f"skipped {len(problems)} input images: {listed(problems)}")


def refusal(problems: list[str]) -> VitrailError:
    return VitrailError(f"{len(problems)} input images cannot be sharded (--strict): {listed(problems)}")


_LISTED = 20  # problems named in a message; the count covers them all


def listed(problems: list[str]) -> str:
    more = len(problems) - _LISTED
    return "; ".join(problems[:_LISTED]) + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class ShardIndex:
    folder: str  # a local path or a URL
    classes: list[str]
    shards: list[dict]  # [{"name", "samples", "sha256"}]
    skipped: int = 0    # input images left out when sharding (unreadable, or undecodable with --decode)

    @property
    def num_samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    @property
    def paths(self) -> list[str]:
        return [storage.join(self.folder, shard["name"]) for shard in self.shards]


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with storage.open_input(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: str, samples: Sequence[Sample], screening: Screening) -> list[str]:
    """Write `samples` to the shard at `path`, leaving out those `screening` refuses or that cannot
    be read; returns why each was left out. No partial file survives an error."""
    if storage.is_local(path):
        temporary = storage.local_path(path).with_suffix(".tar.tmp")
    else:
        handle, temporary = tempfile.mkstemp(suffix=".tar.tmp", prefix="vitrail-shard-")
        os.close(handle)
        temporary = Path(temporary)
    problems = []
    try:
        with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key:
                    raise VitrailError(f"sample key {sample.key!r} contains a dot; webdataset would split it")
                try:
                    data = sample.load()
                except OSError as error:  # unreadable now, though listed (EIO, EACCES, removed since)
                    problems.append(f"{sample.source or sample.key} (unreadable: {error.strerror or error})")
                    continue
                problem = screening.problem(data)
                if problem:
                    problems.append(f"{sample.source or sample.key} ({problem})")
                    continue
                _add_member(tar, f"{sample.key}.{sample.ext}", data)
                _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
        if problems and screening.strict:
            raise refusal(problems)
        storage.put_file(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return problems


def _finished_shards(out: str) -> dict[str, dict]:
    """Shards a previous run recorded as finished and whose bytes still match."""
    progress = storage.join(out, PROGRESS)
    if not storage.exists(progress):
        return {}
    kept = {}
    for line in storage.read_text(progress).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the previous run was killed
        path = storage.join(out, record["name"])
        if storage.exists(path) and sha256_file(path) == record["sha256"]:
            kept[record["name"]] = record
    return kept


def write_shards(samples: Sequence[Sample], classes: list[str], out: str | os.PathLike,
                 shard_size: int = 1000, workers: int = 1, log: Callable[[str], None] = print,
                 screening: Screening = Screening(), listed_problems: Sequence[str] = ()) -> ShardIndex:
    """Write `samples` (in the given order) to `out`; a no-op when `out` is already complete.

    Samples that cannot be read (or decoded, with `screening.decode`) are left out, named and
    counted with `listed_problems` (inputs the listing could not use) in index.json's `skipped`;
    with `screening.strict` the first shard holding one stops the run, naming them.
    """
    out = storage.absolute(out)
    if storage.exists(storage.join(out, INDEX)):
        index = read_index(out)
        if index.num_samples + index.skipped != len(samples) + len(listed_problems) or index.classes != classes:
            raise VitrailError(f"{out} already holds a different shard set ({index.num_samples} samples); choose another folder")
        log(f"{out}: complete ({index.num_samples} samples in {len(index.shards)} shards), nothing to do")
        return index
    if shard_size < 1:
        raise VitrailError(f"shard size must be at least 1, got {shard_size}")
    if screening.strict:
        screening.report(list(listed_problems), log)  # stops before anything is written
    storage.makedirs(out)
    chunks = [samples[start:start + shard_size] for start in range(0, len(samples), shard_size)]
    names = [f"shard-{number:06d}.tar" for number in range(len(chunks))]
    finished = _finished_shards(out)
    if finished:
        log(f"{out}: partial shard set found, keeping {len(finished)} finished shards of {len(chunks)}")
    if storage.is_local(out):
        for stale in storage.local_path(out).glob("*.tmp"):
            stale.unlink()
    todo = [(name, chunk) for name, chunk in zip(names, chunks) if name not in finished]

    def finish(name: str, count: int, problems: list[str]) -> None:
        record = {"name": name, "samples": count - len(problems), "sha256": sha256_file(storage.join(out, name)),
                  "skipped": problems}
        finished[name] = record
        storage.append_text(storage.join(out, PROGRESS), json.dumps(record) + "\n")

    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = {name: pool.submit(_write_shard, storage.join(out, name), chunk, screening) for name, chunk in todo}
            for (name, chunk) in todo:
                finish(name, len(chunk), futures[name].result())
    else:
        for name, chunk in todo:
            finish(name, len(chunk), _write_shard(storage.join(out, name), chunk, screening))
    problems = [*listed_problems, *(problem for name in names for problem in finished[name].pop("skipped", []))]
    screening.report(problems, log)
    index = {"classes": classes, "num_samples": sum(finished[name]["samples"] for name in names),
             "skipped": len(problems), "shards": [finished[name] for name in names]}
    storage.write_text(storage.join(out, INDEX), json.dumps(index, indent=1) + "\n")
    storage.delete(storage.join(out, PROGRESS))
    log(f"{out}: wrote {index['num_samples']} samples in {len(names)} shards"
        + (f", {len(problems)} input images skipped (named above)" if problems else ""))
    return read_index(out)


def read_index(folder: str | os.PathLike) -> ShardIndex:
    folder = storage.absolute(folder)
    storage.check_readable(folder, "shard directory")
    if storage.scheme(folder) not in storage.HTTP_SCHEMES and not storage.is_dir(folder):
        raise VitrailError(f"shard directory {folder} does not exist")
    path = storage.join(folder, INDEX)
    if not storage.exists(path):
        partial = storage.is_local(folder) or storage.scheme(folder) in storage.OBJECT_SCHEMES
        hint = (" (a partial shard set: re-run `vitrail shard` to finish it)"
                if partial and storage.exists(storage.join(folder, PROGRESS)) else "")
        raise VitrailError(f"shard directory {folder} has no {INDEX}{hint}")
    try:
        tree = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VitrailError(f"{path} is not a vitrail shard index: {error}") from None
    return validated_index(folder, tree, path)


def validated_index(folder: str, tree, path: str) -> ShardIndex:
    """index.json's contents as a ShardIndex, every field checked: an index is data a user or
    another tool may have written, and a bad field must be named here, not met as a KeyError later."""
    def fail(field: str, expected: str, value) -> VitrailError:
        return VitrailError(f"{path}: {field} must be {expected}, got {value!r}"[:400])

    def count(field: str, value) -> int:
        if type(value) is not int or value < 0:  # bool is an int subclass: refused too
            raise fail(field, "a non-negative integer", value)
        return value

    if not isinstance(tree, dict):
        raise fail("the index", "a JSON object with classes and shards", tree)
    classes, shards = tree.get("classes"), tree.get("shards")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise fail("classes", "a list of class names (strings)", classes)
    if not isinstance(shards, list):
        raise fail("shards", "a list of {name, samples, sha256} objects", shards)
    for number, shard in enumerate(shards):
        where = f"shards[{number}]"
        if not isinstance(shard, dict):
            raise fail(where, "a {name, samples, sha256} object", shard)
        name = shard.get("name")
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise fail(f"{where}.name", "a file name inside the shard folder (no '..', not absolute)", name)
        count(f"{where}.samples", shard.get("samples"))
        sha256 = shard.get("sha256")
        if not isinstance(sha256, str) or len(sha256) != 64 or set(sha256) - set("0123456789abcdef"):
            raise fail(f"{where}.sha256", "64 lowercase hex digits", sha256)
    index = ShardIndex(folder, classes, shards, count("skipped", tree.get("skipped", 0)))
    if "num_samples" in tree and count("num_samples", tree["num_samples"]) != index.num_samples:
        raise fail("num_samples", f"the sum of the shards' samples ({index.num_samples})", tree["num_samples"])
    return index


def verify(folder: str | os.PathLike, screening: Screening = Screening()) -> ShardIndex:
    """Re-check every shard's presence and sha256 against index.json; with `screening.decode`, read
    every shard whole and decode every image too, naming each that fails and each count that differs."""
    index = read_index(folder)
    problems = []
    for shard in index.shards:
        path = storage.join(index.folder, shard["name"])
        if not storage.exists(path):
            problems.append(f"{path} is missing")
            continue
        found = sha256_file(path)
        if found != shard["sha256"]:
            problems.append(f"{path} has sha256 {found}, index.json says {shard['sha256']}")
        if screening.decode:
            problems.extend(_screen_shard(path, shard["samples"], screening))
    if problems:
        raise VitrailError(f"shard verification failed, {len(problems)} problems: {listed(problems)}")
    return index


def _screen_shard(path: str, declared: int, screening: Screening) -> list[str]:
    """Why each sample of the shard at `path` would be skipped in training, and a count that differs."""
    stream = ShardStream(path, None)
    problems = []
    for sample in stream:
        image = next((sample[ext] for ext in sorted(READ_EXTENSIONS) if ext in sample), None)
        problem = "no image member" if image is None else screening.problem(image)
        if problem:
            problems.append(f"{storage.name(path)}:{sample['__key__']} ({problem})")
    if stream.error is not None:
        problems.append(f"{path} cannot be read whole ({stream.error}) after {stream.read} samples")
    elif stream.read != declared:
        problems.append(f"{path} holds {stream.read} samples, index.json declares {declared}")
    return problems


def index_existing(folder: str | os.PathLike, workers: int = 1, log: Callable[[str], None] = print) -> ShardIndex:
    """Write index.json for webdataset shards made elsewhere (`*.tar` in `folder`, sorted by name),
    in place: no image is copied. Each shard is read once to count its samples and gather its
    `.cls` labels (integers; classes become "0".."max"); a shard that can't be read whole is
    named in the error, since index.json must declare what the shards hold."""
    folder = storage.absolute(folder)
    if storage.exists(storage.join(folder, INDEX)):
        index = read_index(folder)
        log(f"{folder}: already indexed ({index.num_samples} samples in {len(index.shards)} shards), nothing to do")
        return index
    if storage.exists(storage.join(folder, PROGRESS)):
        raise VitrailError(f"{folder} is a partial shard set that `vitrail shard` was writing: re-run that command "
                           "to finish it")
    paths = [storage.join(folder, name) for name in storage.listdir(folder) if name.endswith(".tar")]
    if not paths:
        raise VitrailError(f"{folder} holds no .tar shards to index")
    if workers > 1 and len(paths) > 1:
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
    storage.write_text(storage.join(folder, INDEX), json.dumps(index, indent=1) + "\n")
    log(f"{folder}: indexed {index['num_samples']} samples in {len(scans)} shards")
    return read_index(folder)


def _scan_shard(path: str) -> dict:
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
    return {"name": storage.name(path), "samples": stream.read, "sha256": sha256_file(path), "max_label": max_label,
            "without_image": without_image}
