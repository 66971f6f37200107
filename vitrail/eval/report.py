"""Evaluate a checkpoint: cached frozen features -> k-NN / linear probe -> results.json and tables."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from vitrail import storage
from vitrail.errors import VitrailError
from vitrail.eval import cache
from vitrail.eval.checkpoint import open_checkpoint, results_dir
from vitrail.eval.distributed import ray_feature_batches
from vitrail.eval.features import check_mode, cls_columns, default_probe_features, feature_batches
from vitrail.eval.knn_process import knn_in_subprocess
from vitrail.eval.linear import linear_probe
from vitrail.pipelines.shards import INDEX, ShardIndex, read_index
from vitrail.pipelines.views import EvalTransform

DINO_KS = (10, 20, 100, 200)  # DINO's eval_knn.py --nb_knn


def evaluate(path, protocols=("knn",), train_shards=None, test_shards=None, ks=DINO_KS,
             temperature: float = 0.07, linear_epochs: int = 100, resize_size: int | None = None,
             crop_size: int | None = None, baselines: bool = False, limit: int | None = None,
             device: str = "cpu", arch: str | None = None, patch_size: int | None = None,
             probe_features: str | None = None, cache_dir=None, use_cache: bool = True, workers: int = 0,
             faiss_threads: int | None = None, knn_memory_mb: int = 512, log=print) -> dict[str, list[dict]]:
    """{protocol: rows} for "knn" and/or "linear"; one row per model (and per k for the k-NN).

    Features are extracted once per (model, shards, transform, feature mode) and cached under
    `cache_dir` (default RUN_DIR/features); `workers` > 0 extracts over that many Ray tasks. The
    k-NN reads the final CLS features, the probe `probe_features` (default: DINO's for the
    backbone, see features.default_probe_features); with both, one extraction serves both. With
    `baselines`, raw pixels and the seeded random init of the architecture get rows too.
    """
    checkpoint = open_checkpoint(path, arch, patch_size)
    train_index = read_index(train_shards or checkpoint.eval_train_shards or _missing("train"))
    test_index = read_index(test_shards or checkpoint.eval_test_shards or _missing("test"))
    label_map = test_label_map(train_index, test_index, log)
    crop_size = crop_size or checkpoint.crop_size
    transform = EvalTransform.at(crop_size, resize_size)
    models = [(checkpoint.name, checkpoint.backbone, checkpoint.identity())]
    if baselines:
        models = [("raw pixels", torch.nn.Flatten(), {"raw": True}),
                  ("random init", checkpoint.build_random(), {**checkpoint.identity(), "random_init_seed": 0})] + models

    data = checkpoint.data
    scratch = None if use_cache else tempfile.TemporaryDirectory(prefix="vitrail-features-")
    cache_dir = Path(scratch.name if scratch else cache_dir or _default_cache(results_dir(path)))
    results = {protocol: [] for protocol in protocols}
    try:
        for name, model, identity in models:
            mode = "cls"
            if "linear" in protocols and name != "raw pixels":
                mode = probe_features or default_probe_features(model)
                check_mode(model, mode, name)
            split_features = []
            for split, index in (("train", train_index), ("test", test_index)):
                key = {"model": identity, "data": _index_digest(index), "transform": [transform.resize_size, crop_size],
                       "channels": data.channels, "mean": data.mean, "std": data.std, "mode": mode, "limit": limit}
                folder = cache.entry(cache_dir, f"{_slug(name)}-{split}", key)
                found = cache.load(folder) if use_cache else None
                if found is not None:
                    log(f"{name}: {split} features cached in {folder}")
                else:
                    log(f"extracting {name} {split} features ({index.folder}, mode {mode}"
                        f"{f', {workers} Ray workers' if workers else ''})")
                    found = cache.store(folder, _batches(model, index, transform, data, mode, limit, workers, device),
                                        _capacity(index, limit), key)
                split_features.append(found)
            train, test = split_features
            row = {"features": name, "samples_train": len(train.labels), "samples_test": len(test.labels)}
            if "knn" in results:
                columns = cls_columns(mode, None if mode == "cls" else model.embed_dim)
                accuracies, _ = knn_in_subprocess(train.folder, test.folder, columns, ks, temperature,
                                                  max_memory_mb=knn_memory_mb, num_threads=faiss_threads,
                                                  test_label_map=label_map)
                dim = train.features[:1, columns].shape[1]
                results["knn"] += [{**row, "dim": dim, "k": k, "temperature": temperature, **accuracies[k]} for k in ks]
            if "linear" in results:
                # Raw pixels need standardising; backbone features go in as they are (DINO).
                test_labels = test.labels if label_map is None else label_map[test.labels]
                probe = linear_probe(np.array(train.features), train.labels, np.array(test.features), test_labels,
                                     epochs=linear_epochs, standardize=name == "raw pixels", device=device)
                results["linear"].append({**row, "dim": train.features.shape[1], "probe_features": mode, **probe,
                                          "epochs": linear_epochs})
    finally:
        if scratch:
            scratch.cleanup()
    return results


def test_label_map(train: ShardIndex, test: ShardIndex, log=print) -> np.ndarray | None:
    """Where each test label's class sits in the train class list: None when both shard sets list the
    same classes in the same order. Labels are positions in a class list, so comparing them across
    two lists in different orders would score right answers as wrong."""
    if train.classes == test.classes:
        return None
    if sorted(train.classes) != sorted(test.classes):
        raise VitrailError(f"train and test shards name different classes: {train.folder} has {_names(train.classes)}, "
                           f"{test.folder} has {_names(test.classes)}; evaluate on shard sets of one data set")
    log(f"{test.folder} lists the classes of {train.folder} in another order: test labels are mapped by class name")
    return np.array([train.classes.index(name) for name in test.classes], dtype=np.int64)


def _names(classes: list[str], shown: int = 20) -> str:
    more = f" ... ({len(classes)} in all)" if len(classes) > shown else ""
    return f"[{', '.join(classes[:shown])}{more}]"


def _batches(model, index: ShardIndex, transform, data, mode, limit, workers, device):
    if workers:
        return ray_feature_batches(model, index, transform, data.normalization, workers,
                                   limit=limit, mode=mode, max_pixels=data.max_image_pixels)
    return feature_batches(model, index, transform, data.normalization, device=device, limit=limit, mode=mode,
                           max_pixels=data.max_image_pixels, progress=f"features {index.folder}")


def _capacity(index: ShardIndex, limit: int | None) -> int:
    return index.num_samples if limit is None else min(index.num_samples, limit)


def _index_digest(index: ShardIndex) -> str:
    # index.json lists every shard's sample count and sha256: equal digests, equal data.
    return hashlib.sha256(storage.read_bytes(storage.join(index.folder, INDEX))).hexdigest()


def _default_cache(run_dir: str) -> Path:
    """RUN_DIR/features; for a run dir on object storage a local folder named after it, since the
    cache is memory-mapped."""
    if storage.is_local(run_dir):
        return storage.local_path(run_dir) / "features"
    return Path(tempfile.gettempdir()) / "vitrail-features" / hashlib.sha256(run_dir.encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _missing(split: str):
    raise VitrailError(f"no {split} shards to evaluate on: pass --data, or --{split}-shards, or set "
                       f"data.eval_{split}_shards in the run's config")


def write_results(path: str | Path, results: dict[str, list[dict]]) -> str:
    """Merge `results` into results.json of the checkpoint's run dir (or the released file's folder)."""
    path = storage.join(results_dir(path), "results.json")
    stored = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    stored.update(results)
    storage.write_text(path, json.dumps(stored, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot store {type(value)} in results.json")


def table(rows: list[dict], columns=("features", "dim", "top1", "top5")) -> str:
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
