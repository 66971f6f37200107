"""DINOv2 backbones: the official parameter counts, a checkpoint under the official key names
loading strictly through `vitrail eval`'s loader, a wrong `--arch` named, registers, the official
position interpolation, and timm's DINOv2 ViTs as a numerical reference."""

import pytest
import torch
import torch.nn.functional as F

from vitrail import backbones
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import open_checkpoint

# The counts of the released models (dinov2/hub/backbones.py at img_size 518, patch 14).
OFFICIAL_COUNTS = {
    "dinov2_vits14": 22_056_576, "dinov2_vitb14": 86_580_480,
    "dinov2_vitl14": 304_368_640, "dinov2_vitg14": 1_136_480_768,
    "dinov2_vits14_reg4": 22_058_112, "dinov2_vitb14_reg4": 86_583_552,
    "dinov2_vitl14_reg4": 304_372_736, "dinov2_vitg14_reg4": 1_136_486_912,
}


def official_vits14_keys(grid: int, registers: int = 0) -> dict[str, tuple]:
    """Key -> shape of DinoVisionTransformer(vit_small, patch 14, block_chunks 0, LayerScale, MLP),
    written out from dinov2/models/vision_transformer.py and dinov2/layers/{block, attention, mlp,
    layer_scale, patch_embed}.py."""
    d, hidden = 384, 1536
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    if registers:
        keys["register_tokens"] = (1, registers, d)
    for i in range(12):
        keys.update({
            f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.ls1.gamma": (d,),
            f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, d), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (d, hidden), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.ls2.gamma": (d,),
        })
    return keys


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_equal_the_official_models(name):
    with torch.device("meta"):  # shapes only: ViT-g/14 would need 4.5 GB
        model = backbones.create(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]


def test_the_written_out_official_keys_add_up_to_the_official_count():
    for registers, name in ((0, "dinov2_vits14"), (4, "dinov2_vits14_reg4")):
        shapes = official_vits14_keys(37, registers).values()
        assert sum(torch.Size(shape).numel() for shape in shapes) == OFFICIAL_COUNTS[name]


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Random ViT-S/14 weights under the official keys (a 16 x 16 position grid keeps the files
    small), plain state dicts as the hub's *_pretrain.pth files are."""
    folder = tmp_path_factory.mktemp("dinov2")
    generator = torch.Generator().manual_seed(0)
    files = {}
    for registers, name in ((0, "dinov2_vits14"), (4, "dinov2_vits14_reg4")):
        weights = {key: torch.randn(shape, generator=generator) * 0.02
                   for key, shape in official_vits14_keys(16, registers).items()}
        files[name] = (folder / f"{name}_pretrain.pth", weights)
        torch.save(weights, files[name][0])
    return files


@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg4"])
def test_official_key_names_load_strictly_through_the_eval_loader(official_files, arch):
    path, weights = official_files[arch]
    checkpoint = open_checkpoint(path, arch=arch)
    loaded = checkpoint.backbone.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)
    assert checkpoint.crop_size == 224 and checkpoint.backbone.patch_size == 14
    tokens = checkpoint.backbone.eval().forward_features(torch.randn(2, 3, 224, 224))
    assert tokens["cls"].shape == (2, 384) and tokens["patches"].shape == (2, 256, 384)  # registers left out


def test_an_arch_of_other_shapes_names_the_first_mismatched_key_and_both_shapes(official_files):
    path, _ = official_files["dinov2_vits14"]
    with pytest.raises(VitrailError, match=r"wrong shape: cls_token \(1, 1, 384\) \(expected \(1, 1, 768\)\)"):
        open_checkpoint(path, arch="dinov2_vitb14")
    with pytest.raises(VitrailError, match="missing: register_tokens"):
        open_checkpoint(path, arch="dinov2_vits14_reg4")


TINY = dict(img_size=20, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)


@pytest.mark.parametrize("name, kwargs", [
    ("dinov2_vits14", dict(scale_factor=((3 + 0.1) / 5, (3 + 0.1) / 5))),  # the official offset 0.1
    ("dinov2_vits14_reg4", dict(size=(3, 3), antialias=True)),           # registers: exact size, antialiased
])
def test_position_embeddings_are_interpolated_as_the_official_code_does(name, kwargs):
    model = backbones.create(name, **TINY)
    stored = model.pos_embed[:, 1:].reshape(1, 5, 5, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(stored, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, 9, 16)
    interpolated = model.interpolate_pos_embed(3, 3)
    torch.testing.assert_close(interpolated[:, 1:], expected)
    torch.testing.assert_close(interpolated[:, :1], model.pos_embed[:, :1])
    assert model.interpolate_pos_embed(5, 5) is model.pos_embed


def test_registers_join_the_sequence_but_not_the_patch_outputs():
    model = backbones.create("dinov2_vits14_reg4", **TINY, layer_scale=1.0).eval()  # the released models' scale
    images = torch.randn(2, 1, 12, 12)
    assert model.prepare_tokens(images).shape == (2, 1 + 4 + 9, 16)
    tokens = model.forward_features(images)
    assert tokens["patches"].shape == (2, 9, 16)
    torch.testing.assert_close(model(images), tokens["cls"])
    assert model.last_self_attention(images).shape == (2, 2, 10, 10)
    # The registers change the outputs: they are attended to.
    with torch.no_grad():
        model.register_tokens.normal_()
    assert not torch.allclose(model.forward_features(images)["patches"], tokens["patches"])


@pytest.mark.parametrize("ours, theirs, renames", [
    ("dinov2_vits14", "vit_small_patch14_dinov2", {}),
    ("dinov2_vitg14", "vit_giant_patch14_dinov2", {"mlp.fc1": "mlp.w12", "mlp.fc2": "mlp.w3"}),  # SwiGLU
])
def test_outputs_match_timms_dinov2_vits_with_the_same_weights(ours, theirs, renames):
    timm = pytest.importorskip("timm")
    shape = dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3)
    reference = timm.create_model(theirs, pretrained=False, num_classes=0, **shape).eval()
    model = backbones.create(ours, **shape).eval()
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, value in reference.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        # Redrawn so that LayerScale (1e-5 at init) lets every block count.
        weights[key] = torch.randn(value.shape, generator=generator) * (0.3 if value.ndim > 1 else 1.0)
    reference.load_state_dict({key: weights[ours_key] for key, ours_key in zip(reference.state_dict(), weights)})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["mask_token"] and unexpected == []  # timm's DINOv2 ViTs have no mask token
    images = torch.randn(2, 3, 28, 28, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-4)
