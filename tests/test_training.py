"""The local launcher: training, checkpoints, resume, NaN handling."""

import json
from pathlib import Path

import pytest
import torch

from vitrail import ssl
from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.config import from_dict
from vitrail.launch.local import pretrain

from conftest import resumed_trainer, tiny_config_tree


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_local_run_trains_checkpoints_and_resumes(fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, optim={"epochs": 2, "batch_size": 32, "max_steps": 12})
    trainer = pretrain(from_dict(tree), progress=False)
    assert trainer.step == 12
    assert [Path(path).parent.name for path in checkpoints.list_checkpoints(run_dir)] == ["step-00000008", "step-00000012"]
    logged = _metrics(run_dir)
    assert [row["step"] for row in logged] == [2, 4, 6, 8, 10, 12]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    assert (run_dir / "config.yaml").exists()

    # The teacher is an EMA of the student: they differ after training and the centre moved.
    state = checkpoints.load(run_dir)
    assert state["step"] == 12
    assert state["method"]["loss.center"].abs().sum() > 0

    # Same command, longer schedule: continues from step 12, not from zero.
    tree["optim"]["max_steps"] = 16
    resumed = pretrain(from_dict(tree), progress=False)
    assert resumed.step == 16
    assert [row["step"] for row in _metrics(run_dir)][6:] == [14, 16]


def test_checkpoint_reload_restores_weights_optimizer_and_centre(fashion_shards, tmp_path):
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", optim={"max_steps": 4, "batch_size": 32})
    trained = pretrain(from_dict(tree), progress=False)
    fresh = resumed_trainer(tree, trained)
    assert fresh.step == 4
    assert fresh.optimizer.state_dict()["state"].keys() == trained.optimizer.state_dict()["state"].keys()


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(fashion_shards, tmp_path):
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", optim={"max_steps": 4, "batch_size": 32})
    pretrain(from_dict(tree), progress=False)
    tree["optim"]["max_steps"] = 8
    poisoned = from_dict(tree)
    # A recipe cannot say nan (refused at parse time); set after it, it poisons every input, hence the loss.
    poisoned.data.mean = [float("nan")]
    with pytest.raises(VitrailError, match="loss is nan at step 4.*checkpoint"):
        pretrain(poisoned, progress=False)
    assert checkpoints.latest_step(tmp_path / "run") == 4


def test_missing_shards_and_tiny_datasets_are_named(fashion_shards, tmp_path):
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", data={"shards": str(tmp_path / "absent")})
    with pytest.raises(VitrailError, match=str(tmp_path / "absent")):
        pretrain(from_dict(tree), progress=False)
    tree = tiny_config_tree(fashion_shards, tmp_path / "run", optim={"batch_size": 1000})
    with pytest.raises(VitrailError, match="fewer than one global batch"):
        pretrain(from_dict(tree), progress=False)


def test_default_weight_decay_groups_and_per_parameter_clipping(fashion_shards, tmp_path):
    config = from_dict(tiny_config_tree(fashion_shards, tmp_path / "run"))
    method = ssl.build(config, steps_per_epoch=1, total_steps=1)  # DINO: Method's default groups
    decayed, plain = method.parameter_groups()
    names = {id(parameter): name for name, parameter in method.named_parameters()}
    assert all(parameter.ndim > 1 and not names[id(parameter)].endswith(".bias") for parameter in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"student.backbone.norm.weight", "student.backbone.norm.bias",
                                                       "student.head.mlp.0.bias"}
    assert not any(name.startswith("teacher.") for name in map(names.get, map(id, decayed["params"] + plain["params"])))
    assert (decayed["decay"], plain["decay"]) == (True, False)
    clipped = list(method.student.head.mlp[0].parameters()) + list(method.student.backbone.norm.parameters())
    for parameter, scale in zip(clipped, (10.0, 0.1, 5.0, 1.0)):
        parameter.grad = torch.full_like(parameter, scale)
    norms_before = [p.grad.norm().item() for p in clipped]
    method.clip_gradients(3.0)
    for parameter, before in zip(clipped, norms_before):
        assert parameter.grad.norm().item() == pytest.approx(min(before, 3.0), rel=1e-4)
