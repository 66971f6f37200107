"""Built-in datasets, read from files the user has (a local folder or a storage URL): nothing is downloaded
from the internet at run time."""

from __future__ import annotations

import gzip
import os
import numpy as np

from vitrail import storage
from vitrail.errors import VitrailError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> str:
    """The folder (a path or URL) holding the Fashion-MNIST idx files: `root`, else $VITRAIL_DATA, else Debian's."""
    candidates = [root] if root else [os.environ.get("VITRAIL_DATA"), *FASHION_MNIST_DIRS]
    for candidate in filter(None, candidates):
        if any(storage.exists(storage.join(candidate, name)) for name in ("train-images-idx3-ubyte.gz",
                                                                         "train-images-idx3-ubyte")):
            return str(candidate)
    raise VitrailError(
        f"Fashion-MNIST idx files not found in {', '.join(str(c) for c in filter(None, candidates))}; "
        "install Debian's dataset-fashion-mnist or set VITRAIL_DATA to the folder holding "
        "train-images-idx3-ubyte.gz"
    )


def _read_idx(path: str) -> np.ndarray:
    if not storage.exists(path) and storage.exists(path.removesuffix(".gz")):
        path = path.removesuffix(".gz")
    try:
        data = storage.read_bytes(path)
        data = gzip.decompress(data) if path.endswith(".gz") else data
    except OSError as error:
        raise VitrailError(f"cannot read idx file {path}: {error}") from error
    # idx header: two zero bytes, a dtype code (0x08 = uint8), the rank, then one big-endian int32 per dim.
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise VitrailError(f"{path} is not a uint8 idx file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise VitrailError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the 'train' (60k) or 'test' (10k) split."""
    if split not in _SPLIT_PREFIX:
        raise VitrailError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    folder = fashion_mnist_root(root)
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(storage.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(storage.join(folder, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    if len(images) != len(labels):
        raise VitrailError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    return images, labels
