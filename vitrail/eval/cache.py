"""Extracted features on disk, memory-mapped, one folder per (model, data, transform, feature mode).

`CACHE/<name>-<key>/` holds features.npy (N, F) float32, labels.npy (N,) int64, keys.npy (N,)
str and identity.json (what `key` hashes, readable). The folder is filled under a temporary
name and renamed in one step, so a killed extraction never leaves an entry that a later run
could take for complete; features stream into a memory-mapped file, so an ImageNet-sized set
(1.28M x 768 float32, 3.9 GB) never has to fit in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrail.errors import VitrailError

# Bump when extraction changes in a way that alters stored features.
FORMAT = 1
_COPY_ROWS = 65536


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, F) float32; a read-only memmap when it comes from disk
    labels: np.ndarray  # (N,) int64
    keys: np.ndarray  # (N,) str
    folder: Path | None = None


def entry(cache_dir: str | Path, name: str, identity: dict) -> Path:
    """The folder of the features identified by `identity` (any JSON-able dict)."""
    text = json.dumps({"format": FORMAT, **identity}, sort_keys=True)
    return Path(cache_dir) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def load(folder: Path) -> FeatureSet | None:
    """The stored features, memory-mapped, or None when the entry does not exist."""
    if not (folder / "identity.json").exists():
        return None
    try:
        return FeatureSet(np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
                          np.load(folder / "keys.npy"), folder)
    except (OSError, ValueError) as error:
        raise VitrailError(f"feature cache {folder} is unreadable ({error}); delete it or pass --no-cache") from None


def store(folder: Path, batches, capacity: int, identity: dict) -> FeatureSet:
    """Write (features, labels, keys) batches, at most `capacity` rows, into `folder`; return them memory-mapped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    features, labels, keys, count = None, [], [], 0
    for batch_features, batch_labels, batch_keys in batches:
        if features is None:
            features = np.lib.format.open_memmap(temporary / "features.npy", mode="w+", dtype=np.float32,
                                                 shape=(capacity, batch_features.shape[1]))
        features[count:count + len(batch_features)] = batch_features
        labels.append(batch_labels)
        keys.extend(batch_keys)
        count += len(batch_features)
    if features is None:
        shutil.rmtree(temporary)
        raise VitrailError(f"no features to cache in {folder}: the shards gave no readable samples")
    if count < capacity:  # undecodable samples were skipped: keep only the rows written
        features = _truncated(temporary / "features.npy", features, count)
    features.flush()
    del features
    np.save(temporary / "labels.npy", np.concatenate(labels).astype(np.int64))
    np.save(temporary / "keys.npy", np.asarray(keys, dtype=str))
    (temporary / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
    try:
        os.rename(temporary, folder)
    except OSError:  # another process stored the same entry first; theirs is as good as ours
        shutil.rmtree(temporary)
    return load(folder)


def _truncated(path: Path, features: np.memmap, count: int) -> np.memmap:
    shorter = np.lib.format.open_memmap(path.with_suffix(".part"), mode="w+", dtype=np.float32,
                                        shape=(count, features.shape[1]))
    for start in range(0, count, _COPY_ROWS):
        shorter[start:start + _COPY_ROWS] = features[start:min(count, start + _COPY_ROWS)]
    shorter.flush()
    del features
    os.replace(path.with_suffix(".part"), path)
    return np.load(path, mmap_mode="r+")
