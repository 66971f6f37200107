"""Evaluate a run: frozen features of its eval backbone -> k-NN / linear probe -> results.json and tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vitrail import ssl
from vitrail.errors import VitrailError
from vitrail.eval.features import extract
from vitrail.eval.knn import knn_classify
from vitrail.eval.linear import linear_probe
from vitrail.launch import checkpoints
from vitrail.launch.config import Config, from_dict
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform


def load_run(path: str | Path, random_init: bool = False) -> tuple[Config, torch.nn.Module, int]:
    """(config, eval backbone, step) of a run dir or one of its checkpoint files."""
    state = checkpoints.load(path)
    config = from_dict(state["config"], f"config stored in {path}")
    method = ssl.build(config, steps_per_epoch=1, total_steps=1)
    if not random_init:
        method.load_state_dict(state["method"])
    return config, method.backbone_for_eval(), 0 if random_init else int(state["step"])


def evaluate(path, protocols=("knn",), train_shards=None, test_shards=None, k: int = 20,
             temperature: float = 0.07, linear_epochs: int = 100, resize_size: int | None = None,
             crop_size: int | None = None, baselines: bool = False, limit: int | None = None,
             device: str = "cpu", log=print) -> dict[str, list[dict]]:
    """{protocol: rows} for "knn" and/or "linear"; features are extracted once per model and split.

    With `baselines`, raw pixels and the randomly initialised backbone get rows beside the run's.
    """
    config, backbone, step = load_run(path)
    train_index = read_index(train_shards or config.data.eval_train_shards or _missing("train"))
    test_index = read_index(test_shards or config.data.eval_test_shards or _missing("test"))
    # The size the backbone trained at: DINO/iBOT's global crops, the other methods' single crop.
    crop_size = crop_size or getattr(config.method, "global_crop_size", None) or config.method.crop_size
    # DINO evaluates 224 centre crops of images resized to 256: the same 256/224 ratio by default.
    transform = EvalTransform(resize_size or round(crop_size * 256 / 224), crop_size)
    models = [(f"pretrained (step {step})", backbone)]
    if baselines:
        models = [("raw pixels", torch.nn.Flatten()), ("random init", load_run(path, random_init=True)[1])] + models

    results = {protocol: [] for protocol in protocols}
    for name, model in models:
        log(f"extracting {name} features ({train_index.folder}, {test_index.folder})")
        train, test = (extract(model, index, transform, config.data.channels, config.data.mean, config.data.std,
                               device=device, limit=limit) for index in (train_index, test_index))
        row = {"features": name, "dim": train[0].shape[1], "samples_train": len(train[0]), "samples_test": len(test[0])}
        if "knn" in results:
            results["knn"].append({**row, **knn_classify(*train, *test, k=k, temperature=temperature),
                                   "k": k, "temperature": temperature})
        if "linear" in results:
            # Raw pixels need standardising; backbone features go in as they are (DINO).
            probe = linear_probe(*train, *test, epochs=linear_epochs, standardize=name == "raw pixels", device=device)
            results["linear"].append({**row, **probe, "epochs": linear_epochs})
    return results


def _missing(split: str):
    raise VitrailError(f"no {split} shards to evaluate on: pass --{split}-shards or set data.eval_{split}_shards in the config")


def write_results(run_dir: str | Path, results: dict[str, list[dict]]) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent.parent  # RUN_DIR/checkpoints/step-N.pt
    path = run_dir / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.update(results)
    path.write_text(json.dumps(stored, indent=1, default=_jsonable) + "\n")
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
