"""What `vitrail shard` reads: an image folder (one sub-folder per class), a file list, in-memory arrays.

A folder or list may be a local path or a storage URL (s3://, gs://, file://); a list, and the
images it names, may also be on a web server (http(s)://), whose folders cannot be listed.

Each becomes a list of `shards.Sample` whose bytes are read later, by the process writing its
shard. Inputs that cannot be used are named: a folder listing returns them (an unreadable
folder, a dangling symlink, an image name on a FIFO or a directory), a file list refuses a
line naming a missing file, and a file that fails when read is left out by the writer.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from functools import partial
from pathlib import Path

from PIL import Image

from vitrail import storage
from vitrail.errors import VitrailError
from vitrail.pipelines.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from vitrail.pipelines.shards import IMAGE_EXTENSIONS, Sample, ShardIndex, listed, write_shards


def read_regular_file(path: Path | str) -> bytes:
    """The bytes of a local `path` or a URL, refusing a local file that is no regular one: reading a
    FIFO would block for ever."""
    if isinstance(path, str):
        return storage.read_bytes(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return path.read_bytes()


def _image_files(folder: Path, problems: list[str]) -> list[Path]:
    """The image files under `folder`, sorted; entries that cannot be used (an unreadable folder, a
    dangling symlink, an image name on something other than a file) go to `problems`, named."""
    def unreadable(error: OSError) -> None:
        problems.append(f"{error.filename} (unreadable folder: {error.strerror})")

    files = []
    for parent, _, names in os.walk(folder, onerror=unreadable):
        for name in names:
            path = Path(parent) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not path.exists():
                problems.append(f"{path} (dangling symlink to {os.readlink(path)})")
            elif not path.is_file():
                problems.append(f"{path} (not a regular file)")
            else:
                files.append(path)
    return sorted(files)


def _suffix(path: Path | str) -> str:
    return Path(str(path)).suffix.lower()


def _local_folder(source: Path) -> tuple[list[str], dict[str, list[Path]], list[str]]:
    if not source.is_dir():
        raise VitrailError(f"image folder {source} does not exist")
    try:
        classes = sorted(entry.name for entry in source.iterdir() if entry.is_dir())
    except OSError as error:
        raise VitrailError(f"cannot read image folder {source}: {error.strerror}") from None
    problems = []
    return classes, {name: _image_files(source / name, problems) for name in classes}, problems


def _stored_folder(source: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """A folder on an object store: its classes are the prefixes holding objects, each sorted as a local
    folder's paths are (by path component)."""
    if storage.scheme(source) in storage.HTTP_SCHEMES:
        raise VitrailError(f"image folder {source}: a web server's folders cannot be listed; shard a file list "
                           "naming its image URLs instead (`vitrail shard list`)")
    if not storage.is_dir(source):
        raise VitrailError(f"image folder {source} does not exist")
    images = {}
    for relative in sorted(storage.list_files(source), key=lambda path: path.split("/")):
        name, separator, _ = relative.partition("/")
        if separator:
            found = images.setdefault(name, [])
            if _suffix(relative) in IMAGE_EXTENSIONS:
                found.append(storage.join(source, relative))
    return sorted(images), images, []


def folder_samples(source: str | os.PathLike) -> tuple[list[Sample], list[str], list[str]]:
    """An ImageFolder tree (one sub-folder per class) as (samples in sorted order, classes, the
    entries that cannot be used, named)."""
    if storage.is_local(source):
        source = storage.local_path(source)
        classes, images, problems = _local_folder(source)
    else:
        source = storage.absolute(source)
        classes, images, problems = _stored_folder(source)
    if not classes:
        raise VitrailError(f"image folder {source} has no class sub-folders")
    samples = [Sample(f"c{label:05d}_{number:08d}", IMAGE_EXTENSIONS[_suffix(path)], label,
                      partial(read_regular_file, path), str(path))
               for label, name in enumerate(classes) for number, path in enumerate(images[name])]
    if not samples:
        raise VitrailError(f"image folder {source} holds no readable images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                           + (f": {listed(problems)}" if problems else ""))
    return samples, classes, problems


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
    local = storage.is_local(listing)
    listing = storage.local_path(listing) if local else storage.absolute(listing)
    try:
        lines = (listing.read_text() if local else storage.read_text(listing)).splitlines()
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
        resolved = _resolve(path, listing)
        if _suffix(resolved) not in IMAGE_EXTENSIONS:
            raise VitrailError(f"{where}: {path!r} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if isinstance(resolved, Path):
            exists, regular = resolved.exists(), resolved.is_file()
        else:
            exists, regular = storage.exists(resolved), not storage.is_dir(resolved)
        if not exists:
            raise VitrailError(f"{where}: image {resolved} does not exist")
        if not regular:
            raise VitrailError(f"{where}: {resolved} is not a regular file")
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
    samples = [Sample(f"l{position:09d}", IMAGE_EXTENSIONS[_suffix(path)], index.get(label, -1),
                      partial(read_regular_file, path), str(path))
               for position, (_, path, label) in enumerate(entries)]
    return samples, classes


def _resolve(path: str, listing: Path | str) -> Path | str:
    """A list line's image: a URL as it is, a relative path against the list's folder (local or not)."""
    if storage.scheme(path):
        return storage.local_path(path) if storage.is_local(path) else path
    if Path(path).is_absolute():
        return Path(path)
    return listing.parent / path if isinstance(listing, Path) else storage.join(storage.parent(listing), path)


def encode_png(image) -> bytes:
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
    indexes = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, root)
        samples = array_samples(images[:limit], labels[:limit], split)
        indexes[split] = write_shards(samples, FASHION_MNIST_CLASSES, storage.join(out, split), shard_size, workers, log)
    return indexes
