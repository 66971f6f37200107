"""model.init_from: a fresh run starts from released DINO weights or a vitrail run, then trains."""

import logging
import re

import pytest
import torch
import yaml

from vitrail import backbones
from vitrail.backbones.vit import resample_pos_embed
from vitrail.errors import VitrailError
from vitrail import checkpoints
from vitrail.launch.cli import main
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.stream import local_batches

from conftest import tiny_config_tree

# tiny_config_tree's network on its 1-channel data
BACKBONE = dict(patch_size=7, img_size=28, depth=2, embed_dim=48, num_heads=3, in_chans=1)


def released_dino_backbone(path, **overrides) -> dict:
    """Random weights in DINO's released backbone layout (dino_deitsmall16_pretrain.pth: a plain state
    dict under DINO's key names, which vitrail's ViT shares)."""
    torch.manual_seed(7)
    model = backbones.create("vit_tiny", **{**BACKBONE, **overrides})
    weights = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    torch.save(weights, path)
    return weights


def tree_for(shards, run_dir, max_steps=20, **model):
    return tiny_config_tree(shards, run_dir, run={"precision": "fp32"}, model=model,
                            optim={"epochs": 2, "batch_size": 32, "max_steps": max_steps})


def train_recording(tree) -> tuple[Trainer, list[dict]]:
    """A fresh Trainer (init_from applied, as the launchers do) fitted on real shards; returns it and
    the method's state as each step's forward saw it."""
    config = from_dict(tree)
    trainer = Trainer(config, num_samples=640)
    trainer.resume_if_possible()
    states = []
    trainer.method.register_forward_pre_hook(
        lambda module, args: states.append({key: value.clone() for key, value in module.state_dict().items()}))
    batches = local_batches(read_index(config.data.shards), config.method.views(), config.run.seed,
                            config.data.channels, config.optim.batch_size)
    trainer.fit(batches, progress=False)
    return trainer, states


def network(state: dict, prefix: str) -> dict:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def assert_equal_states(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def test_released_dino_backbone_starts_student_and_teacher_then_trains(fashion_shards, tmp_path):
    weights = released_dino_backbone(tmp_path / "dino_vittiny7_pretrain.pth")
    tree = tree_for(fashion_shards, tmp_path / "run", init_from=str(tmp_path / "dino_vittiny7_pretrain.pth"))
    trainer, states = train_recording(tree)
    assert trainer.step == 20 and len(states) == 20
    assert_equal_states(network(states[0], "student.backbone."), weights)
    assert_equal_states(network(states[0], "teacher.backbone."), weights)
    trained = network(trainer.method.state_dict(), "student.backbone.")
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])

    # A resumed run keeps its checkpoint: init_from is for fresh runs only.
    resumed = Trainer(from_dict(tree), num_samples=640)
    resumed.resume_if_possible()
    assert resumed.step == 20
    assert_equal_states(network(resumed.method.state_dict(), "student.backbone."), trained)


def test_lenient_init_loads_what_fits_and_names_every_skipped_key(fashion_shards, tmp_path, caplog):
    # A deeper RGB ViT on a 56-px grid: one block too many, a 3-channel patch embedding, 8x8 positions.
    path = tmp_path / "rgb_deeper.pth"
    weights = released_dino_backbone(path, depth=3, in_chans=3, img_size=56)
    tree = tree_for(fashion_shards, tmp_path / "run", init_from=str(path))
    with pytest.raises(VitrailError, match=r"does not hold vit_tiny weights; wrong shape: patch_embed\.proj\.weight "
                                           r"\(48, 3, 7, 7\) \(expected \(48, 1, 7, 7\)\) \(1 in all\); unexpected: "
                                           r"blocks\.2\..* \(12 in all\); set model\.init_strict=false"):
        Trainer(from_dict(tree), num_samples=640).resume_if_possible()

    tree["model"]["init_strict"] = False
    trainer = Trainer(from_dict(tree), num_samples=640)
    initial = network(trainer.method.state_dict(), "student.backbone.")
    with caplog.at_level(logging.WARNING, logger="vitrail.init"):
        trainer.resume_if_possible()
    skipped = {record.getMessage().split()[2].rstrip(":") for record in caplog.records}
    assert skipped == {"patch_embed.proj.weight"} | {key for key in weights if key.startswith("blocks.2.")}
    for prefix in ("student.backbone.", "teacher.backbone."):
        loaded = network(trainer.method.state_dict(), prefix)
        assert torch.equal(loaded["patch_embed.proj.weight"], initial["patch_embed.proj.weight"])
        assert torch.equal(loaded["pos_embed"], resample_pos_embed(weights["pos_embed"], 4, 4))
        for key in loaded.keys() - {"patch_embed.proj.weight", "pos_embed"}:
            assert torch.equal(loaded[key], weights[key]), key


