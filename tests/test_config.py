import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vitrail.errors import VitrailError
from vitrail import config as config_module

from conftest import tiny_config_tree


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_demo_and_paper_recipes_validate():
    paper = config_module.load("configs/dino_vit_small.yaml")
    assert paper.method.out_dim == 65536 and paper.method.local_crops_number == 10
    assert (paper.method.global_crop_size, paper.method.local_crop_size) == (224, 96)
    assert paper.model.backbone == "vit_small" and paper.optim.lr == 5e-4
    demo = config_module.load("configs/demo.yaml")
    assert demo.data.channels == 1


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, "method: {name: dino}\n")
    config = config_module.load(path, ["optim.lr=0.001", "model.kwargs.patch_size=8", "method.global_crops_scale=[0.3, 1.0]"])
    assert config.optim.lr == 0.001
    assert config.model.kwargs == {"patch_size": 8}
    assert config.method.global_crops_scale == (0.3, 1.0)


@pytest.mark.parametrize("override, message", [
    ("model.bogus=1", "unknown config key 'model.bogus'"),
    ("method.teacher_tmp=0.04", "unknown config key 'method.teacher_tmp'"),
    ("optim.batch_size=many", "optim.batch_size"),
    ("model.backbone=vit_huge", r"unknown backbone 'vit_huge'; known: conformer_base, .*resnet18, .*vit_tiny"),
    ("method.name=simclr", "'simclr' .* expected tags: 'byol', 'deepcluster', 'dino', 'dinov2', 'ibot', 'rotnet'"),
    ("method.local_crops_number=-1", "method.local_crops_number: Input should be greater than or equal to 0"),
    ("model.sync_batchnorm=maybe", "model.sync_batchnorm"),
    ("model.kwargs.depht=3", "model.kwargs.depht is not an argument of vit_small"),
    ("method.name=simclr", "method"),
    ("optim", "not of the form section.key=value"),
    # Another optimizer than the paper's takes none of its values: each one it needs is named.
    ("optim.name=sgd", "optim.name=sgd is not the method's paper optimizer, whose settings do not carry over: "
                       "set optim.lr, optim.lr_scaling, optim.warmup_epochs, optim.weight_decay, "
                       "optim.weight_decay_end, optim.clip_grad, optim.momentum, optim.nesterov"),
    ("optim.momentum=0.9", "optim.momentum: not a setting of optim.name=adamw"),
    ("optim.lr_milestones=[10]", "optim.lr_milestones need optim.lr_schedule: steps"),
    ("optim.name=rmsprop", "optim.name"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = _write(tmp_path, "method: {name: dino}\n")
    with pytest.raises(VitrailError, match=message):
        config_module.load(path, [override])


@pytest.mark.parametrize("method, optimizer, drop_path_rate", [
    ("dino", "adamw", 0.1), ("ibot", "adamw", 0.1), ("dinov2", "adamw", 0.3),
    ("byol", "lars", 0.0), ("rotnet", "sgd", 0.0), ("deepcluster", "sgd", 0.0),
])
def test_unset_optimizer_keys_and_stochastic_depth_are_the_methods_papers(tmp_path, method, optimizer, drop_path_rate):
    config = config_module.load(_write(tmp_path, f"method: {{name: {method}}}\n"), ["optim.lr=0.5"])
    paper = type(config.method).paper_optimizer
    assert config.optim.recipe() == dataclasses.replace(paper, lr=0.5) and paper.name == optimizer
    assert config.model.drop_path_rate == drop_path_rate
    # Recorded in full, so the run dir's config.yaml reads back to the same recipe.
    assert config_module.from_dict(yaml.safe_load(config.to_yaml())).optim.recipe() == config.optim.recipe()


@pytest.mark.parametrize("override, message", [
    ("optim.batch_size=true", "optim.batch_size: expected an integer (got True)"),
    ("optim.epochs='3'", "optim.epochs: expected an integer (got '3')"),
    ("optim.lr=false", "optim.lr: expected a number (got False)"),
    ("optim.lr=.nan", "optim.lr: expected a finite number (got nan)"),
    ("optim.weight_decay=inf", "optim.weight_decay: expected a finite number (got 'inf')"),
    ("data.mean=[-.inf, 0.5, 0.5]", "data.mean[0]: expected a finite number"),
    ("data.channels=true", "data.channels: expected one of 1, 3 (got True)"),
    ("model.sync_batchnorm=1", "model.sync_batchnorm: expected true or false (got 1)"),
    ("method.momentum_teacher=nan", "method.momentum_teacher: expected a finite number"),
    ("method.local_crops_number=true", "method.local_crops_number: expected an integer"),
    ("method.global_crops_scale=[true, 1.0]", "method.global_crops_scale[0]: expected a number"),
])
def test_strict_types_and_finite_floats(tmp_path, override, message):
    path = _write(tmp_path, "method: {name: dino}\n")
    with pytest.raises(VitrailError, match=re.escape(message)):
        config_module.load(path, [override])


def test_floats_take_ints_and_yaml_exponents_every_recipe_loads(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string: it is still a learning rate.
    config = config_module.load(_write(tmp_path, "method: {name: dino}\noptim: {lr: 1e-3, warmup_epochs: 2}\n"))
    assert (config.optim.lr, config.optim.warmup_epochs) == (0.001, 2.0)
    for recipe in sorted(Path("configs").glob("*.yaml")):
        config_module.load(recipe)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(VitrailError, match="does not exist"):
        config_module.load(tmp_path / "absent.yaml")
    with pytest.raises(VitrailError, match="not valid YAML"):
        config_module.load(_write(tmp_path, "method: [unclosed\n"))


def _pretrain_in_a_fresh_process(*args):
    # A fresh interpreter, to see whether the command got as far as starting Ray.
    code = ("import sys; from vitrail.launch.cli import main; code = main(sys.argv[1:]); "
            "ray = sys.modules.get('ray'); print('RAY-STARTED' if ray and ray.is_initialized() else 'NO-RAY'); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, "pretrain", *args], capture_output=True, text=True, timeout=120)


def _impossible_runs():
    yield "global batch", ["--workers", "2", "optim.batch_size=400"], (
        "holds 640 samples, fewer than one global batch (400 per worker x 2 workers)")
    workers = os.cpu_count()  # workers x 1 CPU + 1 for the view tasks: one CPU more than there is
    yield "cpus", ["--workers", str(workers)], (
        f"ray.workers={workers} x ray.cpus_per_worker=1 + 1 for the view tasks needs {workers + 1} CPUs "
        f"but this machine has {workers}; lower ray.workers or ray.cpus_per_worker")
    if not torch.cuda.is_available():
        yield "gpus", ["--gpus-per-worker", "1"], "ray.gpus_per_worker=1 but this machine has no GPU visible to Ray"


@pytest.mark.parametrize("args, message", [pytest.param(args, message, id=name) for name, args, message in _impossible_runs()])
def test_impossible_runs_fail_before_ray_starts(fashion_shards, tmp_path, args, message):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_tree(fashion_shards, tmp_path / "run")))
    done = _pretrain_in_a_fresh_process(str(recipe), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "NO-RAY" in done.stdout
