"""`vitrail export RUN_DIR_OR_CHECKPOINT OUT`: a run's backbone as safetensors for timm or vitrail,
with where it came from (method, step, data set, k-NN score) in config.json."""

from __future__ import annotations

import json
from pathlib import Path

from vitrail import storage
from vitrail.backbones.exported import export
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import Checkpoint, is_vitrail_checkpoint, load_state, results_dir, vitrail_checkpoint

_SPLITS = ("train", "val", "test")


def export_run(path: str | Path, out: str | Path, which: str | None = None, fmt: str = "timm") -> str:
    """Export the `which` backbone ("teacher" / "student"; default the one vitrail evaluates) of the
    run dir or checkpoint `path` to the folder `out` (a path or URL)."""
    file, state = load_state(path)
    if not is_vitrail_checkpoint(state):
        raise VitrailError(f"{file} is not a vitrail checkpoint (it stores no config): `vitrail export` takes a run "
                           "dir or one of its checkpoints/step-*/state.pt")
    checkpoint = vitrail_checkpoint(file, state)
    student, teacher = checkpoint.method.backbone_pair()
    backbone = {"student": student, "teacher": teacher, None: checkpoint.backbone}[which]
    config = checkpoint.config
    provenance = {
        "method": config.method.name,
        "network": "teacher" if backbone is teacher and teacher is not student else "student",
        "step": checkpoint.step,
        "checkpoint": storage.absolute(file),
        "dataset": _dataset_name(config.data.shards),
        "shards": config.data.shards,
        "knn_top1": _knn_scores(path, checkpoint),
    }
    return export(backbone, out, fmt, checkpoint.crop_size, config.data.mean, config.data.std, provenance)


def _dataset_name(shards: str) -> str:
    """The shard folder's name, with its parent's when the folder is a split: 'fashion-mnist/train'."""
    folder = storage.name(shards)
    return f"{storage.name(storage.parent(shards))}/{folder}" if folder in _SPLITS else folder


def _knn_scores(path, checkpoint: Checkpoint) -> dict[str, float] | None:
    """k -> top-1 of this checkpoint's weighted k-NN in the run's results.json, when it was evaluated."""
    results = storage.join(results_dir(path), "results.json")
    if not storage.exists(results):
        return None
    rows = [row for row in json.loads(storage.read_text(results)).get("knn", []) if row.get("features") == checkpoint.name]
    return {str(row["k"]): row["top1"] for row in rows} or None