def test_vitrail_run_with_its_heads_and_a_head_warm_up(fashion_shards, tmp_path):
    pretrain(from_dict(tree_for(fashion_shards, tmp_path / "first", max_steps=4)), progress=False)
    first = checkpoints.load(tmp_path / "first")["method"]
    tree = tree_for(fashion_shards, tmp_path / "second", max_steps=5, init_from=str(tmp_path / "first"),
                    init_heads=True, freeze_backbone_steps=3)
    _, states = train_recording(tree)
    # Both backbones start from the run's teacher (the backbone vitrail evaluates); heads and centre from the run.
    for prefix in ("student.backbone.", "teacher.backbone."):
        assert_equal_states(network(states[0], prefix), network(first, "teacher.backbone."))
    for prefix in ("student.head.", "teacher.head.", "loss."):
        assert_equal_states(network(states[0], prefix), network(first, prefix))
    # Head warm-up: the student backbone holds still for 3 steps while the head trains, then moves. (Step 0's
    # learning rate is 0, the start of the warm-up: steps 1 and 2 are the ones that show the freeze.)
    backbone = [network(state, "student.backbone.") for state in states]
    for step in (1, 2, 3):
        assert_equal_states(backbone[step], backbone[0])
    assert not torch.equal(backbone[4]["blocks.0.attn.qkv.weight"], backbone[3]["blocks.0.attn.qkv.weight"])
    head = [network(state, "student.head.mlp.") for state in states]
    assert any(not torch.equal(head[2][key], head[1][key]) for key in head[0])

    released = tmp_path / "released.pth"
    released_dino_backbone(released)
    tree = tree_for(fashion_shards, tmp_path / "third", init_from=str(released), init_heads=True)
    with pytest.raises(VitrailError, match="is not a vitrail run, so it holds no heads"):
        Trainer(from_dict(tree), num_samples=640).resume_if_possible()


class _RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _wrong_file(kind: str, folder):
    path = folder / f"{kind}.pth"
    if kind == "not_a_checkpoint":
        path.write_text("model: vit_tiny\n")
    elif kind == "truncated":
        torch.save(released_dino_backbone(folder / "whole.pth"), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "runs_code":
        torch.save({"pos_embed": _RunsCode(folder / "code_ran")}, path)
    else:  # a truncated safetensors file
        path = folder / "model.safetensors"
        from safetensors.torch import save_file
        save_file({"pos_embed": torch.zeros(1, 17, 48)}, str(path))
        path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.mark.parametrize("kind, reason", [("not_a_checkpoint", "not a complete torch checkpoint"),
                                          ("truncated", "not a complete torch checkpoint"),
                                          ("runs_code", "loading it would call io.open"),
                                          ("truncated_safetensors", "cannot read .* as safetensors")])
def test_a_wrong_file_fails_in_one_line_before_training(kind, reason, fashion_shards, tmp_path, capsys):
    path = _wrong_file(kind, tmp_path)
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree_for(fashion_shards, run_dir, init_from=str(path))))
    assert main(["pretrain", str(recipe), "--local"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("vitrail: error: model.init_from: ")
    assert str(path) in error and re.search(reason, error)
    assert not (tmp_path / "code_ran").exists()
    assert not checkpoints.list_checkpoints(run_dir) and not (run_dir / "metrics.jsonl").exists()
