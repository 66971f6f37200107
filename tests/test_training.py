"""The local launcher: training, checkpoints, resume, NaN handling."""

import json
from pathlib import Path

import pytest
import torch

from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.launch.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.ssl.base import Method

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


class _LinearThenNorm(Method):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_default_weight_decay_groups_and_per_parameter_clipping():
    model = _LinearThenNorm()
    decayed, plain = model.parameter_groups()
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert decayed["lr_multiplier"] == plain["lr_multiplier"] == 1.0 and model.lr_scaling == "linear_256"
    for parameter, scale in zip(model.parameters(), (10.0, 0.1, 5.0, 1.0)):
        parameter.grad = torch.full_like(parameter, scale)
    norms_before = [p.grad.norm().item() for p in model.parameters()]
    model.clip_gradients(3.0)
    for parameter, before in zip(model.parameters(), norms_before):
        assert parameter.grad.norm().item() == pytest.approx(min(before, 3.0), rel=1e-4)
