"""Evaluate a run: frozen features of its eval backbone -> k-NN -> results.json and a table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vitrail import ssl
from vitrail.errors import VitrailError
from vitrail.eval.features import extract
from vitrail.eval.knn import knn_classify
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


def knn_rows(path, train_shards=None, test_shards=None, k: int = 20, temperature: float = 0.07,
             resize_size: int | None = None, crop_size: int | None = None, baselines: bool = False,
             limit: int | None = None, device: str = "cpu", log=print) -> list[dict]:
    """k-NN top-1/top-5 of the run's backbone; with `baselines`, also raw pixels and random init."""
    config, backbone, step = load_run(path)
    train_index = read_index(train_shards or config.data.eval_train_shards or _missing("train"))
    test_index = read_index(test_shards or config.data.eval_test_shards or _missing("test"))
    crop_size = crop_size or config.method.global_crop_size
    # DINO evaluates 224 centre crops of images resized to 256: the same 256/224 ratio by default.
    transform = EvalTransform(resize_size or round(crop_size * 256 / 224), crop_size)

    def evaluate(name, model):
        log(f"extracting {name} features ({train_index.folder}, {test_index.folder})")
        train = extract(model, train_index, transform, config.data.channels, config.data.mean, config.data.std, device=device, limit=limit)
        test = extract(model, test_index, transform, config.data.channels, config.data.mean, config.data.std, device=device, limit=limit)
        return {"features": name, **knn_classify(*train, *test, k=k, temperature=temperature), "dim": train[0].shape[1]}

    rows = []
    if baselines:
        rows.append(evaluate("raw pixels", torch.nn.Flatten()))
        rows.append(evaluate("random init", load_run(path, random_init=True)[1]))
    rows.append(evaluate(f"pretrained (step {step})", backbone))
    for row in rows:
        row.update(k=k, temperature=temperature, samples_train=None if limit is None else limit)
    return rows


def _missing(split: str):
    raise VitrailError(f"no {split} shards to evaluate on: pass --{split}-shards or set data.eval_{split}_shards in the config")


def write_results(run_dir: str | Path, key: str, rows: list[dict]) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent.parent  # RUN_DIR/checkpoints/step-N.pt
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = rows
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
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
