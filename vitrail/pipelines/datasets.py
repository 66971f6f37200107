"""Built-in datasets, read from local files only (nothing is downloaded at run time)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from vitrail.errors import VitrailError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx files: `root`, else $VITRAIL_DATA, else Debian's."""
    candidates = [root] if root else [os.environ.get("VITRAIL_DATA"), *FASHION_MNIST_DIRS]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if (path / "train-images-idx3-ubyte.gz").exists() or (path / "train-images-idx3-ubyte").exists():
            return path
    raise VitrailError(
        f"Fashion-MNIST idx files not found in {', '.join(str(c) for c in filter(None, candidates))}; "
        "install Debian's dataset-fashion-mnist or set VITRAIL_DATA to the folder holding "
        "train-images-idx3-ubyte.gz"
    )


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists() and path.with_suffix("").exists():
        path = path.with_suffix("")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
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
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise VitrailError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    return images, labels
