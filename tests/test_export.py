"""`vitrail export`: a run's backbone as safetensors that timm (ViT, Swin, LeViT, ResNet) and
`vitrail.backbones.load_exported` (every backbone) rebuild, giving the features vitrail evaluates."""

import json
import math

import pytest
import torch

from vitrail import backbones
from vitrail.backbones.exported import export
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import open_checkpoint
from vitrail.eval.features import extract
from vitrail.launch.cli import main
from vitrail.config import from_dict
from vitrail.launch.local import pretrain
from vitrail.launch.loop import Trainer
from vitrail.pipelines.shards import read_index
from vitrail.pipelines.views import EvalTransform

from conftest import tiny_config_tree

timm = pytest.importorskip("timm")

# One small network per architecture family of the registry.
TINY = {
    "vit_tiny": dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
    "swin_tiny": dict(base_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "levit_128s": dict(stage_dims=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2), depths=(1, 1, 1)),
    "conformer_tiny": dict(base_channels=8, trans_dim=48, depth=3, num_heads=3),
    "mobileformer_26m": dict(blocks=[("dw", 2, 8, 1, 0), ("dw", 6, 16, 2, 4), ("pw", 3, 16, 1, 3)], stem_chs=8,
                             token_num=2, token_dim=32, num_features=64),
    "resnet18": dict(in_chans=1),
    "dinov2_vits14_reg4": dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
}


def randomised(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny `name` whose every parameter and BN statistic is redrawn: default init (zero biases, unit
    statistics) would hide a tensor that does not make it across."""
    torch.manual_seed(seed)
    model = backbones.create(name, **{**TINY[name], **overrides}).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(torch.rand_like(tensor) + 0.5 if key.endswith("running_var")
                             else torch.randn_like(tensor) / math.sqrt(fan_in) * (0.5 if tensor.ndim <= 1 else 1))
    return model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def short_run(fashion_shards, tmp_path_factory):
    """A 4-step DINO run on real Fashion-MNIST, evaluated by `vitrail eval knn`."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    tree = tiny_config_tree(fashion_shards, run_dir, run={"precision": "fp32", "checkpoint_every": 4, "log_every": 2,
                                                          "tracking": "none", "dir": str(run_dir)},
                            optim={"epochs": 1, "batch_size": 32, "max_steps": 4, "warmup_epochs": 0.1})
    pretrain(from_dict(tree), progress=False)
    assert main(["eval", "knn", str(run_dir), "--limit", "128", "--k", "20"]) == 0
    return run_dir


def test_teacher_exported_for_timm_gives_vitrails_features(short_run, fashion_shards, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(short_run), str(out)]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 48, "depth": 2,
                                    "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True, "num_classes": 0}
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28] and config["pretrained_cfg"]["mean"] == [0.286]
    results = json.loads((short_run / "results.json").read_text())["knn"]
    assert config["vitrail"]["knn_top1"] == {"20": next(r["top1"] for r in results if r["features"] == "pretrained (step 4)")}
    assert {key: config["vitrail"][key] for key in ("method", "network", "step", "dataset")} == {
        "method": "dino", "network": "teacher", "step": 4, "dataset": f"{fashion_shards.name}/train"}
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]

    # The command (timm reads model_args only from a hub or local-dir config, so they are passed)
    # and timm's local-dir form, which reads config.json itself.
    by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors")), **{k: v for k, v in config["model_args"].items() if k != "num_classes"})
    by_file.eval()
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()

    checkpoint = open_checkpoint(short_run)
    data = checkpoint.data
    index, transform = read_index(fashion_shards / "test"), EvalTransform.at(checkpoint.crop_size)
    ours, _ = extract(checkpoint.backbone, index, transform, data.normalization, limit=64)
    for model in (by_file, by_folder):
        theirs, _ = extract(model, index, transform, data.normalization, limit=64)
        assert relative_error(torch.from_numpy(theirs), torch.from_numpy(ours)) < 1e-5
    # The export folder is also a start for another run (model.init_from).
    tree = tiny_config_tree(fashion_shards, tmp_path / "continued", run={"precision": "fp32"}, model={"init_from": str(out)})
    continued = Trainer(from_dict(tree), num_samples=640)
    continued.resume_if_possible()
    for network in continued.method.backbone_pair():
        for key, value in checkpoint.backbone.state_dict().items():
            assert torch.equal(network.state_dict()[key], value), key
    # The student is another network, and the export says so.
    assert main(["export", str(short_run), str(tmp_path / "student"), "--which", "student"]) == 0
    student = json.loads((tmp_path / "student" / "config.json").read_text())["vitrail"]
    assert student["network"] == "student"


@pytest.mark.parametrize("name, size", [("swin_tiny", 224), ("levit_128s", 224), ("resnet18", 64)])
def test_swin_levit_resnet_load_in_timm(name, size, tmp_path):
    model = randomised(name)
    channels = model.registry_kwargs.get("in_chans", 3)
    export(model, tmp_path, "timm", size, [0.5] * channels, [0.25] * channels, {})
    reference = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    images = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(reference(images), model(images)) < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_every_family_exports_and_reloads_in_torch_format(name, tmp_path):
    model = randomised(name, in_chans=1)
    export(model, tmp_path, "torch", 32, [0.5], [0.25], {"method": "test"})
    reloaded = backbones.load_exported(tmp_path)
    assert type(reloaded) is type(model) and reloaded.registry_kwargs == json.loads(json.dumps(model.registry_kwargs))
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)


def test_every_registered_family_is_covered():
    def family(name):
        return name.split("_")[0].rstrip("0123456789")
    assert {family(name) for name in backbones.names()} == {family(name) for name in TINY}


def test_a_format_a_backbone_cannot_take_names_it(tmp_path):
    with pytest.raises(VitrailError, match="backbone conformer_tiny has no timm counterpart.*--format torch"):
        export(randomised("conformer_tiny"), tmp_path, "timm", 32, [0.5] * 3, [0.25] * 3, {})
    with pytest.raises(VitrailError, match="resnet18 with small_images=True .* no timm equivalent"):
        export(randomised("resnet18", small_images=True), tmp_path, "timm", 32, [0.5], [0.25], {})
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(VitrailError, match="is not a vitrail export"):
        backbones.load_exported(tmp_path)
